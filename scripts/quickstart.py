"""``make quickstart``: run the synth_quickstart DAG end to end on this machine, with no API key.

Initializes an Airflow home inside the project (SQLite), starts the local Batch API server in the background,
runs the DAG with ``airflow dags test`` (the operator defers; the trigger runs in-process), prints a summary,
and stops the server it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOME = REPO / ".airflow"
OUTPUT = REPO / ".synth-output"
BIN = Path(sys.executable).parent


def airflow_env(port: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # airflow's own subprocesses (standalone's scheduler, triggerer...) are found on PATH
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({
        "AIRFLOW_HOME": str(HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "example_dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "SYNTH_OUTPUT_DIR": str(OUTPUT),
        "SYNTH_POLL_INTERVAL": "1",
    })
    if port is not None:
        # the local server takes any non-empty key; a real key never leaves the connection
        env["AIRFLOW_CONN_SYNTH_OPENAI_DEFAULT"] = json.dumps(
            {"conn_type": "synth_openai", "password": "sk-local-quickstart", "host": f"http://127.0.0.1:{port}/v1"})
    return env


def start_server() -> tuple[subprocess.Popen[bytes], int]:
    port_file = HOME / "server.port"
    port_file.unlink(missing_ok=True)
    log = open(HOME / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_synth.server", "--port", "0", "--port-file",
         str(port_file), "--validating-s", "1", "--in-progress-s", "4", "--finalizing-s", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 30
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the local Batch API server did not start; see {HOME / 'server.log'}")
        time.sleep(0.1)
    return proc, int(port_file.read_text().strip())


def summary(run_start: float) -> None:
    manifests = sorted((p for p in (OUTPUT / "synth_quickstart").rglob("manifest.json")
                        if p.stat().st_mtime >= run_start), key=lambda p: p.stat().st_mtime)
    if not manifests:
        raise SystemExit("the DAG ran but wrote no manifest")
    m = json.loads(manifests[-1].read_text())
    from airflow_provider_synth.batch.extract import extract_text, iter_output

    samples = []
    for line in iter_output(m["results_path"]):
        samples.append((line["custom_id"], (extract_text(line) or "").replace("\n", " ")[:110]))
        if len(samples) == 3:
            break
    u = m["usage"]
    print("\n=== synth quickstart: done ===")
    print(f"requests   {m['total']}: {m['succeeded']} succeeded, {m['failed']} failed, {m['missing']} missing "
          f"({len(m['batch_ids'])} batch(es), {m['rounds']} round(s))")
    print(f"tokens     {u['prompt_tokens']:,} prompt ({u['cached_tokens']:,} cached), "
          f"{u['completion_tokens']:,} completion")
    print(f"cost       ${m['cost_usd']:.4f} had this run on OpenAI's Batch API ({m['model']}, 50% batch price)")
    print(f"output     {m['output_dir']}")
    print("           results.jsonl, failures.jsonl, manifest.json")
    for cid, text in samples:
        print(f"sample     {cid}: {text}")
    print("\nNOTE: these answers come from the local Batch API server's stand-in backend, not a model. Point the\n"
          "connection synth_openai_default at OpenAI (or run the server with --upstream URL) for real answers.")


def main() -> int:
    HOME.mkdir(exist_ok=True)
    env = airflow_env()
    print("initializing Airflow (SQLite) in", HOME, flush=True)
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True)
    proc, port = start_server()
    print(f"local Batch API server on http://127.0.0.1:{port}/v1 (pid {proc.pid})", flush=True)
    try:
        start = time.time()
        log_path = HOME / "quickstart.log"
        print("running: airflow dags test synth_quickstart  (log:", log_path, ")", flush=True)
        with open(log_path, "wb") as log:
            rc = subprocess.run([str(BIN / "airflow"), "dags", "test", "synth_quickstart"], env=airflow_env(port),
                                stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0 or b"state=failed" in log_path.read_bytes():
            sys.stdout.write(log_path.read_bytes()[-4000:].decode(errors="replace"))
            print(f"\nthe quickstart DAG failed (exit {rc}); full log: {log_path}")
            return 1
        summary(start)
        return 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        print("stopped the local Batch API server")


if __name__ == "__main__":
    sys.exit(main())
