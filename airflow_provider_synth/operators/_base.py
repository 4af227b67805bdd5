"""One operator lifecycle for every batch backend: :class:`SynthBatchOperator`.

Written once, here: claim the output folder, start (or re-attach) the run, defer to the backend's trigger or
wait in the worker (the one wait loop, :meth:`~airflow_provider_synth.runs.base.SynthRun.wait`), resume in
``execute_complete`` on a typed :class:`~airflow_provider_synth.runs.base.Termination`, the next retry round,
the timeout and cancel policy, ``on_kill``, and the finish (THE failed-ratio rule and exception, manifest
publishing: asset events, metrics, lineage).

A backend operator names its run, trigger and config through class attributes, keeps its own constructor
signature (at most 15 parameters; the shared ones passed through here), and implements three steps:

* :meth:`SynthBatchOperator.start_run`: plan the input idempotently and re-attach (a :class:`SynthRun`);
* :meth:`SynthBatchOperator.resume_run`: the same run again after a deferral, from the trigger's event;
* :meth:`SynthBatchOperator.make_trigger`: the trigger for the run's running ids.

Its own knobs go in ONE frozen config object (:attr:`SynthBatchOperator.config_class`); a config field given
as a keyword argument (the names of 0.2.0's pre-release signatures) still works, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.common.compat.sdk import BaseOperator, conf

from airflow_provider_synth.batch.checks import OutputChecks, checks_for
from airflow_provider_synth.batch.paths import as_path, join_path, open_path
from airflow_provider_synth.batch.paths import exists as path_exists
from airflow_provider_synth.batch.requests import RequestTemplate, write_requests
from airflow_provider_synth.batch.status import Next
from airflow_provider_synth.batch.validate import InvalidRequests, check_invalid_requests
from airflow_provider_synth.exceptions import BatchFailedError, BatchTimeoutError, WaitFailedError
from airflow_provider_synth.operators._native import ManifestPublisherMixin, OutputClaimMixin
from airflow_provider_synth.runs.base import RunIdentity, SynthRun, Termination, finish
from airflow_provider_synth.triggers.base import check_trigger_connection, validate_event

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context
    from airflow.triggers.base import BaseTrigger

    from airflow_provider_synth.batch.checks import OutputChecks

#: ``[operators] default_deferrable``, read once at import as the official providers do
DEFAULT_DEFERRABLE = conf.getboolean("operators", "default_deferrable", fallback=False)


def _config_fields(config: Any) -> frozenset[str]:
    """The field names of a frozen config dataclass (none for anything else)."""
    return frozenset(f.name for f in dataclasses.fields(config)) if dataclasses.is_dataclass(config) else frozenset()


def seconds(value: timedelta | float) -> float:
    """A duration given as ``timedelta`` or seconds, in seconds."""
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class SynthBatchOperator(OutputClaimMixin, ManifestPublisherMixin, BaseOperator):
    """The lifecycle every batch operator shares (see the module's docstring).

    :param conn_id: the backend's connection (default: :attr:`default_conn_id`).
    :param output_path: the output folder (local path, URL or ``ObjectStoragePath``), one per task instance.
    :param poll_interval: seconds between status checks (default: :meth:`default_poll_interval_for` the run:
        :attr:`default_poll_interval`, or a backend's own rule, e.g. 2 s against a server on this machine).
    :param timeout: the run's budget (``timedelta`` or seconds), counted from its first submission, so a retry
        never extends it; at the deadline what still runs is cancelled and the task fails (default:
        :attr:`default_timeout`).
    :param deferrable: wait in the triggerer instead of a worker slot.
    :param max_failed_ratio: the largest share of failed or missing requests the task accepts (0 = none).
    :param checks: output checks (:class:`~airflow_provider_synth.batch.checks.OutputChecks`).
    :param invalid_requests: ``"fail"`` (an invalid line refuses the input before anything is paid for) or
        ``"skip"`` (the valid lines run; each invalid one is a failure row).
    :param config: the backend's frozen config object (default: :attr:`config_class`'s defaults).
    """

    #: the backend's frozen config dataclass (its own knobs)
    config_class: ClassVar[type[Any]]
    #: the trigger this operator defers to (its ``event_key`` names the event's per-item states)
    trigger_class: ClassVar[type[Any]]
    #: the connection used when none is given
    default_conn_id: ClassVar[str]
    default_poll_interval: ClassVar[float] = 60.0
    default_timeout: ClassVar[timedelta] = timedelta(hours=6)
    #: whether ``checks.direct_tail`` (answers through a synchronous API) is available
    direct_tail: ClassVar[bool] = False
    #: read the answers back into the output folder at a timeout, before failing (what finished lands)
    collect_on_timeout: ClassVar[bool] = False
    #: old argument name -> the name it has now (accepted with a ``DeprecationWarning``)
    renamed: ClassVar[Mapping[str, str]] = {}
    #: a batch service billed per token: the operator takes :data:`PRICED_ARGUMENTS` (the contract test checks)
    priced: ClassVar[bool] = False

    def __init__(
        self,
        *,
        conn_id: str | None = None,
        output_path: Any = None,
        poll_interval: float | None = None,
        timeout: timedelta | float | None = None,
        deferrable: bool = DEFAULT_DEFERRABLE,
        max_failed_ratio: float = 0.0,
        checks: OutputChecks | None = None,
        invalid_requests: InvalidRequests = "fail",
        config: Any = None,
        **kwargs: Any,
    ) -> None:
        conn_id = self._renamed_arguments(kwargs, conn_id)
        config = self._config_arguments(kwargs, config)
        super().__init__(**kwargs)
        #: ``None``: :meth:`default_poll_interval_for` the run, decided when it waits
        self.poll_interval: float | None = None if poll_interval is None else float(poll_interval)
        self.timeout_s = seconds(self.default_timeout if timeout is None else timeout)
        if not 0.0 <= max_failed_ratio <= 1.0:
            raise ValueError(f"max_failed_ratio must be within [0, 1], got {max_failed_ratio}")
        if (self.poll_interval is not None and self.poll_interval <= 0) or self.timeout_s <= 0:
            raise ValueError("poll_interval and timeout must be > 0")
        if checks is not None and checks.direct_tail and not self.direct_tail:
            raise ValueError("checks.direct_tail is for the OpenAI and Azure Batch API only")
        self.conn_id = conn_id or self.default_conn_id
        self.output_path = output_path
        self.deferrable = deferrable
        self.max_failed_ratio = float(max_failed_ratio)
        self.checks = checks
        self.invalid_requests = check_invalid_requests(invalid_requests)
        self.config = config
        self._run: SynthRun | None = None

    # -- arguments ----------------------------------------------------------------------------------------------

    def _renamed_arguments(self, kwargs: dict[str, Any], conn_id: str | None) -> str | None:
        for old, new in self.renamed.items():
            if old not in kwargs:
                continue
            warnings.warn(f"{type(self).__name__}({old}=...) is deprecated: use {new}=", DeprecationWarning,
                          stacklevel=4)
            value = kwargs.pop(old)
            if new == "conn_id":
                conn_id = conn_id or value
            else:
                kwargs.setdefault(new, value)
        return conn_id

    def _config_arguments(self, kwargs: dict[str, Any], config: Any) -> Any:
        """The config object: ``config`` (or the defaults), with any of its fields given as keyword arguments
        moved into it (deprecated)."""
        config = config if config is not None else self.config_class()
        names = {f.name for f in dataclasses.fields(self.config_class)}
        moved = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        if moved:
            names_given = ", ".join(f"{k}=..." for k in moved)
            warnings.warn(f"{type(self).__name__}({names_given}) is deprecated: pass "
                          f"config={self.config_class.__name__}({names_given})", DeprecationWarning, stacklevel=4)
            config = dataclasses.replace(config, **moved)
        return config

    def argument_over_config(self, name: str, value: Any) -> Any:
        """A shared argument (``retry_failed_requests``, ``max_cost_usd``) whose config field of the same name is
        only a deprecated alias: the argument wins; a config field set away from its default is used (with a
        ``DeprecationWarning``) when the argument is not given. The config then carries the value to the run."""
        default = next(f.default for f in dataclasses.fields(self.config_class) if f.name == name)
        in_config = getattr(self.config, name)
        if in_config != default:
            warnings.warn(f"{type(self).__name__}(config={self.config_class.__name__}({name}=...)) is deprecated: "
                          f"pass {name}= to the operator", DeprecationWarning, stacklevel=4)
            if value is None:
                value = in_config
        value = default if value is None else value
        if value != in_config:
            self.config = dataclasses.replace(self.config, **{name: value})
        return value

    # -- a config field read or set on the operator (``task.limits = ...``, as 0.2.0's pre-release attributes) --

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: a field of the config object reads through
        config = self.__dict__.get("config")
        if not name.startswith("_") and config is not None and name in _config_fields(config):
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        config = self.__dict__.get("config")
        if (config is not None and name in _config_fields(config) and name not in self.__dict__
                and not hasattr(type(self), name)):
            super().__setattr__("config", dataclasses.replace(config, **{name: value}))
            return
        super().__setattr__(name, value)

    @property
    def timeout(self) -> float:
        """The run's budget in seconds (``timeout_s``)."""
        return self.timeout_s

    @timeout.setter
    def timeout(self, value: timedelta | float) -> None:
        self.timeout_s = seconds(value)

    @property
    def cancel_on_kill(self) -> bool:
        """Cancel what still runs when the task is killed or times out (the same policy on every backend; a
        config may turn it off)."""
        return bool(getattr(self.config, "cancel_on_kill", True))

    @property
    def wait_for_completion(self) -> bool:
        """``False``: submit and return the ``submitted`` manifest at once (backends that support it)."""
        return True

    # -- what a backend supplies ----------------------------------------------------------------------------------

    def start_run(self, context: Context) -> SynthRun:
        """Plan the input idempotently (validate before anything is paid for) and re-attach: the run, ready
        for :meth:`SynthRun.next_round` and :meth:`SynthRun.submit`."""
        raise NotImplementedError

    def resume_run(self, context: Context, event: Mapping[str, Any], kwargs: Mapping[str, Any]) -> SynthRun:
        """The run again after a deferral (this is a new operator object), with the event's states.

        :param event: the trigger's validated event.
        :param kwargs: the ``kwargs`` given to ``defer`` (:meth:`defer_kwargs`).
        """
        raise NotImplementedError

    def make_trigger(self, run: SynthRun, end_time: float) -> BaseTrigger:
        """The trigger waiting for the run's running ids until ``end_time``."""
        raise NotImplementedError

    def defer_kwargs(self, run: SynthRun) -> dict[str, Any] | None:
        """What ``execute_complete`` receives back besides the event (JSON primitives only)."""
        return None

    def persist_links(self, context: Context, run: SynthRun) -> None:
        """Store the run's console links before deferring, so they work while the task waits."""

    def trigger_conn_id(self, run: SynthRun) -> str:
        """The connection the run's trigger looks up (checked before the first submission)."""
        return self.conn_id

    def default_poll_interval_for(self, run: SynthRun) -> float:
        """The poll interval when the task sets none (a backend may look at where the run's service is)."""
        return self.default_poll_interval

    def poll_interval_for(self, run: SynthRun) -> float:
        """Seconds between status checks of ``run``: ``poll_interval``, else :meth:`default_poll_interval_for`."""
        return self.poll_interval if self.poll_interval is not None else self.default_poll_interval_for(run)

    # -- the lifecycle ------------------------------------------------------------------------------------------

    def identity(self, context: Context) -> RunIdentity:
        return RunIdentity.from_context(context)

    def execute(self, context: Context) -> dict[str, Any]:
        self.claim_output(context)
        run = self._run = self.start_run(context)
        try:
            if self.deferrable and self.wait_for_completion:  # before anything is paid for
                check_trigger_connection(self.trigger_conn_id(run))
            run.next_round()
            run.submit()
            self.persist_links(context, run)
            if not self.wait_for_completion:
                return run.manifest(None, "submitted", **self.identity(context).manifest_fields())
            return self.drive(context, run)
        finally:
            run.close()

    def drive(self, context: Context, run: SynthRun) -> dict[str, Any]:
        """Until the run is finished: the next round when nothing runs, then defer or wait; then finish."""
        self._run = run
        while True:
            if not run.running:
                if not run.next_round():
                    return self.finish_run(context, run)
                run.submit()
                self.persist_links(context, run)
                if not run.running:  # the round needed no remote work (answered already)
                    continue
            end_time = self.end_time(run)
            if self.deferrable:
                self.defer(trigger=self.make_trigger(run, end_time), method_name="execute_complete",
                           kwargs=self.defer_kwargs(run),
                           timeout=timedelta(seconds=max(end_time - time.time(), 0) + 600))
            result = run.wait(self.poll_interval_for(run), end_time,
                              progress=lambda s: self.log.info("%s: %s", run.waited.plural, s))
            if result.next is Next.TIMEOUT:
                self.on_timeout(context, run, result.message)

    def end_time(self, run: SynthRun) -> float:
        """The run's deadline: ``timeout`` after its first submission (by this worker's clock)."""
        return (run.started_at or time.time()) + self.timeout_s

    def execute_complete(self, context: Context, event: Mapping[str, Any] | None = None,
                         **kwargs: Any) -> dict[str, Any]:
        """Resume after the trigger, on the event's :class:`Termination`: go on (collect, next round, defer
        again, finish), cancel at the deadline, or fail on a polling error."""
        checked = validate_event(event, self.trigger_class.event_key)
        reason = Termination.of(checked["status"])
        run = self._run = self.resume_run(context, checked, kwargs)
        try:
            if reason is Termination.TIMEOUT:
                self.on_timeout(context, run, str(checked.get("message") or ""))
            if reason is Termination.ERROR:
                raise WaitFailedError(
                    f"waiting for the {run.waited.plural} failed: {checked.get('message')}. They keep running on "
                    "the service; a retry re-attaches to them and submits nothing they cover.")
            return self.drive(context, run)
        finally:
            run.close()

    def on_timeout(self, context: Context, run: SynthRun, message: str = "") -> None:
        """At the deadline: cancel what still runs (unless ``cancel_on_kill`` is off), land what finished where
        the backend can (:attr:`collect_on_timeout`), and fail.

        :raises BatchTimeoutError: always.
        """
        running = run.running
        cancelled = run.cancel() if self.cancel_on_kill else []
        if self.collect_on_timeout:
            self.finish_run(context, run, raise_on_failures=False)
        plural = run.waited.plural if len(running) != 1 else run.waited.noun
        raise BatchTimeoutError(
            f"timeout of {self.timeout_s:.0f}s passed with {len(running)} {plural} still running at the deadline"
            f"{' (cancelled)' if cancelled else ''}: {running}. {message + ' ' if message else ''}Retry the task to "
            "collect what finished; it re-attaches and pays for nothing twice.")

    def finish_run(self, context: Context, run: SynthRun, raise_on_failures: bool = True) -> dict[str, Any]:
        """Collect, write and publish the manifest, release the run, and apply ``max_failed_ratio``."""
        acct = run.collect()
        manifest = run.manifest(acct, "completed", **self.identity(context).manifest_fields())
        done = finish(acct, manifest, run.output_dir, max_failed_ratio=self.max_failed_ratio,
                      hints=run.failure_hints(acct))
        self.publish_manifest(context, manifest)
        run.settle(done.ok)
        systematic = run.systematic_message()
        if systematic and raise_on_failures:  # the answers landed; the task still fails, saying why
            raise BatchFailedError(f"{systematic} Results: {manifest.get('results_path')}, failures: "
                                   f"{manifest.get('failures_path')}.")
        return done.raise_for_failures() if raise_on_failures else done.manifest

    def on_kill(self) -> None:
        """Cancel what this worker's run still runs (the trigger cancels what a deferred task waits for)."""
        run = self._run
        if run is None or not self.cancel_on_kill:
            return
        try:
            run.cancel()
        except Exception as exc:  # best effort: the kill must go on
            self.log.warning("could not cancel the run: %s", type(exc).__name__)


#: the operator arguments every batch operator shares (checked by the contract test: same name, same idea)
SHARED_ARGUMENTS: Sequence[str] = ("conn_id", "output_path", "poll_interval", "timeout", "deferrable",
                                   "max_failed_ratio", "checks", "invalid_requests", "config")
#: what every priced batch service's operator (:attr:`SynthBatchOperator.priced`: OpenAI/Azure, Anthropic,
#: Bedrock) takes besides: the same input (a JSONL file, or records built with a template), the model, the
#: retry rounds and the budget, each an argument of its own, never only a config field
PRICED_ARGUMENTS: Sequence[str] = ("input_path", "requests", "template", "model", "retry_failed_requests",
                                   "max_cost_usd")


def is_request_line(item: Any) -> bool:
    """An OpenAI batch line (``custom_id`` + ``body``) or an Anthropic one (``custom_id`` + ``params``)."""
    return isinstance(item, Mapping) and "custom_id" in item and ("body" in item or "params" in item)


class PromptRecords(Sequence[Any]):
    """The records or request lines given as ``requests``, kept out of Airflow's rendered fields.

    Airflow stores every templated field, rendered, in the metadata database and shows it in the UI; prompts
    may hold personal data. For an object with ``serialize()`` it stores what that returns: here a count and
    the first ids, never the records themselves.

    :param items: the records or request lines.
    :param id_field: the record field holding the id (as in :class:`RequestTemplate`).
    """

    SHOWN_IDS = 3

    def __init__(self, items: Iterable[Any], id_field: str | None = None) -> None:
        self._items = list(items)
        self._id_field = id_field

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: Any) -> Any:
        return self._items[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)

    def _id(self, index: int) -> str:
        item = self._items[index]
        if is_request_line(item):
            return str(item["custom_id"])
        if self._id_field and isinstance(item, Mapping) and self._id_field in item:
            return str(item[self._id_field])
        return f"request-{index}"

    def serialize(self) -> str:
        """What Airflow stores and shows for the field: the count and the first ids."""
        ids = [self._id(i) for i in range(min(len(self._items), self.SHOWN_IDS))]
        more = ", ..." if len(self._items) > len(ids) else ""
        return f"{len(self._items)} record(s), not stored as a rendered field; ids: {', '.join(ids)}{more}"

    __repr__ = __str__ = serialize


