"""Errors of the provider-neutral core. No Airflow imports: the Airflow layers let these propagate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class BatchCoreError(Exception):
    """Base class for errors raised by :mod:`airflow_provider_synth.batch`."""


@dataclass(frozen=True)
class Problem:
    """One problem found in a request file.

    :param file: the file (or source name) the request came from.
    :param line: 1-based line number, or 0 for a problem with the whole file.
    :param custom_id: the request's custom_id when it could be read, else None.
    :param reason: what is wrong, in words a user can act on.
    """

    file: str
    line: int
    custom_id: str | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        cid = f" custom_id={self.custom_id!r}" if self.custom_id is not None else ""
        return f"{where}{cid}: {self.reason}"


class InvalidRequestsError(BatchCoreError, ValueError):
    """The requests failed validation. Raised before anything is uploaded or paid for.

    :param problems: every problem found (the message shows the first ``max_shown``).
    :param total_problems: the number of problems, when more were found than kept.
    """

    max_shown = 20

    def __init__(self, problems: Sequence[Problem], total_problems: int | None = None) -> None:
        self.problems = list(problems)
        self.total_problems = total_problems if total_problems is not None else len(self.problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[: self.max_shown])
        more = self.total_problems - min(len(self.problems), self.max_shown)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{self.total_problems} invalid request(s), nothing was submitted:\n{shown}{tail}")


class AccountingError(BatchCoreError):
    """The accounting invariant failed: some input custom_id is neither in results nor in failures."""


class OutputFormatError(BatchCoreError, ValueError):
    """An output or error line could not be parsed."""


class StorageError(BatchCoreError, OSError):
    """Writing or reading the output or work folder failed (disk full, permission denied, a storage outage).

    Nothing was claimed as done: a later try (once the cause is gone) lands the file again without paying again.
    """


class IncompleteFileError(StorageError):
    """A file landed with another size than the service said it holds (a download cut short)."""
