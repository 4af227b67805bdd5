"""The trigger in a real triggerer process: scheduler, dag-processor, triggerer and api-server on SQLite.

``dag.test()`` runs triggers in-process; these tests prove that the deferred task really waits in a separate
``airflow triggerer`` (which imports ``OpenAIBatchTrigger`` from the installed package), that the scheduler
resumes it on the trigger's event, that the run lands every answer, and that a trigger survives a triggerer
restart without resubmitting anything or moving its deadline. The components start the way
``airflow standalone`` starts them, each in its own process group with its own log (so the triggerer's log can
be checked apart), once per module, in a throw-away AIRFLOW_HOME, against the local Batch API server in
another process.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DAG_ID = "synth_quickstart"
TASK_ID = "synthesize"
TRIGGER_CLASSPATH = "airflow_provider_synth.triggers.openai_batch.OpenAIBatchTrigger"
COMPONENTS = ("scheduler", "dag-processor", "triggerer", "api-server")
#: every bound is generous for a loaded 2-core machine; start-up takes about a minute, each run 30-60 s
START_TIMEOUT_S = 150.0
RUN_TIMEOUT_S = 240.0

pytestmark = [
    pytest.mark.standalone,
    pytest.mark.integration,
    pytest.mark.timeout(540),
    pytest.mark.skipif(not (BIN / "airflow").exists(), reason="the airflow CLI is not next to this interpreter"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, n: int = 40) -> str:
    if not path.exists():
        return f"({path} missing)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


class Processes:
    """Subprocesses started in their own sessions, so that ending one ends everything it forked."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ended: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, env=env, cwd=self.log_dir, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{tail(self.log(name))}")

    def stop(self, *names: str, grace_s: float = 5.0) -> None:
        """SIGTERM the process groups (all by default), then SIGKILL what is left: Airflow's components can
        take a while, and the group's children (executor workers, task supervisors, log servers) may outlive
        the leader."""
        procs = [self.procs.pop(n) for n in (names or list(self.procs))]
        self.ended.extend(procs)
        for proc in procs:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in procs:
            _signal_group(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait(timeout=10)

    def leftovers(self) -> list[int]:
        """Pids still alive in any of the process groups started here."""
        import psutil

        groups = {p.pid for p in [*self.procs.values(), *self.ended]}
        alive = []
        for p in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(p.pid) in groups and p.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
            except (ProcessLookupError, psutil.Error):
                continue
        return alive


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def query(db: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    """Read the metadata database without holding a lock longer than one statement."""
    for _ in range(20):
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            try:
                return conn.execute(sql, args).fetchall()
            finally:
                conn.close()
        except sqlite3.OperationalError as e:  # locked, or a table the migration has not made yet
            last = e
            time.sleep(0.2)
    raise last


def wait_for(what: str, predicate, timeout: float, procs: Processes, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        procs.check_alive()
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_batch_server(procs: Processes, workdir: Path, api_key: str) -> str:
    """The local Batch API server in its own process; it only accepts ``api_key``. Batches take 14 s: a
    trigger that fires within a few seconds of deferral can be lost by LocalExecutor (see DESIGN.md)."""
    port_file = workdir / "server.port"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "SYNTH_"))}
    env["SYNTH_SERVER_API_KEY"] = api_key
    proc = procs.start("batch-server", [sys.executable, "-m", "airflow_provider_synth.server",
                                        "--port", "0", "--port-file", str(port_file), "--validating-s", "1",
                                        "--in-progress-s", "12", "--finalizing-s", "1"], env)
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, tail(procs.log("batch-server"))
        time.sleep(0.1)
    return f"http://127.0.0.1:{int(port_file.read_text())}"


def airflow_env(home: Path, output: Path, server_url: str, api_key: str, fernet_key: str) -> dict[str, str]:
    api_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "SYNTH_"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "example_dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        # scheduled example DAGs (the clean-up one) must not run: only the DAG this test unpauses does
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        # some paths store trigger kwargs encrypted: the test decrypts them to check what the triggerer got
        "AIRFLOW__CORE__FERNET_KEY": fernet_key,
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        # the defaults (8793, 8794) are fixed ports: another Airflow on this machine would collide
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW_CONN_SYNTH_OPENAI_DEFAULT": json.dumps(
            {"conn_type": "synth_openai", "password": api_key, "host": f"{server_url}/v1"}),
        "SYNTH_OUTPUT_DIR": str(output),
        "SYNTH_POLL_INTERVAL": "2",
    })
    return env


