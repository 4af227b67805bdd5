"""``make quickstart``: run the synth_quickstart DAG end to end on this machine, with no API key.

Initializes an Airflow home inside the project (SQLite), starts the local Batch API server in the background,
runs the DAG with ``airflow dags test`` (the operator defers; the trigger runs in-process), prints a summary,
and stops what it started.

Real answers by default: where the vLLM interpreter (``.venv-vllm``) is installed, a real small instruct model
(SmolLM2-135M-Instruct, built once by ``scripts/build_smollm2.py``) answers through vLLM's OpenAI server, in
front of which the local server's ``--upstream`` gateway puts the Batch API. Elsewhere (no vLLM: not Linux, no
wheel), or with ``SYNTH_QUICKSTART_BACKEND=stand-in``, the local server's deterministic stand-in answers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# a second Airflow version needs its own home: `make test-oldest` sets SYNTH_QUICKSTART_HOME=.airflow-oldest
HOME = Path(os.environ.get("SYNTH_QUICKSTART_HOME") or REPO / ".airflow")
OUTPUT = REPO / ".synth-output"
BIN = Path(sys.executable).parent
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SERVED_MODEL = "SmolLM2-135M-Instruct"
STAND_IN_NOTE = ("NOTE: these answers come from the local Batch API server's stand-in backend, not a model. Point "
                 "the\nconnection synth_openai_default at OpenAI (or run the server with --upstream URL) for real "
                 "answers.")
REAL_NOTE = (f"NOTE: these answers are real text from {SERVED_MODEL} (a 135M-parameter model: fluent, not wise),\n"
             "run by vLLM's OpenAI server on this machine behind the local server's Batch API gateway.")


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


def real_model() -> Path | None:
    """SmolLM2's folder (built once), or None, saying why, where the quickstart falls back to the stand-in."""
    if os.environ.get("SYNTH_QUICKSTART_BACKEND", "").replace("_", "-") == "stand-in":
        print("SYNTH_QUICKSTART_BACKEND=stand-in: answers come from the local server's stand-in", flush=True)
        return None
    if not sys.platform.startswith("linux") or not VLLM_PYTHON.exists():
        print(f"no vLLM interpreter at {VLLM_PYTHON} (vLLM installs on Linux only; `make vllm-venv`): answers come "
              "from the local server's stand-in", flush=True)
        return None
    print("building SmolLM2-135M-Instruct for vLLM (once: about 2 minutes; cached after)", flush=True)
    done = subprocess.run([str(VLLM_PYTHON), str(REPO / "scripts" / "build_smollm2.py")], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        print(f"SmolLM2 could not be built ({done.stderr.strip()[-600:]}): answers come from the stand-in",
              flush=True)
        return None
    return Path(done.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_vllm(model: Path, timeout: float = 600.0) -> tuple[subprocess.Popen[bytes], int] | None:
    """vLLM's OpenAI server on 127.0.0.1 (``vllm serve`` needs package metadata the CPU build lacks)."""
    from airflow_provider_synth.engine.vllm.process import engine_env

    port = _free_port()
    log_path = HOME / "vllm-server.log"
    env = engine_env({"HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}, pythonpath="")
    proc = subprocess.Popen(
        [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--served-model-name", SERVED_MODEL, "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
         "--enforce-eager", "--max-model-len", "2048", "--kv-cache-memory-bytes", str(1 << 30)],
        stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)  # noqa: SIM115
    print(f"starting vLLM's OpenAI server with {SERVED_MODEL} on port {port} (log: {log_path}; ~30-90 s)",
          flush=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return proc, port
        except OSError:
            time.sleep(1)
    stop(proc)
    print(f"vLLM's server did not start (see {log_path}): answers come from the stand-in", flush=True)
    return None


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def start_server(upstream_port: int | None = None, options: list[str] | None = None
                 ) -> tuple[subprocess.Popen[bytes], int]:
    """Start the local Batch API server (``options``: its address and state; default any free port),
    as a gateway to vLLM's server on ``upstream_port`` when given."""
    port_file = HOME / "server.port"
    port_file.unlink(missing_ok=True)
    log = open(HOME / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    upstream = [] if upstream_port is None else [
        "--upstream", f"http://127.0.0.1:{upstream_port}/v1", "--upstream-model", SERVED_MODEL,
        "--upstream-concurrency", "32"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_synth.server", *(options or ["--port", "0"]), "--port-file",
         str(port_file), "--validating-s", "1", "--in-progress-s", "4", "--finalizing-s", "1", *upstream],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 30
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the local Batch API server did not start; see {HOME / 'server.log'}")
        time.sleep(0.1)
    return proc, int(port_file.read_text().strip())


def summary(run_start: float, note: str) -> None:
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
    from airflow_provider_synth.batch.usage import format_usd

    u = m["usage"]
    print("\n=== synth quickstart: done ===")
    print(f"requests   {m['total']}: {m['succeeded']} succeeded, {m['failed']} failed, {m['missing']} missing "
          f"({len(m['batch_ids'])} batch(es), {m['rounds']} round(s))")
    print(f"tokens     {u['prompt_tokens']:,} prompt ({u['cached_tokens']:,} cached), "
          f"{u['completion_tokens']:,} completion")
    print(f"cost       {format_usd(m['cost_usd'])} had this run on OpenAI's Batch API ({m['model']}, "
          "50% batch price)")
    print(f"output     {m['output_dir']}")
    print("           results.jsonl, failures.jsonl, manifest.json")
    for cid, text in samples:
        print(f"sample     {cid}: {text}")
    print("\n" + note)
    next_steps()


def next_steps() -> None:
    """Where to go from here: the UI, the CLI, real answers, and what the run left on disk."""
    print(f"""
next steps
  make ui           the Airflow UI on http://127.0.0.1:8080 with these DAGs and the local server on
                    127.0.0.1:8787 (trigger synth_quickstart there)
  airflow-synth status <output folder>
                    a run's batches, counts and progress (this run's server has stopped): with `make ui`
                    running, in another shell `source {HOME}/synth.env`, then give it the folder of a run
                    triggered there, under {OUTPUT}/
  real answers      OpenAI: give the connection your key and no host:
                      airflow connections add synth_openai_default --conn-type synth_openai --conn-password sk-...
                    a self-hosted model (vLLM, llama.cpp... any OpenAI-compatible server) behind the local
                    Batch API: python -m airflow_provider_synth.server --port 8787 --upstream http://HOST:8000/v1
  _work/            in the output folder: the run's plan (plan.json, the run key), the request shards it
                    uploaded, batches.json and the downloaded outputs. A retried task re-attaches from it and
                    pays for nothing twice; delete it only to start the run over.""")


def main() -> int:
    HOME.mkdir(exist_ok=True)
    env = airflow_env()
    print("initializing Airflow (SQLite) in", HOME, flush=True)
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True)
    model = real_model()
    vllm = start_vllm(model) if model is not None else None
    try:
        proc, port = start_server(vllm[1] if vllm is not None else None)
        print(f"local Batch API server on http://127.0.0.1:{port}/v1 (pid {proc.pid})"
              + (f", answering through {SERVED_MODEL}" if vllm is not None else ", stand-in answers"), flush=True)
        try:
            return run_dag(port, REAL_NOTE if vllm is not None else STAND_IN_NOTE)
        finally:
            stop(proc)
            print("stopped the local Batch API server")
    finally:
        if vllm is not None:
            stop(vllm[0])
            print("stopped vLLM's server")


def run_dag(port: int, note: str) -> int:
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
    summary(start, note)
    print(f"took {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
