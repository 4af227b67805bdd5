"""The direct-API tail of an OpenAI/Azure run: a small retry round answered by the synchronous API.

When a retry round would hold only a handful of requests, another batch means another wait of up to 24 h for
them. The tail sends them through the synchronous endpoints instead (bounded concurrency, the SDK's retries, the
direct price). Answers are written as batch output lines, in part files of the round, and each part is recorded
in ``direct.json`` before the next starts: a task that crashes mid-tail resumes after the last recorded part
and only repeats the calls that were in flight, never a recorded one. The merge reads the parts as the round's
output, so the accounting, the checks and the retry rounds treat them as any batch output.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import redact

from airflow_provider_synth.batch.jsonl import iter_jsonl, loads
from airflow_provider_synth.batch.landing import landing
from airflow_provider_synth.batch.paths import join_path, open_path
from airflow_provider_synth.batch.results import error_line, parse_output_line, success_line
from airflow_provider_synth.batch.usage import (
    Price,
    Usage,
    cost_usd,
    declared_output_tokens,
    estimate_cost,
    estimate_request_tokens,
)

if TYPE_CHECKING:
    from airflow_provider_synth.hooks.openai import OpenAIBatchHook

log = logging.getLogger(__name__)

#: ``{"shard-round": {"requests", "parts", "done", "est_cost_usd"}}`` of the run's direct rounds.
DIRECT_FILE = "direct.json"
#: Flex processing answers slowly: OpenAI advises a 15-minute timeout per request (the SDK's default is 10).
FLEX_TIMEOUT_S = 900.0
#: The failure code of a request flex had no capacity for (a 429; retryable: the next round asks again).
FLEX_UNAVAILABLE = "flex_resource_unavailable"
#: A part file is written at least this often (seconds) and every PART_LINES answers.
PART_SECONDS, PART_LINES = 5.0, 200


def _key(shard: int, rnd: int) -> str:
    return f"{shard}-{rnd}"


@dataclass
class DirectRounds:
    """The run's direct rounds, as recorded in ``<work_dir>/direct.json``.

    :param work: the run's work folder (path object or string).
    """

    work: Any
    rounds: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, work: Any) -> DirectRounds:
        try:
            with open_path(join_path(work, DIRECT_FILE), "rb") as fp:
                return cls(work, loads(fp.read()))
        except (FileNotFoundError, OSError):
            return cls(work)

    def save(self) -> None:
        import orjson

        with landing(join_path(self.work, DIRECT_FILE)) as fp:
            fp.write(orjson.dumps(self.rounds))

    def pairs(self) -> list[tuple[int, int]]:
        return sorted(tuple(int(x) for x in k.split("-")) for k in self.rounds)  # type: ignore[misc]

    def get(self, shard: int, rnd: int) -> dict[str, Any] | None:
        return self.rounds.get(_key(shard, rnd))

    def part(self, shard: int, rnd: int, index: int) -> Any:
        return join_path(join_path(self.work, "outputs"), f"shard-{shard:05d}-r{rnd}-direct-{index:04d}.jsonl")

    def outputs(self, shard: int, rnd: int) -> list[Any]:
        rec = self.get(shard, rnd) or {}
        return [self.part(shard, rnd, i) for i in range(int(rec.get("parts", 0)))]

    @property
    def est_cost_usd(self) -> float:
        return sum(float(r.get("est_cost_usd") or 0.0) for r in self.rounds.values())

    def summary(self, model: str | None, prices: Mapping[str, Price | tuple[float, float, float]] | None
                ) -> dict[str, Any]:
        """``direct_requests`` (requests sent), their usage, which service tier answered how many
        (``direct_tiers``, from each answer's ``service_tier``), and their cost: flex answers at the batch
        price, the others at the direct price; for the manifest."""
        usage, by_tier = Usage(), dict[str, Usage]()
        for shard, rnd in self.pairs():
            for path in self.outputs(shard, rnd):
                with open_path(path, "rb") as fp:
                    for _, raw in iter_jsonl(fp):
                        out = parse_output_line(raw)
                        if out.ok:
                            usage.add_counts(out.usage)
                            tier = str(((loads(raw).get("response") or {}).get("body") or {}).get("service_tier")
                                       or "default")
                            by_tier.setdefault(tier, Usage()).add_counts(out.usage)
        costs = [cost_usd(u, model, prices, batch=tier == "flex") for tier, u in by_tier.items()]
        total = None if any(c is None for c in costs) else round(sum(c or 0.0 for c in costs), 6)
        return {"direct_requests": sum(int(r.get("requests", 0)) for r in self.rounds.values()),
                "direct_rounds": len(self.rounds), "direct_usage": usage.as_dict(),
                "direct_tiers": {tier: u.requests for tier, u in sorted(by_tier.items())},
                "direct_cost_usd": total}


@dataclass(frozen=True)
class Tier:
    """The service tier the direct tail asks for.

    :param name: ``"flex"``, ``"default"``, or ``None`` (the project's default, no ``service_tier`` sent).
    :param fallback: answer at the default tier a request flex had no capacity for.
    """

    name: str | None = None
    fallback: bool = False

    @property
    def flex(self) -> bool:
        return self.name == "flex"

    @property
    def batch_priced(self) -> bool:
        """Whether the budget may count the tail at the batch price: flex only, with no fallback to the
        direct price."""
        return self.flex and not self.fallback


def estimate_direct_cost(requests: Sequence[bytes], model: str | None,
                         prices: Mapping[str, Price | tuple[float, float, float]] | None,
                         tier: Tier | None = None) -> float | None:
    """The most these requests may cost through the synchronous API (their input, and the output they allow):
    at the batch price on the flex tier without fallback, else at the direct price."""
    bodies = [loads(raw) for raw in requests]
    tokens_in = sum(estimate_request_tokens(b) for b in bodies)
    tokens_out = sum(declared_output_tokens(b) for b in bodies)
    return estimate_cost(tokens_in, tokens_out, model, prices, batch=(tier or Tier()).batch_priced)


def _error(cid: str, exc: Any) -> bytes:
    err = (exc.body or {}).get("error", exc.body) if isinstance(exc.body, dict) else None
    code = str((err or {}).get("code") or (err or {}).get("type") or f"http_{exc.status_code}")
    return error_line(cid, code, str(redact(str(exc)))[:500], status_code=exc.status_code)


def _answer(hook: OpenAIBatchHook, raw: bytes, tier: Tier | None = None) -> bytes:
    """One request line through the synchronous API, as a batch output line (a success or an error)."""
    import openai

    tier = tier or Tier()
    request = loads(raw)
    cid = str(request["custom_id"])
    body = dict(request.get("body") or {})
    if tier.name is not None:
        body["service_tier"] = tier.name
    try:
        try:
            slow: dict[str, Any] = {"timeout": FLEX_TIMEOUT_S} if tier.flex else {}
            answer = hook.create_direct(request["url"], body, custom_id=cid, **slow)
        except openai.RateLimitError as exc:  # the SDK's retries spent
            if not tier.flex:
                raise
            if not tier.fallback:
                return error_line(cid, FLEX_UNAVAILABLE, "flex processing had no capacity (429) after the SDK's "
                                  f"retries: {str(redact(str(exc)))[:400]}", status_code=429)
            log.info("%s: flex had no capacity; answered at the default tier (direct price)", cid)
            answer = hook.create_direct(request["url"], {**body, "service_tier": "default"}, custom_id=cid)
    except openai.APIStatusError as exc:
        return _error(cid, exc)
    except (openai.APIConnectionError, openai.APITimeoutError) as exc:  # SDK retries spent: a retryable miss
        return error_line(cid, "request_timeout", str(redact(f"{type(exc).__name__}: {exc}"))[:500])
    return success_line(cid, answer, request_id=str(answer.get("id") or "") or None)


def answer_round(hook: OpenAIBatchHook, rounds: DirectRounds, shard: int, rnd: int, requests: Sequence[bytes],
                 concurrency: int, tier: Tier | None = None) -> int:
    """Answer a round's requests through the synchronous API, ``concurrency`` at a time (on ``tier``),
    skipping those a recorded part already answered; mark the round done. Returns how many calls were made."""
    rec = rounds.rounds.setdefault(_key(shard, rnd), {"requests": len(requests), "parts": 0, "done": False})
    rounds.save()  # before any call: a task that crashes from here on re-attaches to this round
    answered: set[str] = set()
    for path in rounds.outputs(shard, rnd):
        with open_path(path, "rb") as fp:
            answered.update(parse_output_line(raw).custom_id for _, raw in iter_jsonl(fp))
    from airflow_provider_synth.batch.merge import request_custom_id

    todo = [raw for raw in requests if request_custom_id(raw) not in answered]
    if answered:
        log.info("shard %d round %d: %d direct answer(s) recorded before; %d to go", shard, rnd, len(answered),
                 len(todo))
    _ = hook.client  # built once, before the threads share it
    lines: list[bytes] = []
    last = time.monotonic()

    def flush() -> None:
        nonlocal lines, last
        if lines:
            with open_path(rounds.part(shard, rnd, int(rec["parts"])), "wb") as fp:
                fp.write(b"\n".join(lines) + b"\n")
            rec["parts"] = int(rec["parts"]) + 1
            rounds.save()
        lines, last = [], time.monotonic()

    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="synth-direct")
    try:
        pending: set[Future[bytes]] = {pool.submit(_answer, hook, raw, tier) for raw in todo}
        while pending:
            done, pending = wait(pending, timeout=PART_SECONDS, return_when=FIRST_COMPLETED)
            lines.extend(f.result() for f in done if f.exception() is None)
            failed = [exc for f in done if (exc := f.exception()) is not None]
            if failed:
                raise failed[0]
            if len(lines) >= PART_LINES or time.monotonic() - last >= PART_SECONDS:
                flush()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        flush()  # on the way out too (a kill, an error): what was answered is recorded, never paid again
    rec["done"] = True
    rounds.save()
    log.info("shard %d round %d: %d request(s) answered through the synchronous API", shard, rnd, len(todo))
    return len(todo)
