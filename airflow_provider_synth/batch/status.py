"""Batch API statuses, in a module light enough for a trigger to import inside the triggerer's event loop."""

from __future__ import annotations

#: Statuses after which a batch never changes again.
TERMINAL_STATUSES = frozenset({"completed", "expired", "failed", "cancelled"})
#: Statuses of a batch still running; ``cancelling`` is one of them (it still finalizes partial output).
IN_PROGRESS_STATUSES = frozenset({"validating", "in_progress", "finalizing", "cancelling"})

__all__ = ["IN_PROGRESS_STATUSES", "TERMINAL_STATUSES"]
