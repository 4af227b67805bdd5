"""The one way a run key and an input fingerprint are made.

A retried or restarted task rebuilds the same key from the same parts and finds what it already created
(batches carry it in their metadata, Cortex staging tables in their names), so it never pays twice. Each
backend pins its own separator and length: changing either would orphan the runs of earlier versions.

THE fingerprint table: what each backend's key (or resume check) depends on, all built with
:class:`InputDigest` over the request lines and :func:`fingerprint` over the settings that change answers.

===========  =============================================================================================
backend      fingerprint of
===========  =============================================================================================
openai       the request lines (the split's digest); the key adds the endpoint
cortex       the request lines (file input) or the table source and its row count; the key adds the model
vllm         the request lines, the model, the sampling and the engine settings that change answers
===========  =============================================================================================

The identity of the task instance (dag_id, task_id, run_id, map_index) comes from
:class:`~airflow_provider_synth.runs.base.RunIdentity`, never from here.
"""

from __future__ import annotations

import hashlib

import orjson


def run_key(*parts: object, sep: str, length: int) -> str:
    """The first ``length`` hex digits of the sha256 of ``parts`` (as ``str``) joined by ``sep``.

    :param parts: dag_id, task_id, run_id, map_index, the input's fingerprint, the endpoint or model...
    :param sep: the separator, pinned per backend.
    :param length: hex digits kept, pinned per backend.
    """
    return hashlib.sha256(sep.join(str(p) for p in parts).encode()).hexdigest()[:length]


def dag_run_key(dag_id: str, run_id: str) -> str:
    """A DAG run's key (its claims' folder name: run ids hold characters some stores refuse, such as ``:``)."""
    return run_key(dag_id, run_id, sep="\n", length=16)


class InputDigest:
    """THE digest of an input's request lines: sha256 over each non-blank line as given, newline-terminated.

    Feed it line by line (:meth:`line`) or a block of lines already joined by newlines (:meth:`block`): the
    two give the same digest for the same lines.
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def line(self, raw: bytes) -> None:
        """Add one request line (without its newline)."""
        self._sha.update(raw)
        self._sha.update(b"\n")

    def block(self, joined: bytes) -> None:
        """Add several request lines joined by ``\\n`` (no trailing newline)."""
        self._sha.update(joined)
        self._sha.update(b"\n")

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def fingerprint(lines: str, *settings: object) -> str:
    """THE input fingerprint: the lines' digest alone, or with the settings that change the answers.

    :param lines: :meth:`InputDigest.hexdigest` of the request lines.
    :param settings: JSON-serializable settings (model, sampling, engine...); none: the lines' digest as is.
    """
    if not settings:
        return lines
    return hashlib.sha256(orjson.dumps([lines, *settings], option=orjson.OPT_SORT_KEYS)).hexdigest()
