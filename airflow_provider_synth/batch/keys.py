"""The one way a run key is made: a short stable hash of what identifies one task instance's run.

A retried or restarted task rebuilds the same key from the same parts and finds what it already created
(batches carry it in their metadata, Cortex staging tables in their names), so it never pays twice. Each
backend pins its own separator and length: changing either would orphan the runs of earlier versions.
"""

from __future__ import annotations

import hashlib


def run_key(*parts: object, sep: str, length: int) -> str:
    """The first ``length`` hex digits of the sha256 of ``parts`` (as ``str``) joined by ``sep``.

    :param parts: dag_id, task_id, run_id, map_index, the input's fingerprint, the endpoint or model...
    :param sep: the separator, pinned per backend.
    :param length: hex digits kept, pinned per backend.
    """
    return hashlib.sha256(sep.join(str(p) for p in parts).encode()).hexdigest()[:length]
