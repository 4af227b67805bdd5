"""The trigger in a real triggerer process: scheduler, dag-processor, triggerer and api-server on SQLite.

``dag.test()`` runs triggers in-process; this test proves that the deferred task really waits in a separate
``airflow triggerer`` (which imports ``OpenAIBatchTrigger`` from the installed package), that the scheduler
resumes it on the trigger's event, and that the run lands every answer. It starts the components the way
``airflow standalone`` does, each in its own process group with its own log (so the triggerer's log can be
checked apart), in a throw-away AIRFLOW_HOME, against the local Batch API server in another process.
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
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DAG_ID = "synth_quickstart"
TASK_ID = "synthesize"
TRIGGER_CLASSPATH = "airflow_provider_synth.triggers.openai_batch.OpenAIBatchTrigger"
COMPONENTS = ("scheduler", "dag-processor", "triggerer", "api-server")
#: every bound is generous for a loaded 2-core machine; the run itself takes about a minute
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

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every process group, then SIGKILL what is left (Airflow's components can take a while)."""
        for proc in self.procs.values():
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():
            # the group's children (executor workers, task supervisors, log servers) may outlive the leader
            _signal_group(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait(timeout=10)

    def leftovers(self) -> list[int]:
        """Pids still alive in any of the process groups started here."""
        import psutil

        groups = {p.pid for p in self.procs.values()}
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


@pytest.fixture
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("standalone")


@pytest.fixture
def procs(workdir: Path) -> Iterator[Processes]:
    logs = workdir / "component-logs"
    logs.mkdir()
    procs = Processes(logs)
    try:
        yield procs
    finally:
        procs.stop()
        assert not procs.leftovers(), f"processes left behind: {procs.leftovers()}"


@pytest.fixture
def api_key() -> str:
    return f"sk-standalone-SECRET-{secrets.token_hex(8)}"


@pytest.fixture
def server_url(workdir: Path, procs: Processes, api_key: str) -> str:
    """The local Batch API server in its own process; it only accepts ``api_key``. Batches take 14 s: a
    trigger that fires within a few seconds of deferral can be lost by LocalExecutor (see DESIGN.md)."""
    port_file = workdir / "server.port"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "SYNTH_"))}
    env["SYNTH_SERVER_API_KEY"] = api_key
    proc = procs.start("batch-server", [sys.executable, "-m", "airflow_provider_synth.testing.server",
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
        # trigger kwargs are stored encrypted: the test decrypts them to check what the triggerer was given
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


def server_counters(server_url: str, api_key: str) -> dict:
    req = urllib.request.Request(f"{server_url}/_synth/counters", headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def stored_trigger_kwargs(stored: str, fernet_key: bytes) -> dict:
    """A trigger row's kwargs. Airflow 3.3 stores them as plain JSON when a task defers through the execution
    API, and Fernet-encrypted on other paths: both are seen here, which is why a secret never goes in them."""
    return json.loads(stored if stored.startswith("{") else Fernet(fernet_key).decrypt(stored.encode()))


def watch_run(db: Path, run_id: str, procs: Processes) -> tuple[str, list[str], dict[str, set[str]]]:
    """Poll the run until it ends; return its state, the synthesize task's states in order, and the triggers
    seen (classpath -> stored kwargs: a finished trigger's row is deleted, so it must be caught while it runs)."""
    ti_states: list[str] = []
    triggers: dict[str, set[str]] = {}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        rows = query(db, "SELECT state FROM task_instance WHERE dag_id=? AND run_id=? AND task_id=?",
                     DAG_ID, run_id, TASK_ID)
        ti_state = rows[0][0] if rows else None
        if ti_state and (not ti_states or ti_states[-1] != ti_state):
            ti_states.append(str(ti_state))
        for classpath, kwargs in query(db, "SELECT classpath, kwargs FROM trigger"):
            triggers.setdefault(str(classpath), set()).add(str(kwargs))
        (run_state,) = query(db, "SELECT state FROM dag_run WHERE dag_id=? AND run_id=?", DAG_ID, run_id)[0]
        if run_state in ("success", "failed"):
            return str(run_state), ti_states, triggers
        procs.check_alive()
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} not finished after {RUN_TIMEOUT_S:.0f} s; task states {ti_states}")


def read_all(paths) -> Iterator[tuple[Path, bytes]]:
    for path in paths:
        if path.is_file():
            yield path, path.read_bytes()


def test_quickstart_defers_to_a_real_triggerer(workdir: Path, procs: Processes, server_url: str,
                                               api_key: str) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:  # a real triggerer imports triggers from installed packages only, never from the test's sys.path
        version("airflow-provider-synth")
    except PackageNotFoundError:
        pytest.fail("airflow-provider-synth is not installed in this interpreter: pip install -e . --no-deps")
    home, output = workdir / "airflow-home", workdir / "output"
    home.mkdir()
    fernet_key = Fernet.generate_key()
    env = airflow_env(home, output, server_url, api_key, fernet_key.decode())
    db = home / "airflow.db"
    started = time.monotonic()
    finish(run_cli(env, "db", "migrate"), timeout=START_TIMEOUT_S)
    for name in COMPONENTS:
        procs.start(name, [str(BIN / "airflow"), name], env)

    # the dag-processor serializes every example DAG; the CLI needs ours in the database
    wait_for(f"{DAG_ID} in the metadata database",
             lambda: query(db, "SELECT 1 FROM serialized_dag WHERE dag_id=?", DAG_ID), START_TIMEOUT_S, procs)
    run_id = f"standalone__{secrets.token_hex(4)}"
    # a run of a paused DAG waits queued: trigger and unpause together, in either order
    trigger, unpause = run_cli(env, "dags", "trigger", DAG_ID, "-r", run_id), run_cli(env, "dags", "unpause", DAG_ID)
    finish(trigger)
    finish(unpause)
    ready_s = time.monotonic() - started

    state, ti_states, triggers = watch_run(db, run_id, procs)
    run_s = time.monotonic() - started - ready_s
    task_logs = sorted((home / "logs" / f"dag_id={DAG_ID}").rglob("*.log*"))
    context = (f"run {state}, {TASK_ID} states {ti_states}\n--- triggerer\n{tail(procs.log('triggerer'))}\n"
               + "".join(f"--- {p.relative_to(home)}\n{tail(p, 25)}\n" for p in task_logs))
    assert state == "success", context
    print(f"standalone: components ready and run triggered in {ready_s:.1f} s, run took {run_s:.1f} s")

    # the task went through ``deferred``, and the trigger that ran was ours, in the triggerer process
    assert "deferred" in ti_states and ti_states[-1] == "success", context
    assert TRIGGER_CLASSPATH in triggers, triggers
    for stored in triggers[TRIGGER_CLASSPATH]:
        kwargs = stored_trigger_kwargs(stored, fernet_key)
        assert kwargs["conn_id"] == "synth_openai_default" and len(kwargs["batch_ids"]) == 1, kwargs
        assert api_key not in json.dumps(kwargs)
    # the triggerer writes what a trigger logs next to the task's log, in files named after its job id
    trigger_logs = [p for p in task_logs if f"task_id={TASK_ID}" in str(p) and ".log.trigger." in p.name]
    assert trigger_logs, context
    trigger_log = "".join(p.read_text(errors="replace") for p in trigger_logs)
    assert TRIGGER_CLASSPATH in trigger_log, context  # our trigger's own logger: progress lines
    assert "completed, 300/300 completed" in trigger_log and "Trigger fired event" in trigger_log, context
    task_log = "".join(p.read_text(errors="replace") for p in task_logs if p.name == "attempt=1.log"
                       and f"task_id={TASK_ID}" in str(p))
    assert "Pausing task as DEFERRED" in task_log, context
    # ...and the job id in those files' names is the triggerer's job, not the scheduler's or a worker's
    job_ids = {int(p.name.rsplit(".", 2)[-2]) for p in trigger_logs}
    job_types = {str(t) for (t,) in query(db, f"SELECT job_type FROM job WHERE id IN ({','.join('?' * len(job_ids))})",
                                          *job_ids)}
    assert job_types == {"TriggererJob"}, (job_ids, job_types)

    # every request is accounted for, in the manifest the task returned (its XCom) and wrote
    ((xcom,),) = query(db, "SELECT value FROM xcom WHERE dag_id=? AND run_id=? AND task_id=? AND key=?",
                       DAG_ID, run_id, TASK_ID, "return_value")
    manifest = json.loads(str(xcom))
    assert manifest == json.loads((output / DAG_ID / run_id / "manifest.json").read_text())
    assert (manifest["total"], manifest["succeeded"], manifest["failed"], manifest["missing"]) == (300, 300, 0, 0)
    with open(manifest["results_path"], "rb") as fp:
        assert sum(1 for line in fp if line.strip()) == 300
    counters = server_counters(server_url, api_key)
    assert counters["batches_created"] == 1 and counters["requests_processed"] == 300
    assert counters["batch_polls"] >= 3  # the triggerer polled while the batch ran (every 2 s for ~14 s)

    # the key went to the server, never into a log, the metadata database or the output folder
    leaks = [str(p) for p, data in read_all([*procs.log_dir.iterdir(), *home.rglob("*"), *output.rglob("*")])
             if api_key.encode() in data]
    assert not leaks, f"the API key leaked into {leaks}"
