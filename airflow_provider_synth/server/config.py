"""Settings of the local Batch API server: schedule, per-request outcomes, HTTP faults.

Everything here is plain data that round-trips through JSON, so the same settings can come from
Python (``ServerConfig(...)``), from ``--config file.json`` or from ``POST /_synth/config``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

OutcomeKind = Literal["success", "error", "batch_expired", "request_timeout", "unreadable", "cut_off"]
FaultKind = Literal["status", "delay", "drop", "truncate"]
InvalidInputMode = Literal["reject", "fail"]

_DEFAULT_ERROR_CODES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("invalid_api_key", "invalid_request_error"),
    404: ("not_found", "invalid_request_error"),
    429: ("rate_limit_exceeded", "rate_limit_error"),
}
#: Default messages of error lines: a 4xx is the request's fault, and must not read like a server error.
_DEFAULT_MESSAGES = {
    400: "The request is invalid (status 400).",
    401: "The request was not authorized (status 401).",
    404: "The requested model or resource was not found (status 404).",
    429: "Rate limit reached for requests (status 429).",
}


#: ``Outcome.kind`` values (``{"kind": ...}`` in JSON settings), and ``Fault.kind`` values
OUTCOME_KINDS: tuple[str, ...] = get_args(OutcomeKind)
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)


@dataclass(frozen=True)
class Outcome:
    """What the server answers for one batch request.

    Build one with :meth:`success`, :meth:`error`, :meth:`expired` or :meth:`timeout`.

    :param kind: ``success``, ``error`` (an HTTP error line), ``batch_expired`` or ``request_timeout``.
    :param status: HTTP status of an ``error`` line.
    :param code: ``body.error.code`` of an ``error`` line.
    :param message: the error message; for ``success``, unused.
    :param content: for ``success``, a fixed answer text instead of the generated one.
    :param finish_reason: for ``success``, the answer's finish reason: ``"length"`` cuts the text in half (a
        Responses answer becomes ``incomplete``), ``"content_filter"`` empties it.
    :param refusal: for ``success``, a refusal: ``message.refusal`` set and no content.
    """

    kind: OutcomeKind = "success"
    status: int = 200
    code: str | None = None
    message: str | None = None
    content: str | None = None
    finish_reason: str | None = None
    refusal: str | None = None

    @classmethod
    def success(cls, content: str | None = None) -> Outcome:
        """A 200 line with a generated (or the given) answer."""
        return cls("success", 200, content=content)

    @classmethod
    def unreadable(cls, text: str | None = None) -> Outcome:
        """The output line is not JSON at all (by default a proxy's HTML 502 page on one line): corrupt service
        output, in the output file as the service holds it (its ``bytes`` count it)."""
        return cls("unreadable", 200, content=text)

    @classmethod
    def cut_off(cls) -> Outcome:
        """The output line stops half way (a service that lost the end of its output file)."""
        return cls("cut_off", 200)

    @classmethod
    def truncated(cls, content: str | None = None) -> Outcome:
        """A 200 line cut off by the token limit: ``finish_reason: "length"``, half of the answer."""
        return cls("success", 200, content=content, finish_reason="length")

    @classmethod
    def refused(cls, refusal: str = "I'm sorry, but I can't help with that.") -> Outcome:
        """A 200 line whose model refused: ``message.refusal`` set, ``content`` null."""
        return cls("success", 200, refusal=refusal)

    @classmethod
    def error(cls, status: int = 500, code: str | None = None, message: str | None = None) -> Outcome:
        """An HTTP error line: ``response.status_code == status`` with ``body.error``."""
        if status < 400:
            raise ValueError(f"an error outcome needs a 4xx or 5xx status, got {status}")
        return cls("error", status, code=code, message=message)

    @classmethod
    def expired(cls) -> Outcome:
        """A ``response: null`` line with ``error.code == "batch_expired"``."""
        return cls("batch_expired", 0)

    @classmethod
    def timeout(cls) -> Outcome:
        """A ``response: null`` line with ``error.code == "request_timeout"``."""
        return cls("request_timeout", 0)

    def error_body(self) -> dict[str, Any]:
        """The ``body`` of an HTTP error line, shaped like OpenAI's error objects."""
        default_code, err_type = _DEFAULT_ERROR_CODES.get(
            self.status, ("server_error", "server_error") if self.status >= 500 else ("error", "invalid_request_error")
        )
        message = self.message or _DEFAULT_MESSAGES.get(self.status) or (
            f"The server had an error processing this request (status {self.status})." if self.status >= 500
            else f"The request was rejected (status {self.status})."
        )
        return {"error": {"message": message, "type": err_type, "param": None, "code": self.code or default_code}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Outcome:
        """Build from ``{"kind": "error", "status": 500, ...}``; unknown keys are an error."""
        out = cls(**dict(data))
        if out.kind not in OUTCOME_KINDS:
            raise ValueError(f"unknown outcome kind {out.kind!r}; the kinds are {', '.join(OUTCOME_KINDS)}")
        return out


@dataclass(frozen=True)
class OutcomeRule:
    """Give ``outcome`` to the requests whose custom_id matches ``pattern`` (a glob).

    :param pattern: ``fnmatch`` glob on the custom_id.
    :param outcome: the outcome to give.
    :param times: only the first ``times`` attempts of each matching custom_id get it; ``None`` = always.
    """

    pattern: str
    outcome: Outcome
    times: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutcomeRule:
        outcome = data["outcome"]
        return cls(
            pattern=str(data["pattern"]),
            outcome=outcome if isinstance(outcome, Outcome) else Outcome.from_dict(outcome),
            times=data.get("times"),
        )


@dataclass(frozen=True)
class Fault:
    """An HTTP fault injected on the routes matching ``route``.

    :param route: glob on ``"METHOD /path"``, Azure paths normalised to ``/v1/...``, e.g.
        ``"POST /v1/files"`` or ``"GET /v1/batches/*"``.
    :param kind: ``status`` (answer ``status`` with an OpenAI error body), ``delay`` (sleep ``delay_s``,
        then answer normally), ``drop`` (close the connection without an answer) or ``truncate`` (a file
        download, ``GET /v1/files/*/content``, sends its full ``Content-Length`` but only the first
        ``after_bytes`` bytes, waits ``delay_s``, then closes the connection: a download cut mid-stream).
    :param status: the status of a ``status`` fault.
    :param retry_after: value of the ``retry-after`` header of a ``status`` fault (seconds).
    :param delay_s: the delay of a ``delay`` fault.
    :param times: how many matching requests get the fault; ``None`` = all of them.
    :param after_bytes: the bytes a ``truncate`` fault sends before it cuts (``None``: half of the file).
    """

    route: str
    kind: FaultKind = "status"
    status: int = 500
    retry_after: float | None = None
    delay_s: float = 0.0
    times: int | None = 1
    after_bytes: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fault:
        fault = cls(**dict(data))
        if fault.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {fault.kind!r}; the kinds are {', '.join(FAULT_KINDS)}")
        return fault


@dataclass(frozen=True)
class ServerConfig:
    """How the local Batch API server behaves. Times are in seconds.

    :param host: interface to bind; the server is meant for 127.0.0.1. Any other interface needs ``api_key``,
        and turns the control routes (``/_synth/*``) off.
    :param port: port to bind; 0 picks a free one.
    :param api_key: the key clients must send (``Authorization: Bearer`` or ``api-key``), control routes
        included; ``None`` (loopback only) accepts any non-empty key.
    :param state_dir: folder for files and the SQLite state; ``None`` uses a temporary folder removed on stop.
        With a folder, batches survive a restart and keep running.
    :param validating_s: time a batch stays ``validating``.
    :param in_progress_s: time a batch takes to run all its requests (``request_counts`` move in
        ``progress_steps`` steps).
    :param finalizing_s: time a batch stays ``finalizing``.
    :param cancelling_s: time a batch stays ``cancelling``.
    :param progress_steps: how many steps ``in_progress`` is cut into.
    :param poll_delay_s: every ``GET /v1/batches/{id}`` is answered after this delay (without blocking others).
    :param complete_after_first_poll_s: if set, a batch completes this long after its first poll,
        whatever the schedule above says.
    :param expire_after_requests: if set, new batches expire after this many requests were processed.
    :param expire_times: how many batches expire (``None``: every batch while ``expire_after_requests`` is set).
    :param fail_batches: how many of the next batches fail in ``validating`` (status ``failed``).
    :param enqueued_token_limit: per model: a batch whose input tokens (characters / 4) would take the tokens of
        the model's ``in_progress``/``finalizing`` batches over this fails with ``token_limit_exceeded``.
    :param invalid_input: ``reject`` answers 400 to a batch whose input file is invalid; ``fail`` creates
        it and moves it to ``failed`` with ``errors.data`` listing the bad lines, as OpenAI does.
    :param max_requests: most requests in one batch input file.
    :param max_file_bytes: largest upload accepted.
    :param shuffle_output: write output lines in a shuffled order (OpenAI does not keep input order).
    :param seed: seed of the shuffle.
    :param outcomes: per custom_id outcomes, first match wins.
    :param faults: HTTP faults, first match wins.
    :param upstream_url: run each request against this OpenAI-compatible base URL (``.../v1``) instead of
        generating an answer. The ``upstream_*`` settings are fixed when the server starts: the control API
        cannot point the gateway (and its key) somewhere else.
    :param upstream_api_key: key sent to the upstream (never logged).
    :param upstream_concurrency: most requests in flight to the upstream, per server: a cap. Within it the
        gateway sends only as many as the upstream sustains (:mod:`~airflow_provider_synth.server.concurrency`);
        the rest wait on the gateway's side, never inside the upstream.
    :param upstream_timeout_s: a request with no answer for ``max(upstream_timeout_s, 10 x the slowest answer
        so far)`` is hung (given up and retried). Not a guess at how slow the upstream may be: a slow upstream
        is never a failure.
    :param upstream_retries: attempts per request on 429, 5xx, hung requests and connection errors.
    :param upstream_model: model name sent upstream instead of the request's own.
    :param flex_unavailable: custom_id patterns (``X-Client-Request-Id`` of the synchronous routes) whose
        ``service_tier: "flex"`` requests are answered 429 "resource unavailable", as flex answers when it has
        no capacity (``["*"]``: flex never has any). Answers name the tier that served them (``service_tier``).
    """

    host: str = "127.0.0.1"
    port: int = 0
    api_key: str | None = None
    state_dir: str | None = None
    validating_s: float = 0.05
    in_progress_s: float = 0.2
    finalizing_s: float = 0.05
    cancelling_s: float = 0.05
    progress_steps: int = 4
    poll_delay_s: float = 0.0
    complete_after_first_poll_s: float | None = None
    expire_after_requests: int | None = None
    expire_times: int | None = None
    fail_batches: int = 0
    enqueued_token_limit: int | None = None
    invalid_input: InvalidInputMode = "reject"
    max_requests: int = 50_000
    max_file_bytes: int = 200 * 1024 * 1024
    shuffle_output: bool = True
    seed: int = 0
    outcomes: tuple[OutcomeRule, ...] = ()
    faults: tuple[Fault, ...] = ()
    upstream_url: str | None = None
    upstream_api_key: str | None = field(default=None, repr=False)
    upstream_concurrency: int = 8
    upstream_timeout_s: float = 300.0
    upstream_retries: int = 3
    upstream_model: str | None = None
    flex_unavailable: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.invalid_input not in ("reject", "fail"):
            raise ValueError(f"invalid_input must be 'reject' or 'fail', got {self.invalid_input!r}")
        if self.progress_steps < 1:
            raise ValueError("progress_steps must be >= 1")
        if self.upstream_concurrency < 1:
            raise ValueError("upstream_concurrency must be >= 1")
        if not self.api_key and not is_loopback(self.host):
            raise ValueError(
                f"refusing to listen on {self.host or 'every interface'!r} without an API key: anyone who reaches "
                "the port could use it. Set one in the environment (SYNTH_SERVER_API_KEY=<a long random string>; "
                "clients send it as their API key), or bind --host 127.0.0.1."
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServerConfig:
        """Build from a JSON-like mapping (the ``--config`` file); unknown keys raise ``TypeError``."""
        return cls().replace(**data)

    def replace(self, **changes: Any) -> ServerConfig:
        """A copy with ``changes``; ``outcomes``/``faults`` may be given as lists of dicts."""
        if "outcomes" in changes:
            changes["outcomes"] = tuple(
                r if isinstance(r, OutcomeRule) else OutcomeRule.from_dict(r) for r in changes["outcomes"]
            )
        if "faults" in changes:
            changes["faults"] = tuple(f if isinstance(f, Fault) else Fault.from_dict(f) for f in changes["faults"])
        if "flex_unavailable" in changes:
            changes["flex_unavailable"] = tuple(changes["flex_unavailable"])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings, without the keys."""
        data = dataclasses.asdict(self)
        data.pop("api_key")
        data.pop("upstream_api_key")
        return data


def is_loopback(host: str) -> bool:
    """Whether ``host`` names a loopback interface only (``127.0.0.1``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Rules:
    """Thread-safe outcome and fault bookkeeping: which rule applies, and how many times it was used.

    :param config: the settings holding the initial rules.
    """

    def __init__(self, config: ServerConfig) -> None:
        self._lock = threading.Lock()
        self.outcomes: list[OutcomeRule] = list(config.outcomes)
        self.faults: list[Fault] = list(config.faults)
        self._outcome_uses: dict[tuple[int, str], int] = {}
        self._fault_uses: dict[int, int] = {}

    def set_outcomes(self, rules: list[OutcomeRule]) -> None:
        with self._lock:
            self.outcomes = list(rules)
            self._outcome_uses.clear()

    def add_outcome(self, rule: OutcomeRule) -> None:
        with self._lock:
            self.outcomes.append(rule)

    def set_faults(self, faults: list[Fault]) -> None:
        with self._lock:
            self.faults = list(faults)
            self._fault_uses.clear()

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def outcome_for(self, custom_id: str) -> Outcome:
        """The outcome of this attempt of ``custom_id``, counting the attempt against ``times``."""
        with self._lock:
            for rule in self.outcomes:
                if not fnmatch.fnmatchcase(custom_id, rule.pattern):
                    continue
                key = (id(rule), custom_id)
                used = self._outcome_uses.get(key, 0)
                if rule.times is not None and used >= rule.times:
                    continue
                self._outcome_uses[key] = used + 1
                return rule.outcome
        return Outcome.success()

    def fault_for(self, method: str, path: str) -> Fault | None:
        """The fault for this HTTP request, if any, counting it against ``times``."""
        route = f"{method} {path}"
        with self._lock:
            for fault in self.faults:
                if not fnmatch.fnmatchcase(route, fault.route):
                    continue
                used = self._fault_uses.get(id(fault), 0)
                if fault.times is not None and used >= fault.times:
                    continue
                self._fault_uses[id(fault)] = used + 1
                return fault
        return None
