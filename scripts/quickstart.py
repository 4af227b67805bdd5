"""``make quickstart``: run the synth_quickstart DAG end to end on this machine, with no API key.

Initializes an Airflow home inside the project (SQLite), starts the local Batch API server in the background,
runs the DAG with ``airflow dags test`` (the operator defers; the trigger runs in-process), prints a summary,
and stops what it started.

Real answers by default: where the vLLM interpreter (``.venv-vllm``) is installed, a real small instruct model
(SmolLM2-135M-Instruct, built once by ``scripts/build_smollm2.py``) answers through vLLM's OpenAI server, in
front of which the local server's ``--upstream`` gateway puts the Batch API. Elsewhere (no vLLM: not Linux, no
wheel), or with ``SYNTH_QUICKSTART_BACKEND=stand-in``, the local server's deterministic stand-in answers.

vLLM runs in the dtype this CPU computes natively (bfloat16 only with AVX-512 BF16 / AMX, else float32). Its
speed is measured during a warm-up, and the run is sized to finish in about 10 minutes (or the stand-in answers,
when even a small run would not). Progress (answered, failed, tokens/s, time left) is printed every 15 s. Ctrl-C,
SIGTERM, SIGHUP or a timeout stops every process the quickstart started.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
DAG_FILE = REPO / "example_dags" / "synth_quickstart.py"
LOCAL_KEY = "sk-local-quickstart"  # the local server takes any non-empty key; a real key never leaves the connection
#: the quickstart should take about this long (seconds), vLLM's and Airflow's start included (not the one-time
#: installs); the run gets what is left of it after vLLM's start and warm-up, at least a third
TARGET_S = float(os.environ.get("SYNTH_QUICKSTART_TARGET_S") or 600)
STARTED_AT = time.monotonic()
#: Airflow's part of a run (start, validate, merge), measured on 2 busy cores: about 50 s
AIRFLOW_OVERHEAD_S = 60.0
#: fewer answers than this in TARGET_S: the machine is too slow for the real model, the stand-in answers
MIN_REQUESTS = 30
PROGRESS_EVERY_S = 15.0
WARM_UP_REQUESTS = 8
WARM_UP_BUDGET_S = 90.0

#: every process the quickstart started, each in its own process group: stopped on any exit
STARTED: list[subprocess.Popen[bytes]] = []


def spawn(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a child in its own process group, remembered so that :func:`stop_all` ends it whatever happens."""
    proc: subprocess.Popen[bytes] = subprocess.Popen(list(argv), start_new_session=True, **kwargs)
    STARTED.append(proc)
    return proc


