"""Validate and split requests into shards that respect the Batch API's limits, in one streaming pass."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from airflow_provider_synth.batch.jsonl import dumps, loads
from airflow_provider_synth.batch.keys import InputDigest
from airflow_provider_synth.batch.requests import OPENAI_ENDPOINTS, UrlForm, service_url
from airflow_provider_synth.batch.usage import declared_output_tokens, estimate_request_tokens
from airflow_provider_synth.batch.validate import (
    DEFAULT_MAX_LINE_BYTES,
    InvalidRequests,
    LineChecker,
    Source,
    checked_passes,
)

#: Requests per batch input file (OpenAI and Azure).
MAX_REQUESTS = 50_000
#: Bytes per batch input file: the service takes 200 MB; stay just under it.
MAX_BYTES = 199 * 1000 * 1000
#: Inputs across all embedding requests of one batch.
MAX_EMBEDDING_INPUTS = 50_000


@dataclass(frozen=True)
class ShardLimits:
    """Limits every shard respects.

    :param max_requests: requests per shard.
    :param max_bytes: bytes per shard file (lines plus newlines).
    :param max_embedding_inputs: embedding inputs per shard.
    :param max_tokens: estimated input tokens per shard (for per-model enqueued-token limits); off by default.
    """

    max_requests: int = MAX_REQUESTS
    max_bytes: int = MAX_BYTES
    max_embedding_inputs: int = MAX_EMBEDDING_INPUTS
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_bytes", "max_embedding_inputs", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass
class ShardInfo:
    """One shard written by :func:`split_requests`.

    :param index: 0-based shard number, in input order.
    :param requests: number of requests in the shard.
    :param bytes: size of the shard file.
    :param first_line: input line number of the shard's first request.
    """

    index: int
    requests: int = 0
    bytes: int = 0
    embedding_inputs: int = 0
    est_tokens: int = 0
    first_line: int = 0
    last_line: int = 0
    first_custom_id: str = ""
    last_custom_id: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SplitResult:
    """What a split produced.

    :param shards: the shards, in input order.
    :param total: number of requests.
    :param fingerprint: sha256 of the input's request lines (an idempotency key ingredient).
    :param est_input_tokens: estimated input tokens (0 unless estimating).
    :param est_output_tokens: the output tokens requests allow themselves (max_completion_tokens and alike).
    :param invalid: lines set aside as failure rows (``invalid_requests="skip"``); counted in ``total``.
    :param synthetic_ids: how many of those had no usable custom_id and are reported as ``line-<n>``.
    """

    shards: list[ShardInfo] = field(default_factory=list)
    total: int = 0
    bytes: int = 0
    endpoint: str | None = None
    model: str | None = None
    embedding_inputs: int = 0
    fingerprint: str = ""
    est_input_tokens: int = 0
    est_output_tokens: int = 0
    invalid: int = 0
    synthetic_ids: int = 0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shards"] = [s.as_dict() for s in self.shards]
        return data


class _ShardWriter:
    def __init__(self, open_shard: Callable[[int], IO[bytes]], limits: ShardLimits) -> None:
        self.open_shard, self.limits = open_shard, limits
        self.shards: list[ShardInfo] = []
        self.fp: IO[bytes] | None = None
        self.cur: ShardInfo | None = None

    def fits(self, size: int, inputs: int, tokens: int) -> bool:
        cur, lim = self.cur, self.limits
        if cur is None:
            return False
        if cur.requests + 1 > lim.max_requests or cur.bytes + size > lim.max_bytes:
            return False
        if inputs and cur.embedding_inputs + inputs > lim.max_embedding_inputs:
            return False
        return lim.max_tokens is None or cur.est_tokens + tokens <= lim.max_tokens

    def write(self, lineno: int, cid: str, raw: bytes, inputs: int, tokens: int) -> None:
        size = len(raw) + 1
        if not self.fits(size, inputs, tokens):
            self.close()
            self.cur = ShardInfo(len(self.shards), first_line=lineno, first_custom_id=cid)
            self.shards.append(self.cur)
            self.fp = self.open_shard(self.cur.index)
        assert self.fp is not None and self.cur is not None
        self.fp.write(raw)
        self.fp.write(b"\n")
        cur = self.cur
        cur.requests += 1
        cur.bytes += size
        cur.embedding_inputs += inputs
        cur.est_tokens += tokens
        cur.last_line, cur.last_custom_id = lineno, cid

    def write_block(self, start: int, lines: list[bytes], ids: list[str], joined: bytes) -> None:
        """Write a block of checked chat lines (no embedding inputs, no token limit), a shard's worth at a
        time."""
        lim, i, n = self.limits, 0, len(lines)
        while i < n:
            cur = self.cur
            if cur is None or cur.requests >= lim.max_requests or cur.bytes + len(lines[i]) + 1 > lim.max_bytes:
                self.close()
                cur = self.cur = ShardInfo(len(self.shards), first_line=start + i, first_custom_id=ids[i])
                self.shards.append(cur)
                self.fp = self.open_shard(cur.index)
            assert self.fp is not None
            j, size, stop = i, cur.bytes, min(n, i + lim.max_requests - cur.requests)
            while j < stop:
                grown = size + len(lines[j]) + 1
                if grown > lim.max_bytes:
                    break
                size, j = grown, j + 1
            self.fp.write(joined if i == 0 and j == n else b"\n".join(lines[i:j]))
            self.fp.write(b"\n")
            cur.requests += j - i
            cur.bytes = size
            cur.last_line, cur.last_custom_id = start + j - 1, ids[j - 1]
            i = j

    def close(self) -> None:
        if self.fp is not None:
            self.fp.close()
            self.fp = None


def split_requests(
    source: Any,
    open_shard: Callable[[int], IO[bytes]],
    *,
    limits: ShardLimits | None = None,
    name: str | None = None,
    estimate_tokens: bool = False,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    invalid_requests: InvalidRequests = "fail",
    open_rejected: Callable[[], IO[bytes]] | None = None,
    models: Iterable[str] | None = None,
    url_form: UrlForm = "openai",
    endpoints: Iterable[str] = OPENAI_ENDPOINTS,
) -> SplitResult:
    """Validate ``source`` and write it into shards, streaming; the lines are copied byte for byte, except a
    ``url`` not in the service's form (``/v1/chat/completions`` for OpenAI, ``/chat/completions`` for Azure),
    which is rewritten.

    ``invalid_requests="fail"``: every problem in the input is reported at once and nothing is returned for
    upload (shards already written are scratch files the caller discards). ``"skip"``: only the valid lines go
    into the shards; each invalid line becomes one failure row in the file ``open_rejected()`` returns (see
    :class:`~airflow_provider_synth.batch.validate.Rejected`), counted in ``total`` and ``invalid``.

    :param source: a JSONL path/URL/path object, a binary file object, or an iterable of request dicts.
    :param open_shard: returns a new writable binary file object for shard ``i``.
    :param limits: shard limits; default: the OpenAI Batch API's.
    :param name: the input's name in problem reports.
    :param estimate_tokens: estimate input tokens (always on when ``limits.max_tokens`` is set).
    :param max_line_bytes: the per-request size limit.
    :param invalid_requests: ``"fail"`` or ``"skip"``.
    :param open_rejected: returns a new writable binary file object for the failure rows (``"skip"`` only).
    :param models: the models served (vLLM); default: any one model per file.
    :param url_form: the form of the ``url`` of every written line: ``openai`` or ``azure``.
    :param endpoints: the endpoints the backend serves (default: the Batch APIs'; vLLM: ``VLLM_ENDPOINTS``).
    :raises InvalidRequestsError: listing every problem found, before anything can be uploaded; under
        ``"skip"`` only for a problem with the whole input or when no valid line is left.
    """
    limits = limits or ShardLimits()
    src = Source(source, name)
    estimate = estimate_tokens or limits.max_tokens is not None
    result, checker = checked_passes(
        src, lambda checker: _split_pass(src, open_shard, checker, limits, estimate, url_form), lambda r: r.total,
        invalid_requests=invalid_requests, open_rejected=open_rejected, models=models, max_line_bytes=max_line_bytes,
        endpoints=endpoints)
    if checker.rejected is not None:
        result.invalid, result.synthetic_ids = checker.rejected.count, checker.rejected.synthetic
    result.endpoint, result.model = checker.endpoint, checker.model
    return result


def _split_pass(src: Source, open_shard: Callable[[int], IO[bytes]], checker: LineChecker, limits: ShardLimits,
                estimate: bool, url_form: UrlForm = "openai") -> SplitResult:
    """One pass over the input: check every line, write the valid ones into shards."""
    writer = _ShardWriter(open_shard, limits)
    result = SplitResult()
    digest = InputDigest()
    try:
        for start, block in src.blocks():
            # the block path keeps the lines as they are: OpenAI's form only
            checked_block = checker.check_block(start, block) if not estimate and url_form == "openai" else None
            if checked_block is not None and max(map(len, block)) < limits.max_bytes:
                ids, buf = checked_block
                result.total += len(block)
                digest.block(buf)
                writer.write_block(start, block, ids, buf)
                continue
            for offset, raw in enumerate(block):
                raw = raw.rstrip(b"\r")
                if raw and not raw.isspace():
                    _split_line(start + offset, raw, checker, writer, result, digest, limits, estimate, url_form)
    finally:
        writer.close()
    result.shards = writer.shards
    result.bytes = sum(s.bytes for s in writer.shards)
    result.fingerprint = digest.hexdigest()
    return result


def _split_line(lineno: int, raw: bytes, checker: LineChecker, writer: _ShardWriter, result: SplitResult,
                digest: InputDigest, limits: ShardLimits, estimate: bool, url_form: UrlForm = "openai") -> None:
    """Check and write one line (the general path: any endpoint, token estimates, problems)."""
    result.total += 1
    checked = checker.check(lineno, raw)
    if checked is None:
        return
    if (checked.line_url or checked.url) != (url := service_url(checked.url, url_form)):
        raw = dumps({**loads(raw), "url": url})
    digest.line(raw)
    tokens = 0
    if estimate:
        request = loads(raw)
        tokens = estimate_request_tokens(request)
        result.est_output_tokens += declared_output_tokens(request)
        if limits.max_tokens is not None and tokens > limits.max_tokens:
            checker.problem(lineno, checked.custom_id, f"estimated {tokens} input tokens, over the "
                            f"per-shard token limit of {limits.max_tokens}")
            return
    result.est_input_tokens += tokens
    result.embedding_inputs += checked.embedding_inputs
    if checked.embedding_inputs > limits.max_embedding_inputs:
        checker.problem(lineno, checked.custom_id, f"{checked.embedding_inputs} embedding inputs, over "
                        f"the per-batch limit of {limits.max_embedding_inputs}")
        return
    if len(raw) + 1 > limits.max_bytes:
        checker.problem(lineno, checked.custom_id, f"line is {len(raw) + 1:,} bytes, over the per-shard "
                        f"limit of {limits.max_bytes:,}")
        return
    if checker.skipping or not checker.problem_count:  # "fail": after a problem, scan for more but stop writing
        writer.write(lineno, checked.custom_id, raw, checked.embedding_inputs, tokens)
