"""The two money rules of retry rounds, written once for every backend that retries in rounds (OpenAI/Azure,
Anthropic, Bedrock):

* **a systematic failure stops the bleeding**: when a finished round's unusable answers are mostly of one kind
  (:func:`~airflow_provider_synth.batch.checks.systematic_kinds`: a prompt, schema or ``max_tokens`` bug, not
  noise), that kind is not retried again unless ``OutputChecks(retry_systematic=True)``, and the task fails
  saying so, with examples (:meth:`RoundRules.systematic_message`, raised by the lifecycle's finish);
* **every retry round is estimated against ``max_cost_usd`` before it is paid**: the estimate is logged, with
  what was estimated before it (round 0, earlier retry rounds, a direct tail); a round that would go over is not
  submitted and its requests stay failures.

Both keep their record in the run's work folder (``systematic.json``, ``round_estimates.json``), so a resumed
or retried task applies them the same way. A backend supplies its paths, its finished rounds' output files and
its own estimate of a round's requests; the rules are here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from airflow_provider_synth.batch.checks import Checker, OutputChecks, systematic_kinds
from airflow_provider_synth.batch.jsonl import loads
from airflow_provider_synth.batch.landing import read_record, write_record
from airflow_provider_synth.batch.merge import round_verdicts
from airflow_provider_synth.batch.results import ParsedOutput

log = logging.getLogger(__name__)

#: the kinds of unusable answers found systematic, not retried (see :meth:`RoundRules.systematic`)
SYSTEMATIC_FILE = "systematic.json"
#: the estimated cost of each retry round submitted, counted against max_cost_usd by the later rounds
ROUND_ESTIMATES_FILE = "round_estimates.json"


@dataclass(frozen=True)
class RoundEstimate:
    """What a backend estimates for the requests of one or more retry rounds (at its batch prices).

    :param requests: how many requests.
    :param input_tokens: their estimated input tokens.
    :param output_tokens: the output tokens they may produce (``max_tokens`` and alike).
    :param cost_usd: the estimated cost (``None``: no price for the model).
    """

    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None

    @classmethod
    def of_lines(cls, lines: Iterable[bytes], cost: Callable[[int, int], float | None]) -> RoundEstimate:
        """The estimate of OpenAI batch lines (``body`` tokens as round 0 counts them, ``max_tokens`` and alike);
        ``cost(input_tokens, output_tokens)`` prices them."""
        from airflow_provider_synth.batch.usage import declared_output_tokens, estimate_request_tokens

        tokens_in = tokens_out = n = 0
        for raw in lines:
            line = loads(raw)
            tokens_in += estimate_request_tokens(line)
            tokens_out += declared_output_tokens(line)
            n += 1
        return cls(n, tokens_in, tokens_out, cost(tokens_in, tokens_out))


class RoundRules:
    """The systematic-failure rule and the per-round budget of one run.

    :param work: the run's work folder path for a file name (``work("systematic.json")``).
    :param checks: the run's output checks (``None``: nothing is judged unusable, nothing systematic).
    :param checker: the compiled checks.
    :param max_cost_usd: the run's budget (``None``: estimates are only logged).
    :param noun: how the backend calls its requests in logs (``request``, ``record``).
    """

    def __init__(self, work: Callable[[str], Any], checks: OutputChecks | None, checker: Checker | None, *,
                 max_cost_usd: float | None = None, noun: str = "request") -> None:
        self.work, self.checks, self.checker = work, checks, checker
        self.max_cost_usd = max_cost_usd
        self.noun = noun

    # -- the record ---------------------------------------------------------------------------------------------

    def _read(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = read_record(self.work(name), {})
        return data

    def _write(self, name: str, data: Mapping[str, Any]) -> None:
        write_record(self.work(name), data)

    # -- a systematic failure ---------------------------------------------------------------------------------

    def systematic(self) -> dict[str, dict[str, Any]]:
        """The kinds of unusable answers found systematic (not retried): ``{kind: {"round", "count",
        "answered", "examples"}}``."""
        return self._read(SYSTEMATIC_FILE)

    def stopped_kinds(self, finished: Mapping[int, Sequence[Any]]) -> set[str]:
        """Judge each finished round's answers (``finished``: round -> the output files of every shard whose
        last round it is, all ended): a kind of unusable answer that is systematic there is recorded and not
        retried again, unless ``checks.retry_systematic``. Returns the kinds not to retry."""
        if self.checks is not None and self.checks.retry_systematic:
            return set()  # asked for: retried, even a kind an earlier try found systematic
        found = self.systematic()
        if self.checker is None:
            return set(found)
        changed = False
        for rnd, files in sorted(finished.items()):
            if not files:
                continue
            answered, kinds, examples = round_verdicts(files, self.checker)
            for kind in systematic_kinds(answered, kinds):
                if kind not in found:
                    found[kind] = {"round": rnd, "count": kinds[kind], "answered": answered,
                                   "examples": [list(e) for e in examples.get(kind, [])]}
                    changed = True
                    log.warning("round %d: %d of %d answers are %s: a systematic failure (a prompt, schema or "
                                "max_tokens problem, not noise); not retrying them (OutputChecks("
                                "retry_systematic=True) would)", rnd, kinds[kind], answered, kind)
        if changed:
            self._write(SYSTEMATIC_FILE, found)
        return set(found)

    @staticmethod
    def keep(retry_worthy: Callable[[ParsedOutput], bool], stopped: set[str]) -> Callable[[ParsedOutput], bool]:
        """The backend's ``retry_worthy`` rule, less the kinds :meth:`stopped_kinds` stopped."""
        if not stopped:
            return retry_worthy
        return lambda out: retry_worthy(out) and out.error_code not in stopped

    def systematic_message(self) -> str | None:
        """Why the task fails though its answers landed: the kinds found systematic, with examples."""
        found = self.systematic()
        if not found or (self.checks is not None and self.checks.retry_systematic):
            return None
        parts = []
        for kind, f in found.items():
            shown = "; ".join(f"{cid}: {why}" for cid, why in f.get("examples") or [])
            parts.append(f"{f['count']} of {f['answered']} answers in round {f['round']} were {kind} "
                         f"(examples: {shown})")
        return (f"systematic failure: {'; '.join(parts)}. So many answers failing the same check is a bug in "
                "the prompt, the schema or max_tokens, not noise: they were not retried (the same requests would "
                "fail the same way, paid again). Fix it and run again, or retry them anyway with "
                "OutputChecks(retry_systematic=True). The answers that passed are in results.jsonl, the others in "
                "failures.jsonl.")

    # -- the budget -------------------------------------------------------------------------------------------

    def round_estimates(self) -> dict[str, float]:
        """The estimated cost of each retry round submitted (``"shard-round"``: USD)."""
        return self._read(ROUND_ESTIMATES_FILE)

    def spent(self, before: float | None = 0.0) -> float:
        """What was estimated so far: ``before`` (round 0's estimate, a direct tail's) and every retry round's."""
        return (before or 0.0) + sum(self.round_estimates().values())

    def within_budget(self, retry: Sequence[tuple[int, int]], estimate: RoundEstimate, *,
                      before: float | None = 0.0) -> bool:
        """Whether the retry rounds ``retry`` (``(shard, round)`` pairs, not yet submitted) may be paid for:
        their estimate is logged against ``max_cost_usd`` with everything estimated before them; within the
        budget (or with none) it is recorded and counts against the later rounds.

        :param estimate: the backend's estimate of the rounds' requests.
        :param before: round 0's estimate and anything else estimated outside the rounds (a direct tail).
        """
        if not retry:
            return True
        spent = self.round_estimates()
        keys = {f"{s}-{r}" for s, r in retry}  # planned again (a resumed try): not counted twice
        so_far = (before or 0.0) + sum(v for k, v in spent.items() if k not in keys)
        est = estimate.cost_usd
        shown = "unknown (no price for the model)" if est is None else f"${est:.6f}"
        rounds = sorted({r for _, r in retry})
        if self.max_cost_usd is not None and (est is None or so_far + est > self.max_cost_usd):
            log.warning("retry round %s: %d %s(s) estimated at %s; with $%.6f estimated before it, that is "
                        "over max_cost_usd=$%s: not submitted, the %ss stay failures", rounds, estimate.requests,
                        self.noun, shown, so_far, self.max_cost_usd, self.noun)
            return False
        log.info("retry round %s: %d %s(s) estimated at %s (%d input tokens, up to %d output tokens at batch "
                 "prices); with $%.6f estimated before it, against max_cost_usd=%s", rounds, estimate.requests,
                 self.noun, shown, estimate.input_tokens, estimate.output_tokens, so_far,
                 "none" if self.max_cost_usd is None else f"${self.max_cost_usd}")
        spent.update({f"{s}-{r}": (est or 0.0) / len(retry) for s, r in retry})
        self._write(ROUND_ESTIMATES_FILE, spent)
        return True


def finished_rounds(shards: Iterable[tuple[Sequence[Any], Sequence[int], int]]) -> dict[int, list[Any]]:
    """Group the output files of shards whose last round has ended by that round: ``shards`` yields, per such
    shard, ``(files, rounds, last)`` (its output files, the round of each, its last round)."""
    per_round: dict[int, list[Any]] = {}
    for files, rounds, last in shards:
        if last < 0:
            continue
        per_round.setdefault(last, []).extend(f for f, r in zip(files, rounds, strict=True) if r == last)
    return per_round
