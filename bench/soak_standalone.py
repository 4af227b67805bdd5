"""Soak: mapped OpenAIBatchOperator tasks under a real scheduler and triggerer, against the local Batch API server
with faults on, and a ``kill -9`` of the server mid-run (restarted on its ``--state-dir``).

Default: 20 mapped tasks x 5,000 requests. Faults: HTTP 500s on uploads, 429s on batch creation and 500s on
polls (the SDK retries them), per-request 500s and 429s (1% each, retried in a new round), batches that expire
part-way (their rest retried), and the server killed while batches run, then started again on the same state.
Checks: every custom_id exactly once in each task's results, no failure left, one batch per (run, shard, round),
one upload per name, and no request answered (paid for) twice across all batches.

    PYTHONPATH=. python bench/soak_standalone.py [--tasks 20] [--requests 5000] [--timeout-s 2400]

Loopback only; bounded in time. Prints progress, then the figures as one JSON object on the last line.
``tests/integration/test_soak.py`` runs it (``SYNTH_SOAK=1``; the default test run skips it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from cryptography.fernet import Fernet

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "synth_soak"
TASK_ID = "synthesize"

DAG_FILE = '''
import os
from datetime import timedelta

from airflow.sdk import dag, task

from airflow_provider_synth.operators.openai_batch import OpenAIBatchOperator

INPUT, OUTPUT = os.environ["SYNTH_SOAK_INPUT"], os.environ["SYNTH_SOAK_OUTPUT"]
TASKS = int(os.environ["SYNTH_SOAK_TASKS"])


@dag(schedule=None, catchup=False, max_active_tasks=64)
def synth_soak():
    @task
    def parts():
        return [f"{INPUT}/part-{i:02d}.jsonl" for i in range(TASKS)]

    OpenAIBatchOperator.partial(
        task_id="synthesize", output_path=OUTPUT + "/{{ run_id }}/{{ ti.map_index }}", poll_interval=2.0,
        deferrable=True, retry_failed_requests=4, max_failed_ratio=0.0, retries=4,
        retry_delay=timedelta(seconds=3),
    ).expand(input_path=parts())


synth_soak()
'''


def standalone_helpers() -> Any:
    """The process and Airflow helpers of the standalone tests (one copy of them)."""
    path = REPO / "tests" / "integration" / "test_standalone.py"
    spec = importlib.util.spec_from_file_location("synth_standalone_helpers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_inputs(folder: Path, tasks: int, requests: int) -> list[list[str]]:
    folder.mkdir(parents=True)
    ids = []
    for t in range(tasks):
        part = [f"t{t:02d}-{i:05d}" for i in range(requests)]
        with open(folder / f"part-{t:02d}.jsonl", "wb") as fp:
            for cid in part:
                fp.write(orjson.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": {
                    "model": "gpt-4o-mini", "max_completion_tokens": 16,
                    "messages": [{"role": "user", "content": f"Say something short about item {cid}."}]}}) + b"\n")
        ids.append(part)
    return ids


def server_config(requests: int) -> dict[str, Any]:
    return {
        "validating_s": 1.0, "in_progress_s": 20.0, "progress_steps": 10, "finalizing_s": 1.0,
        "outcomes": [
            {"pattern": "*07", "outcome": {"kind": "error", "status": 500}, "times": 1},
            {"pattern": "*13", "outcome": {"kind": "error", "status": 429}, "times": 1},
        ],
        "faults": [
            {"route": "POST /v1/files", "kind": "status", "status": 500, "times": 3},
            {"route": "POST /v1/batches", "kind": "status", "status": 429, "retry_after": 1, "times": 3},
            {"route": "GET /v1/batches/*", "kind": "status", "status": 500, "times": 10},
        ],
        "expire_after_requests": max(1, requests * 3 // 5), "expire_times": 4,
    }


class Soak:
    def __init__(self, st: Any, work: Path, tasks: int, requests: int) -> None:
        self.st, self.work, self.tasks, self.requests = st, work, tasks, requests
        self.procs = st.Processes(work / "logs")
        self.api_key = f"sk-soak-{secrets.token_hex(12)}"
        self.port = st.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.counters: list[dict[str, Any]] = []  # the last snapshot of each server process
        self.server_starts = 0

    # -- the local Batch API server --------------------------------------------------------------------------

    def start_server(self) -> None:
        self.server_starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "SYNTH_"))}
        env["SYNTH_SERVER_API_KEY"] = self.api_key
        self.counters.append({})
        self.procs.start(f"batch-server-{self.server_starts}", [
            sys.executable, "-m", "airflow_provider_synth.server", "--port", str(self.port),
            "--state-dir", str(self.work / "server-state"), "--config", str(self.work / "server.json")], env)
        deadline = time.monotonic() + 60
        while not self._up():
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)

    def _up(self) -> bool:
        try:
            self.snapshot()
            return True
        except OSError:
            return False

    def snapshot(self) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.url}/_synth/counters", headers={"Authorization": f"Bearer {self.api_key}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            self.counters[-1] = json.loads(resp.read())
        return self.counters[-1]

    def kill_server(self) -> None:
        name = f"batch-server-{self.server_starts}"
        proc = self.procs.procs.pop(name)
        self.procs.ended.append(proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    # -- Airflow ---------------------------------------------------------------------------------------------

    def airflow_env(self) -> dict[str, str]:
        env: dict[str, str] = self.st.airflow_env(self.work / "airflow-home", self.work / "output", self.url,
                                                  self.api_key, Fernet.generate_key().decode())
        dags = self.work / "dags"
        dags.mkdir()
        (dags / "synth_soak.py").write_text(DAG_FILE)
        env.update({
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW_CONN_SYNTH_OPENAI_DEFAULT": json.dumps({
                "conn_type": "synth_openai", "password": self.api_key, "host": f"{self.url}/v1",
                "extra": {"max_retries": 6}}),
            "SYNTH_SOAK_INPUT": str(self.work / "input"),
            "SYNTH_SOAK_OUTPUT": str(self.work / "output"),
            "SYNTH_SOAK_TASKS": str(self.tasks),
        })
        return env

    def query(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        return self.st.query(self.work / "airflow-home" / "airflow.db", sql, *args)  # type: ignore[no-any-return]


def run_soak(tasks: int, requests: int, timeout_s: float, keep: bool = False) -> dict[str, Any]:
    st = standalone_helpers()
    work = Path(tempfile.mkdtemp(prefix="synth-soak-"))
    (work / "logs").mkdir()
    soak = Soak(st, work, tasks, requests)
    ids = write_inputs(work / "input", tasks, requests)
    (work / "server.json").write_text(json.dumps(server_config(requests)))
    started = time.monotonic()
    try:
        soak.start_server()
        env = soak.airflow_env()
        (work / "airflow-home").mkdir()
        st.finish(st.run_cli(env, "db", "migrate"), timeout=300)
        for name in st.COMPONENTS:
            soak.procs.start(name, [str(st.BIN / "airflow"), name], env)
        st.wait_for(f"{DAG_ID} parsed", lambda: soak.query("SELECT 1 FROM serialized_dag WHERE dag_id=?", DAG_ID),
                    300, soak.procs)
        st.finish(st.run_cli(env, "dags", "unpause", DAG_ID))
        ready_s = time.monotonic() - started
        print(f"soak: Airflow up in {ready_s:.0f} s", flush=True)
        run_id = f"soak__{secrets.token_hex(4)}"
        st.finish(st.run_cli(env, "dags", "trigger", DAG_ID, "-r", run_id))
        run_started = time.monotonic()
        restarted = wait_and_restart(soak, run_id, run_started + timeout_s)
        wall_s = time.monotonic() - run_started
        figures = check(soak, run_id, ids)
        figures.update({"tasks": tasks, "requests_per_task": requests, "requests": tasks * requests,
                        "server_restarts": int(restarted), "airflow_start_s": round(ready_s, 1),
                        "run_wall_s": round(wall_s, 1), "workdir": str(work) if keep else None})
        return figures
    finally:
        soak.procs.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def wait_and_restart(soak: Soak, run_id: str, deadline: float) -> bool:
    """Follow the run; kill -9 the server once half of the first round's batches exist and one is running,
    start it again on the same state and port; return when the run ended."""
    restarted = False
    last_print = 0.0
    while True:
        assert time.monotonic() < deadline, "the soak ran past its time bound"
        soak.procs.check_alive()
        ((state,),) = soak.query("SELECT state FROM dag_run WHERE dag_id=? AND run_id=?", DAG_ID, run_id)
        counters = soak.snapshot()
        if time.monotonic() - last_print > 15:
            last_print = time.monotonic()
            tis = Counter(str(s) for (s,) in soak.query(
                "SELECT state FROM task_instance WHERE dag_id=? AND run_id=? AND task_id=?", DAG_ID, run_id, TASK_ID))
            print(f"soak: run {state}; tasks {dict(tis)}; server: {counters['batches_created']} batches, "
                  f"{counters['requests_processed']} requests", flush=True)
        if state in ("success", "failed"):
            return restarted
        running = counters["requests_processed"] > 0
        if not restarted and running and counters["batches_created"] >= soak.tasks // 2:
            print(f"soak: kill -9 of the server ({counters['batches_created']} batches created, "
                  f"{counters['requests_processed']} requests done)", flush=True)
            soak.kill_server()
            time.sleep(3)
            soak.start_server()
            restarted = True
        time.sleep(1)


def check(soak: Soak, run_id: str, ids: list[list[str]]) -> dict[str, Any]:
    """The invariants; returns the figures."""
    from openai import OpenAI

    ((state,),) = soak.query("SELECT state FROM dag_run WHERE dag_id=? AND run_id=?", DAG_ID, run_id)
    tries = [int(str(t)) for (t,) in soak.query(
        "SELECT try_number FROM task_instance WHERE dag_id=? AND run_id=? AND task_id=?", DAG_ID, run_id, TASK_ID)]
    problems: list[str] = [] if state == "success" else [f"run {state}"]
    for t, expected in enumerate(ids):
        folder = soak.work / "output" / run_id / str(t)
        try:
            with open(folder / "results.jsonl", "rb") as fp:
                got = [orjson.loads(line)["custom_id"] for line in fp if line.strip()]
            failures = (folder / "failures.jsonl").read_bytes().strip()
        except FileNotFoundError as exc:
            problems.append(f"task {t}: {exc}")
            continue
        if got != expected:
            problems.append(f"task {t}: {len(got)} results, {len(set(got))} distinct, expected {len(expected)}")
        if failures:
            problems.append(f"task {t}: failures left")
    client = OpenAI(base_url=f"{soak.url}/v1", api_key=soak.api_key, max_retries=6)
    batches = list(client.batches.list(limit=100))
    keys = Counter((b.metadata or {}).get("synth_key", "") + f"/{(b.metadata or {}).get('synth_shard')}"
                   f"/{(b.metadata or {}).get('synth_round')}" for b in batches)
    duplicate_batches = sum(n - 1 for n in keys.values() if n > 1)
    uploads = Counter(f.filename for f in client.files.list(purpose="batch"))
    duplicate_uploads = sum(n - 1 for n in uploads.values() if n > 1)
    answered: Counter[str] = Counter()
    error_lines: Counter[str] = Counter()
    for b in batches:
        for file_id, counter in ((b.output_file_id, answered), (b.error_file_id, error_lines)):
            if not file_id:
                continue
            for line in client.files.content(file_id).text.splitlines():
                row = orjson.loads(line)
                if counter is answered:
                    answered[row["custom_id"]] += 1
                else:
                    resp = row.get("response")
                    error_lines[str(resp["status_code"]) if resp else row["error"]["code"]] += 1
    paid_twice = sum(1 for n in answered.values() if n > 1)
    if duplicate_batches:
        problems.append(f"{duplicate_batches} duplicate batch(es)")
    if duplicate_uploads:
        problems.append(f"{duplicate_uploads} duplicate upload(s)")
    if paid_twice or sum(answered.values()) != sum(map(len, ids)):
        problems.append(f"{paid_twice} request(s) answered twice; {sum(answered.values())} answers in all")
    http_faults = sum(c.get("faults_injected", 0) for c in soak.counters)
    statuses = Counter(b.status for b in batches)
    return {
        "ok": not problems, "problems": problems[:20], "run_state": state,
        "batches": len(batches), "batch_statuses": dict(statuses),
        "rounds": 1 + max(int((b.metadata or {}).get("synth_round", 0)) for b in batches),
        "uploads": sum(uploads.values()), "duplicate_batches": duplicate_batches,
        "duplicate_uploads": duplicate_uploads, "requests_answered_twice": paid_twice,
        "faults": {"http_status_faults": http_faults, "request_errors": dict(error_lines),
                   "expired_batches": statuses.get("expired", 0)},
        "task_tries": dict(Counter(tries)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--timeout-s", type=float, default=2400)
    parser.add_argument("--keep", action="store_true", help="keep (and print) the work folder")
    args = parser.parse_args(argv)
    figures = run_soak(args.tasks, args.requests, args.timeout_s, args.keep)
    print(json.dumps(figures))
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
