"""A local OpenAI / Azure OpenAI Batch API server, for tests and for running DAGs offline.

It speaks the Files and Batches API on ``/v1/...`` (OpenAI) and ``/openai/...?api-version=`` (Azure), moves
batches through the real statuses on a schedule you choose, answers each request with a deterministic
stand-in (or a configured error), injects HTTP faults, and counts everything it creates::

    from airflow_provider_synth.server.server import BatchServer, Outcome

    with BatchServer() as srv:
        srv.set_outcome("bad-*", Outcome.error(500), times=1)
        client = OpenAI(base_url=srv.base_url, api_key="sk-test")
        ...
        assert srv.counters["batches_created"] == 1

From a shell: ``python -m airflow_provider_synth.server --port 8787 [--config file.json]``.
See ``docs/testing_server.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow_provider_synth.server.app import SynthBatchApp
from airflow_provider_synth.server.config import Fault, FaultKind, Outcome, OutcomeRule, ServerConfig

__all__ = ["BatchServer", "Fault", "Outcome", "ServerConfig", "main"]


class BatchServer:
    """The local Batch API server, running its own event loop in a background thread.

    :param config: the settings; keyword ``overrides`` are applied on top (``BatchServer(poll_delay_s=0.05)``).
    """

    def __init__(self, config: ServerConfig | None = None, **overrides: Any) -> None:
        self._initial = (config or ServerConfig()).replace(**overrides)
        self._app: SynthBatchApp | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def app(self) -> SynthBatchApp:
        if self._app is None:
            raise RuntimeError("the server is not started: call start() or use it as a context manager")
        return self._app

    def start(self) -> BatchServer:
        """Start serving; returns when the port is bound."""
        if self._thread is not None:
            return self
        started = threading.Event()
        errors: list[BaseException] = []

        def serve() -> None:
            loop = (_loop_factory() or asyncio.new_event_loop)()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._app = SynthBatchApp(self._initial)
                loop.run_until_complete(self._app.start())
            except BaseException as exc:  # reported to the starting thread
                errors.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._app.stop())
            loop.close()

        self._thread = threading.Thread(target=serve, name="synth-batch-server", daemon=True)
        self._thread.start()
        started.wait()
        if errors:
            self._thread = None
            raise errors[0]
        return self

    def stop(self) -> None:
        """Stop serving, cancel the running batches, remove the temporary state folder (if any)."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._thread = None

    def __enter__(self) -> BatchServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self.app.port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self._initial.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI client's ``base_url``."""
        return self.url + "/v1"

    @property
    def azure_endpoint(self) -> str:
        """The AzureOpenAI client's ``azure_endpoint``."""
        return self.url

    @property
    def config(self) -> ServerConfig:
        return self.app.config

    @property
    def counters(self) -> dict[str, Any]:
        """A snapshot of the counters: files_created, batches_created, requests_processed, http_requests..."""
        return self.app.counters.snapshot()

    def configure(self, **changes: Any) -> ServerConfig:
        """Change settings while running (schedule, outcomes, faults, expiry...); see :class:`ServerConfig`."""
        return self.app.configure(**changes)

    def set_outcome(self, pattern: str, outcome: Outcome, times: int | None = None) -> None:
        """Give ``outcome`` to requests whose custom_id matches the glob ``pattern`` (rules added later rank lower).

        :param pattern: ``fnmatch`` glob on the custom_id.
        :param outcome: e.g. ``Outcome.error(500)``, ``Outcome.expired()``.
        :param times: only the first ``times`` attempts of each matching id get it, later ones succeed.
        """
        self.app.rules.add_outcome(OutcomeRule(pattern, outcome, times))

    def add_fault(
        self,
        route: str,
        kind: FaultKind = "status",
        *,
        status: int = 500,
        retry_after: float | None = None,
        delay_s: float = 0.0,
        times: int | None = 1,
        after_bytes: int | None = None,
    ) -> None:
        """Inject an HTTP fault on routes matching ``route`` (glob on ``"METHOD /v1/path"``); see :class:`Fault`."""
        self.app.rules.add_fault(Fault(route, kind, status, retry_after, delay_s, times, after_bytes))

    def reset(self) -> None:
        """Zero the counters and drop every outcome rule and fault."""
        self.app.counters.reset()
        self.app.rules.set_outcomes([])
        self.app.rules.set_faults([])

    def age(self, ids: list[str], seconds: float) -> list[str]:
        """Move the timestamps of these files and batches ``seconds`` into the past; returns the ids found.

        :param ids: file and batch ids.
        :param seconds: how far back, e.g. ``10 * 86400`` to test a clean-up of objects older than a week.
        """
        loop = self._loop
        if loop is None:
            raise RuntimeError("the server is not started")

        async def run() -> list[str]:
            return self.app.age(list(ids), seconds)

        return asyncio.run_coroutine_threadsafe(run(), loop).result(10)

    def batch(self, batch_id: str) -> dict[str, Any]:
        """A copy of a batch as the API shows it."""
        copy: dict[str, Any] = json.loads(json.dumps(self.app.store.batches[batch_id].api))
        return copy

    def batches(self) -> list[dict[str, Any]]:
        """Copies of every batch, oldest first."""
        return [json.loads(json.dumps(b.api)) for b in list(self.app.store.batches.values())]

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Block until no batch is validating, in progress, finalizing or cancelling."""
        deadline = time.monotonic() + timeout
        while any(b["status"] in ("validating", "in_progress", "finalizing", "cancelling") for b in self.batches()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"batches still running after {timeout} s")
            time.sleep(0.02)


# --- command line -------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m airflow_provider_synth.server",
        description="A local OpenAI / Azure OpenAI Batch API server: test batch DAGs offline, with no API key. "
        "Answers are deterministic stand-ins unless --upstream points at a real OpenAI-compatible server.",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; any other needs SYNTH_SERVER_API_KEY)")
    parser.add_argument("--port", type=int, default=8787, help="port to bind, 0 for any free one (default 8787)")
    parser.add_argument("--config", type=Path, help="JSON file of ServerConfig settings (outcomes, faults, ...)")
    parser.add_argument("--state-dir", help="keep files and batches here (SQLite + files): they survive restarts")
    parser.add_argument("--port-file", type=Path, help="write the bound port to this file once serving")
    parser.add_argument("--validating-s", type=float, help="seconds a batch stays validating")
    parser.add_argument("--in-progress-s", type=float, help="seconds a batch takes to run its requests")
    parser.add_argument("--finalizing-s", type=float, help="seconds a batch stays finalizing")
    parser.add_argument("--poll-delay-s", type=float, help="answer each batch poll after this delay")
    parser.add_argument("--complete-after-first-poll-s", type=float, help="complete batches this long after their first poll")
    parser.add_argument("--upstream", dest="upstream_url", help="run requests against this OpenAI-compatible base URL (…/v1)")
    parser.add_argument("--upstream-concurrency", type=int, help="most requests in flight to the upstream (default 8); "
                        "within it, as many as the upstream sustains")
    parser.add_argument("--upstream-timeout-s", type=float, help="a request with no answer for this long (or 10x the "
                        "slowest answer so far, if longer) is hung (default 300)")
    parser.add_argument("--upstream-model", help="model name sent upstream instead of each request's own")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.epilog = (
        "Keys come from the environment, never from flags: SYNTH_SERVER_API_KEY (the key clients must send, "
        "control routes included; required to bind beyond loopback, where the /_synth control routes are off; "
        "unset on 127.0.0.1 = any non-empty key) and SYNTH_UPSTREAM_API_KEY (sent to --upstream). The upstream "
        "settings are fixed at start: the control API cannot change them."
    )
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> ServerConfig:
    """The settings from the command line, the ``--config`` file and the environment (flags win)."""
    args = _parser().parse_args(argv)
    data: dict[str, Any] = json.loads(args.config.read_text()) if args.config else {}
    for name in ("host", "port", "state_dir", "validating_s", "in_progress_s", "finalizing_s", "poll_delay_s",
                 "complete_after_first_poll_s", "upstream_url", "upstream_concurrency", "upstream_timeout_s",
                 "upstream_model"):
        value = getattr(args, name)
        if value is not None:
            data[name] = value
    if os.environ.get("SYNTH_SERVER_API_KEY"):
        data["api_key"] = os.environ["SYNTH_SERVER_API_KEY"]
    if os.environ.get("SYNTH_UPSTREAM_API_KEY"):
        data["upstream_api_key"] = os.environ["SYNTH_UPSTREAM_API_KEY"]
    return ServerConfig.from_dict(data)


async def _serve(config: ServerConfig, port_file: Path | None) -> None:
    app = SynthBatchApp(config)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    url = f"http://{config.host}:{app.port}"
    print(f"Local Batch API server on {url}/v1 (Azure endpoint: {url}); state in {app.store.root}", flush=True)
    if port_file is not None:
        await asyncio.to_thread(port_file.write_text, str(app.port))
    try:
        await stop.wait()
    finally:
        await app.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGINT or SIGTERM."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(argv)
    except (OSError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(config, args.port_file))
    return 0


def _loop_factory() -> Any:
    """uvloop's event loop when it is installed (it serves polls about twice as fast), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    sys.exit(main())