def run_child(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    """:func:`spawn` and wait: a child that a signal to the quickstart also stops (with its own children)."""
    proc = spawn(argv, stdout=kwargs.pop("stdout", subprocess.PIPE), stderr=kwargs.pop("stderr", subprocess.PIPE),
                 **kwargs)
    out, err = proc.communicate()
    STARTED.remove(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def handle_signals() -> None:
    """SIGTERM (``timeout``, ``kill``, make stopped from outside) and SIGHUP (a closed terminal) stop the
    quickstart as Ctrl-C does: through the ``finally`` that stops every child. SIGINT is handled explicitly too:
    a process started in the background of a non-interactive shell (``cmd &`` in a CI script) inherits SIGINT
    ignored, and Python then installs no Ctrl-C handler of its own, so an interrupt was silently ignored."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)


def stop_all() -> None:
    """Stop every child still running, newest first; a second Ctrl-C or SIGTERM meanwhile cannot cut it short."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while STARTED:
        stop(STARTED.pop())


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
            {"conn_type": "synth_openai", "password": LOCAL_KEY, "host": f"http://127.0.0.1:{port}/v1"})
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
    done = run_child([str(VLLM_PYTHON), str(REPO / "scripts" / "build_smollm2.py")],
                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        print(f"SmolLM2 could not be built ({done.stderr.decode(errors='replace').strip()[-600:]}): answers come "
              "from the stand-in", flush=True)
        return None
    return Path(done.stdout.decode().strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def vllm_command(model: Path, port: int, dtype: str | None = None) -> list[str]:
    """vLLM's OpenAI server on 127.0.0.1 (``vllm serve`` needs package metadata the CPU build lacks), in
    ``dtype`` (default: the one this CPU runs natively)."""
    if dtype is None:
        from airflow_provider_synth.engine.vllm.process import cpu_dtype

        dtype = cpu_dtype()[0]
    return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", SERVED_MODEL, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
            "--enforce-eager", "--max-model-len", "2048", "--kv-cache-memory-bytes", str(1 << 30)]


def start_vllm(model: Path, timeout: float = 600.0) -> tuple[subprocess.Popen[bytes], int] | None:
    """Start vLLM's server in the dtype this CPU runs natively (:func:`cpu_dtype`, said in the output)."""
    from airflow_provider_synth.engine.vllm.process import cpu_dtype, engine_env

    port = _free_port()
    log_path = HOME / "vllm-server.log"
    env = engine_env({"HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}, pythonpath="")
    dtype, why = cpu_dtype()
    print(f"vLLM runs in {dtype}: {why}", flush=True)
    with open(log_path, "wb") as log:
        proc = spawn(vllm_command(model, port, dtype), stdout=log, stderr=subprocess.STDOUT, env=env)
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


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """End ``proc``'s whole process group: SIGTERM, then SIGKILL after ``grace`` seconds (and for whatever of
    the group outlived its leader)."""
    if proc in STARTED:
        STARTED.remove(proc)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        proc.poll()
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def start_server(upstream_port: int | None = None, options: list[str] | None = None
                 ) -> tuple[subprocess.Popen[bytes], int]:
    """Start the local Batch API server (``options``: its address and state; default any free port),
    as a gateway to vLLM's server on ``upstream_port`` when given."""
    port_file = HOME / "server.port"
    port_file.unlink(missing_ok=True)
    log = open(HOME / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    # 32 is a cap: the gateway sends only as many at once as vLLM sustains, the rest wait on its side
    upstream = [] if upstream_port is None else [
        "--upstream", f"http://127.0.0.1:{upstream_port}/v1", "--upstream-model", SERVED_MODEL,
        "--upstream-concurrency", "32"]
    proc = spawn(
        [sys.executable, "-m", "airflow_provider_synth.server", *(options or ["--port", "0"]), "--port-file",
         str(port_file), "--validating-s", "1", "--in-progress-s", "4", "--finalizing-s", "1", *upstream],
        stdout=log, stderr=subprocess.STDOUT)
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


def dag_constants() -> dict[str, Any]:
    """The quickstart DAG's records and request settings, read from its file (importing it would need Airflow
    configured): the warm-up asks what the DAG will ask."""
    tree = ast.parse(DAG_FILE.read_text())
    names = {"SEEDS", "STYLES", "PROMPT", "SYSTEM", "PARAMS"}
    return {target.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name) and target.id in names}


def _post_json(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return dict(json.loads(answer.read()))


def _get_json(url: str, timeout: float = 5.0) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {LOCAL_KEY}"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return dict(json.loads(answer.read()))


def generated_tokens(vllm_port: int) -> float | None:
    """vLLM's count of generated tokens so far (``/metrics``), or None where it cannot be read."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{vllm_port}/metrics", timeout=5) as answer:
            text = answer.read().decode(errors="replace")
    except OSError:
        return None
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("vllm:generation_tokens_total")]
    return sum(values) if values else None


@dataclass
class Speed:
    """What the warm-up measured: the engine's tokens per second with several requests at once, and how many
    tokens one of the DAG's answers takes."""

    tokens_per_s: float
    tokens_per_answer: float

    def seconds_for(self, requests: int) -> float:
        return requests * self.tokens_per_answer / max(self.tokens_per_s, 1e-6)


def measure_speed(vllm_port: int, n: int = WARM_UP_REQUESTS, budget_s: float = WARM_UP_BUDGET_S) -> Speed:
    """Send ``n`` of the DAG's requests to vLLM at once and time them (at most ``budget_s``: a slower engine is
    measured by its token counter). The first answer also warms the engine up."""
    dag = dag_constants()
    url = f"http://127.0.0.1:{vllm_port}/v1/chat/completions"
    bodies = [{"model": SERVED_MODEL, "messages": [
        {"role": "system", "content": dag["SYSTEM"]},
        {"role": "user", "content": dag["PROMPT"].format(persona=dag["SEEDS"][-1 - i],
                                                         style=dag["STYLES"][-1 - i % len(dag["STYLES"])])}],
        **dag["PARAMS"]} for i in range(n)]
    lengths: list[int] = []

    def ask(body: dict[str, Any]) -> None:
        try:
            lengths.append(int(_post_json(url, body, budget_s)["usage"]["completion_tokens"]))
        except (OSError, KeyError, ValueError):
            pass

    _post_json(url, {**bodies[0], "max_completion_tokens": 4}, budget_s)  # the first request pays the warm-up
    before, started = generated_tokens(vllm_port), time.monotonic()
    threads = [threading.Thread(target=ask, args=(body,), daemon=True) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, budget_s - (time.monotonic() - started)))
    elapsed = time.monotonic() - started
    after = generated_tokens(vllm_port)
    tokens = (after - before) if before is not None and after is not None else float(sum(lengths))
    per_answer = sum(lengths) / len(lengths) if lengths else float(dag["PARAMS"]["max_completion_tokens"])
    return Speed(tokens / max(elapsed, 1e-6), per_answer)


def run_budget(elapsed: float) -> float:
    """Seconds the DAG run may take for the quickstart to end after about :data:`TARGET_S`."""
    return max(TARGET_S / 3, TARGET_S - elapsed)


def plan_requests(speed: Speed, wanted: int | None, budget_s: float, total: int = 300) -> int | None:
    """How many of the DAG's requests to send so the run takes about ``budget_s``; ``wanted`` (the user's
    ``SYNTH_QUICKSTART_REQUESTS``) is kept as asked. None: too slow for even :data:`MIN_REQUESTS`."""
    if wanted is not None:
        return wanted
    fits = int((budget_s - AIRFLOW_OVERHEAD_S) * speed.tokens_per_s / max(speed.tokens_per_answer, 1.0))
    if fits < MIN_REQUESTS:
        return None
    return min(total, fits)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def size_run(vllm_port: int) -> int | None:
    """Measure vLLM, then say how long the run will take and how many requests it sends (None: the machine is
    too slow, the stand-in answers)."""
    print(f"measuring vLLM's speed ({WARM_UP_REQUESTS} of the DAG's requests at once)", flush=True)
    try:
        speed = measure_speed(vllm_port)
    except OSError as exc:
        print(f"vLLM did not answer the warm-up ({exc}; see {HOME / 'vllm-server.log'}): answers come from the "
              "stand-in", flush=True)
        return None
    raw = os.environ.get("SYNTH_QUICKSTART_REQUESTS")
    elapsed = time.monotonic() - STARTED_AT
    budget = run_budget(elapsed)
    n = plan_requests(speed, int(raw) if raw else None, budget)
    line = (f"vLLM answers at {speed.tokens_per_s:.0f} tokens/s here (about {speed.tokens_per_answer:.0f} tokens "
            "an answer)")
    if n is None:
        print(f"{line}: even {MIN_REQUESTS} answers would take about "
              f"{_minutes(speed.seconds_for(MIN_REQUESTS) + AIRFLOW_OVERHEAD_S)}, too slow for a first run. "
              "This run uses the local server's stand-in instead (SYNTH_QUICKSTART_REQUESTS=N make quickstart "
              "runs N real answers anyway).", flush=True)
        return None
    expected = speed.seconds_for(n) + AIRFLOW_OVERHEAD_S
    sized = "" if n == 300 or raw else f" (of 300, to end the quickstart in about {_minutes(TARGET_S)}; " \
        "SYNTH_QUICKSTART_REQUESTS=300 for all)"
    print(f"{line}: {n} requests{sized}; the run should take about {_minutes(expected)}, the whole quickstart "
          f"about {_minutes(elapsed + expected)}", flush=True)
    return n


class Progress:
    """Prints the run's progress every :data:`PROGRESS_EVERY_S` seconds, from the local server's batches and
    vLLM's token counter: answered, failed, of how many, tokens/s, time left."""

    def __init__(self, port: int, vllm_port: int | None, total: int) -> None:
        self.port, self.vllm_port, self.total = port, vllm_port, total
        self.started = time.time()
        self._first: tuple[float, int, float | None] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="quickstart-progress")

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def counts(self) -> tuple[int, int, int] | None:
        """(answered, failed, total) over this run's batches, or None before the first one exists."""
        try:
            batches = _get_json(f"http://127.0.0.1:{self.port}/v1/batches?limit=100")["data"]
        except (OSError, KeyError, ValueError):
            return None
        mine = [b for b in batches if b.get("created_at", 0) >= int(self.started) - 1]
        if not mine:
            return None
        counts = [b.get("request_counts") or {} for b in mine]
        return (sum(c.get("completed", 0) for c in counts), sum(c.get("failed", 0) for c in counts),
                sum(c.get("total", 0) for c in counts) or self.total)

    def line(self) -> str:
        now = time.time()
        elapsed = _minutes(now - self.started)
        counts = self.counts()
        if counts is None:
            return f"progress: Airflow is starting the task, no batch yet ({elapsed})"
        answered, failed, total = counts
        tokens = generated_tokens(self.vllm_port) if self.vllm_port is not None else None
        if self._first is None:
            self._first = (now, answered + failed, tokens)
        t0, done0, tokens0 = self._first
        rate = (answered + failed - done0) / (now - t0) if now > t0 else 0.0
        speed = f", {(tokens - tokens0) / (now - t0):.0f} tokens/s" if tokens is not None and tokens0 is not None \
            and now > t0 else ""
        left = f", about {_minutes((total - answered - failed) / rate)} left" if rate > 0 else ""
        return f"progress: {answered}/{total} answered, {failed} failed{speed}{left} ({elapsed})"

    def _loop(self) -> None:
        while not self._stop.wait(PROGRESS_EVERY_S):
            print(self.line(), flush=True)


def main() -> int:
    handle_signals()
    try:
        return quickstart()
    except KeyboardInterrupt as stopped:
        print(f"\nstopped ({stopped or 'Ctrl-C'}): ending every process the quickstart started", flush=True)
        return 130
    finally:
        stop_all()


def quickstart() -> int:
    HOME.mkdir(exist_ok=True)
    env = airflow_env()
    print("initializing Airflow (SQLite) in", HOME, flush=True)
    migrated = run_child([str(BIN / "airflow"), "db", "migrate"], env=env)
    if migrated.returncode != 0:
        raise SystemExit(f"airflow db migrate failed: {migrated.stderr.decode(errors='replace')[-2000:]}")
    model = real_model()
    vllm = start_vllm(model) if model is not None else None
    requests = size_run(vllm[1]) if vllm is not None else None
    if vllm is not None and requests is None:
        stop(vllm[0])
        vllm = None
    proc, port = start_server(vllm[1] if vllm is not None else None)
    print(f"local Batch API server on http://127.0.0.1:{port}/v1 (pid {proc.pid})"
          + (f", answering through {SERVED_MODEL}" if vllm is not None else ", stand-in answers"), flush=True)
    return run_dag(port, REAL_NOTE if vllm is not None else STAND_IN_NOTE, vllm[1] if vllm is not None else None,
                   requests)


def run_dag(port: int, note: str, vllm_port: int | None = None, requests: int | None = None) -> int:
    start = time.time()
    log_path = HOME / "quickstart.log"
    env = airflow_env(port)
    if requests is not None:
        env["SYNTH_QUICKSTART_REQUESTS"] = str(requests)
    print("running: airflow dags test synth_quickstart  (log:", log_path, ")", flush=True)
    with open(log_path, "wb") as log, Progress(port, vllm_port, requests or 300):
        rc = run_child([str(BIN / "airflow"), "dags", "test", "synth_quickstart"], env=env, stdout=log,
                       stderr=subprocess.STDOUT).returncode
    if rc != 0 or b"state=failed" in log_path.read_bytes():
        sys.stdout.write(log_path.read_bytes()[-4000:].decode(errors="replace"))
        print(f"\nthe quickstart DAG failed (exit {rc}); full log: {log_path}")
        return 1
    summary(start, note)
    print(f"took {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