def run_cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(BIN / "airflow"), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(cli: subprocess.Popen[str], timeout: float = 120) -> str:
    try:
        out, _ = cli.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_group(cli.pid, signal.SIGKILL)
        out, _ = cli.communicate()
        raise AssertionError(f"`airflow {' '.join(cli.args[1:])}` timed out:\n{out[-3000:]}") from None
    assert cli.returncode == 0, f"`airflow {' '.join(cli.args[1:])}` failed:\n{out[-3000:]}"
    return out


def stored_trigger_kwargs(stored: str, fernet_key: bytes) -> dict:
    """A trigger row's kwargs. Airflow 3.3 stores them as plain JSON when a task defers through the execution
    API, and Fernet-encrypted on other paths: both are seen here, which is why a secret never goes in them."""
    return json.loads(stored if stored.startswith("{") else Fernet(fernet_key).decrypt(stored.encode()))


@dataclass
class Run:
    """What was seen of one DAG run while it ran."""

    run_id: str
    state: str = ""
    ti_states: list[str] = field(default_factory=list)
    #: classpath -> every stored kwargs text seen (a finished trigger's row is deleted: catch it while it runs)
    triggers: dict[str, set[str]] = field(default_factory=dict)


@dataclass
class Cluster:
    """Airflow's components and the Batch API server, started once for the module."""

    workdir: Path
    procs: Processes
    api_key: str
    fernet_key: bytes
    server_url: str
    env: dict[str, str]
    ready_s: float = 0.0

    @property
    def home(self) -> Path:
        return Path(self.env["AIRFLOW_HOME"])

    @property
    def output(self) -> Path:
        return Path(self.env["SYNTH_OUTPUT_DIR"])

    def query(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        return query(self.home / "airflow.db", sql, *args)

    def server(self, route: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(f"{self.server_url}/_synth/{route}",
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {self.api_key}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def trigger(self) -> Run:
        run = Run(f"standalone__{secrets.token_hex(4)}")
        finish(run_cli(self.env, "dags", "trigger", DAG_ID, "-r", run.run_id))
        return run

    def poll(self, run: Run) -> None:
        rows = self.query("SELECT state FROM task_instance WHERE dag_id=? AND run_id=? AND task_id=?",
                          DAG_ID, run.run_id, TASK_ID)
        ti_state = rows[0][0] if rows else None
        if ti_state and (not run.ti_states or run.ti_states[-1] != ti_state):
            run.ti_states.append(str(ti_state))
        for classpath, kwargs in self.query("SELECT t.classpath, t.kwargs FROM trigger t JOIN task_instance ti "
                                            "ON ti.trigger_id = t.id WHERE ti.dag_id=? AND ti.run_id=?",
                                            DAG_ID, run.run_id):
            run.triggers.setdefault(str(classpath), set()).add(str(kwargs))
        ((state,),) = self.query("SELECT state FROM dag_run WHERE dag_id=? AND run_id=?", DAG_ID, run.run_id)
        run.state = str(state)

    def wait(self, run: Run, until, what: str, timeout: float = RUN_TIMEOUT_S) -> None:
        """Poll the run until ``until(run)`` holds, or until it ended (which fails the wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll(run)
            if until(run):
                return
            assert run.state not in ("success", "failed"), f"run {run.state} before {what}\n{self.context(run)}"
            self.procs.check_alive()
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.context(run)}")

    def task_logs(self, run: Run) -> list[Path]:
        return sorted((self.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run.run_id}").rglob("*.log*"))

    def trigger_logs(self, run: Run) -> dict[int, str]:
        """Trigger job id -> what the trigger logged there: the triggerer writes a trigger's log next to the
        task's, in a file named after the triggerer's job id."""
        return {int(p.name.rsplit(".", 2)[-2]): p.read_text(errors="replace") for p in self.task_logs(run)
                if f"task_id={TASK_ID}" in str(p) and ".log.trigger." in p.name}

    def job_types(self, job_ids) -> set[str]:
        ids = list(job_ids)
        return {str(t) for (t,) in self.query(f"SELECT job_type FROM job WHERE id IN ({','.join('?' * len(ids))})",
                                              *ids)}

    def context(self, run: Run) -> str:
        triggerers = [n for n in self.procs.log_dir.glob("triggerer*.log")]
        return (f"run {run.state}, {TASK_ID} states {run.ti_states}\n"
                + "".join(f"--- {p.name}\n{tail(p, 15)}\n" for p in triggerers)
                + "".join(f"--- {p.relative_to(self.home)}\n{tail(p, 25)}\n" for p in self.task_logs(run)))

    def manifest(self, run: Run) -> dict:
        """The manifest the task returned (its XCom), checked equal to the manifest.json it wrote."""
        ((xcom,),) = self.query("SELECT value FROM xcom WHERE dag_id=? AND run_id=? AND task_id=? AND key=?",
                                DAG_ID, run.run_id, TASK_ID, "return_value")
        manifest: dict = json.loads(str(xcom))
        assert manifest == json.loads((self.output / DAG_ID / run.run_id / "manifest.json").read_text())
        return manifest

    def assert_no_key_anywhere(self) -> None:
        """The key went to the server only: never into a log, the metadata database or the output folder."""
        paths = [*self.procs.log_dir.iterdir(), *self.home.rglob("*"), *self.output.rglob("*")]
        leaks = [str(p) for p in paths if p.is_file() and self.api_key.encode() in p.read_bytes()]
        assert not leaks, f"the API key leaked into {leaks}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    from importlib.metadata import PackageNotFoundError, version

    try:  # a real triggerer imports triggers from installed packages only, never from the test's sys.path
        version("airflow-provider-synth")
    except PackageNotFoundError:
        pytest.fail("airflow-provider-synth is not installed in this interpreter: pip install -e . --no-deps")
    workdir = tmp_path_factory.mktemp("standalone")
    (workdir / "component-logs").mkdir()
    procs = Processes(workdir / "component-logs")
    try:
        api_key, fernet_key = f"sk-standalone-SECRET-{secrets.token_hex(8)}", Fernet.generate_key()
        server_url = start_batch_server(procs, workdir, api_key)
        (workdir / "airflow-home").mkdir()
        env = airflow_env(workdir / "airflow-home", workdir / "output", server_url, api_key, fernet_key.decode())
        cluster = Cluster(workdir, procs, api_key, fernet_key, server_url, env)
        started = time.monotonic()
        finish(run_cli(env, "db", "migrate"), timeout=START_TIMEOUT_S)
        for name in COMPONENTS:
            procs.start(name, [str(BIN / "airflow"), name], env)
        # the dag-processor serializes every example DAG; the CLI needs ours in the database
        wait_for(f"{DAG_ID} in the metadata database",
                 lambda: cluster.query("SELECT 1 FROM serialized_dag WHERE dag_id=?", DAG_ID), START_TIMEOUT_S, procs)
        finish(run_cli(env, "dags", "unpause", DAG_ID))
        cluster.ready_s = time.monotonic() - started
        print(f"standalone: components started and {DAG_ID} unpaused in {cluster.ready_s:.1f} s")
        yield cluster
    finally:
        procs.stop()
        assert not procs.leftovers(), f"processes left behind: {procs.leftovers()}"


def assert_all_answered(cluster: Cluster, run: Run) -> dict:
    manifest = cluster.manifest(run)
    assert (manifest["total"], manifest["succeeded"], manifest["failed"], manifest["missing"]) == (300, 300, 0, 0)
    with open(manifest["results_path"], "rb") as fp:
        assert sum(1 for line in fp if line.strip()) == 300
    assert len(manifest["batch_ids"]) == 1
    return manifest


def test_quickstart_defers_to_a_real_triggerer(cluster: Cluster) -> None:
    before = cluster.server("counters")
    started = time.monotonic()
    run = cluster.trigger()
    cluster.wait(run, lambda r: r.state in ("success", "failed"), "the run to end")
    print(f"standalone: run triggered and finished in {time.monotonic() - started:.1f} s")
    context = cluster.context(run)
    assert run.state == "success", context

    # the task went through ``deferred``, and the trigger that ran was ours, in the triggerer process
    assert "deferred" in run.ti_states and run.ti_states[-1] == "success", context
    assert TRIGGER_CLASSPATH in run.triggers, run.triggers
    for stored in run.triggers[TRIGGER_CLASSPATH]:
        kwargs = stored_trigger_kwargs(stored, cluster.fernet_key)
        assert kwargs["conn_id"] == "synth_openai_default" and len(kwargs["batch_ids"]) == 1, kwargs
        assert cluster.api_key not in json.dumps(kwargs)
    logs = cluster.trigger_logs(run)
    assert len(logs) == 1 and cluster.job_types(logs) == {"TriggererJob"}, (logs.keys(), context)
    (trigger_log,) = logs.values()
    assert TRIGGER_CLASSPATH in trigger_log, context  # our trigger's own logger: progress lines
    assert "completed, 300/300 completed" in trigger_log and "Trigger fired event" in trigger_log, context
    task_log = "".join(p.read_text(errors="replace") for p in cluster.task_logs(run)
                       if p.name == "attempt=1.log" and f"task_id={TASK_ID}" in str(p))
    assert "Pausing task as DEFERRED" in task_log, context

    # our trigger never blocked the triggerer's loop: Airflow's own detector logged nothing once it started
    started_at = json.loads(trigger_log.splitlines()[0])["timestamp"]
    blocked = [line for line in cluster.procs.log("triggerer").read_text(errors="replace").splitlines()
               if "async thread was blocked" in line and line[:27] >= started_at[:27]]
    assert blocked == [], (started_at, blocked)

    # every request is accounted for; one batch; the triggerer polled while it ran (every 2 s for ~14 s)
    assert_all_answered(cluster, run)
    after = cluster.server("counters")
    assert after["batches_created"] - before["batches_created"] == 1
    assert after["requests_processed"] - before["requests_processed"] == 300
    assert after["batch_polls"] - before["batch_polls"] >= 3
    cluster.assert_no_key_anywhere()


def test_trigger_survives_a_triggerer_restart(cluster: Cluster) -> None:
    """Stop the triggerer while the batch runs, start another: the trigger moves to the new triggerer with the
    same kwargs (same absolute ``end_time``), the task is not re-run, nothing is submitted twice."""
    before = cluster.server("counters")
    cluster.server("config", {"in_progress_s": 30})  # time to restart the triggerer while the batch runs
    try:
        run = cluster.trigger()
        cluster.wait(run, lambda r: any(TRIGGER_CLASSPATH in t for t in cluster.trigger_logs(r).values()),
                     "the first triggerer to poll the batch")
        (first_job,) = cluster.trigger_logs(run)
        cluster.procs.stop("triggerer", grace_s=15)  # a clean stop ends its job: the trigger is free at once
        cluster.procs.start("triggerer-2", [str(BIN / "airflow"), "triggerer"], cluster.env)
        cluster.wait(run, lambda r: r.state in ("success", "failed"), "the run to end")
    finally:
        cluster.server("config", {"in_progress_s": 12})
    context = cluster.context(run)
    assert run.state == "success", context
    logs = cluster.trigger_logs(run)
    assert len(logs) == 2 and cluster.job_types(logs) == {"TriggererJob"}, (logs.keys(), context)
    second_job = max(logs)
    assert first_job < second_job and "Trigger fired event" in logs[second_job], context
    assert "Trigger fired event" not in logs[first_job], context
    # the task deferred once and resumed once: the trigger moved, the task never ran its submit again
    assert run.ti_states.count("deferred") == 1, context
    manifest = assert_all_answered(cluster, run)
    stored = [stored_trigger_kwargs(s, cluster.fernet_key) for s in run.triggers[TRIGGER_CLASSPATH]]
    assert len({(k["conn_id"], k["end_time"]) for k in stored}) == 1, stored  # the deadline did not move
    assert all(manifest["batch_ids"][0] in json.dumps(k) for k in stored), stored
    after = cluster.server("counters")
    assert after["batches_created"] - before["batches_created"] == 1
    assert after["files_created"] - before["files_created"] == 1
    assert after["requests_processed"] - before["requests_processed"] == 300
    cluster.assert_no_key_anywhere()