class RequestInput:
    """The input every priced batch operator takes the same way: ``input_path`` (a request JSONL), or
    ``requests`` (request lines, or records built with ``template`` and ``model``), written to
    ``<work>/requests.jsonl``. One code path for OpenAI/Azure, Anthropic and Bedrock."""

    input_path: Any
    model: str | None
    template: RequestTemplate
    _requests: Any = None

    @property
    def requests(self) -> Any:
        return self._requests

    @requests.setter
    def requests(self, value: Any) -> None:
        # set at construction and again when Airflow renders the field (an XCom resolved to the records)
        if isinstance(value, list | tuple):
            template = getattr(self, "template", None)
            value = PromptRecords(value, template.id_field if template is not None else None)
        self._requests = value

    def take_input(self, input_path: Any, requests: Any, model: str | None, template: RequestTemplate | None) -> None:
        """Set the input (exactly one of ``input_path`` and ``requests``), the model and the template, and THE
        default of ``checks`` beside a template's ``response_format`` (:func:`~airflow_provider_synth.batch.checks.checks_for`:
        a schema the user wrote is checked), the same on every priced backend. Called after the lifecycle's
        ``__init__`` (which set ``checks``).

        :raises ValueError: both or neither of ``input_path`` and ``requests``.
        """
        if (input_path is None) == (requests is None):
            raise ValueError("give exactly one of input_path or requests")
        self.template = template or RequestTemplate()  # before requests: its id_field names them
        self.input_path, self.requests, self.model = input_path, requests, model
        checks: OutputChecks | None = getattr(self, "checks", None)
        self.checks = checks_for(checks, self.template.response_format)

    def request_source(self, work: Any, endpoint: str) -> Any:
        """The request JSONL to plan: ``input_path`` (which must exist), or ``requests`` written (built from
        records with ``template`` for ``endpoint``) to ``<work>/requests.jsonl``. Nothing is sent."""
        if self.input_path is not None:
            source = as_path(self.input_path)
            if not path_exists(source):
                raise FileNotFoundError(f"input_path {self.input_path} does not exist; nothing was submitted. Write "
                                        "the request JSONL there first (e.g. in an upstream task) or pass requests=")
            return source
        items = list(self.requests)
        if not all(is_request_line(i) for i in items):
            if not self.model:
                raise ValueError("building requests from records needs model=")
            items = list(self.template.build(items, model=self.model, endpoint=endpoint))
        path = join_path(work, "requests.jsonl")
        with open_path(path, "wb") as fp:
            write_requests(items, fp)
        return path
