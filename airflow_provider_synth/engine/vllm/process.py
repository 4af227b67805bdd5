"""The vLLM engine's process: its environment, its lifetime bound to the task's, and its output file's lock.

Both sides use this module: the operator (in Airflow's interpreter) builds the engine's environment and clears
a leftover engine before it starts one; the runner (in the vLLM interpreter) calls :func:`guard_engine` first
thing, before vLLM starts any thread or process. Standard library only.

* **Environment.** The engine gets an allow-list of the worker's variables (what vLLM, CUDA, Hugging Face and
  the model need), never Airflow connections, variables or anything named like a secret; the operator's
  ``env`` is added as given.
* **The engine dies with its task.** A watchdog process, forked by the runner into the engine's process group,
  waits on a pidfd of the task's process (and of the runner). When the task ends it kills the whole group at
  once, writing nothing first: a write to the dead task's pipe would fail and stop it before it kills. When the
  runner ends first (done, or crashed while its task lives) it just leaves: the task clears what is left. The
  runner also asks the kernel to SIGKILL it when its parent dies (``PR_SET_PDEATHSIG``).
* **One engine per output file.** The runner holds an exclusive ``flock`` on ``<output>.lock`` (which records
  its pid and process group) while it runs; the lock is shared with every process it forks. A second engine
  refuses to start; the operator of a retry first waits for a leftover engine to go, then ends it.
* **The dtype a CPU runs natively.** :func:`cpu_dtype` is the one decision for every place that starts vLLM on
  a CPU with a default dtype (the runner on a CPU node, the quickstart's server, the test helpers): bfloat16
  only where the CPU has it, else float32 (bfloat16 is emulated there: 4.8x slower, measured).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

#: Exit code of a runner that found another engine writing its output file.
EXIT_LOCKED = 6
#: The environment variable that tells the runner which process is the task (the operator's pid).
TASK_PID_ENV = "SYNTH_VLLM_TASK_PID"
LOCK_SUFFIX = ".lock"

#: Variables the engine inherits from the worker, by exact name and by prefix.
ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "LD_LIBRARY_PATH",
    "LD_PRELOAD", "CC", "CXX", "PYTHONIOENCODING", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
})
ENV_PREFIXES = (
    "LC_", "XDG_", "CUDA_", "NVIDIA_", "NCCL_", "GLOO_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_",
    "VLLM_", "OMP_", "KMP_", "MKL_", "TORCH", "PYTORCH_", "TRITON_", "ROCM_", "HIP_", "HSA_", "ROCR_",
)
#: Never inherited, whatever the allow-list says (the operator's ``env`` may still pass one explicitly).
_DENIED_PREFIXES = ("AIRFLOW_CONN_", "AIRFLOW_VAR_")
_DENIED_PARTS = ("SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "API_KEY", "APIKEY", "ACCESS_KEY", "PRIVATE_KEY")


def _denied(name: str) -> bool:
    upper = name.upper()
    return (upper.startswith(_DENIED_PREFIXES) or any(p in upper for p in _DENIED_PARTS)
            or "TOKEN" in upper.split("_"))


def inherited(name: str) -> bool:
    """Whether the engine inherits the worker's variable ``name``."""
    return (name in ENV_NAMES or name.startswith(ENV_PREFIXES)) and not _denied(name)


def engine_env(explicit: Mapping[str, str], *, pythonpath: str, environ: Mapping[str, str] | None = None
               ) -> dict[str, str]:
    """The engine's environment: the allow-listed part of the worker's, then ``explicit`` (the operator's
    ``env``, taken as given), ``PYTHONPATH`` (this provider's package first) and the task's pid.

    :param explicit: variables the user set for the engine.
    :param pythonpath: the folder holding this provider's package (prepended to the user's PYTHONPATH).
    :param environ: the worker's environment (default: ``os.environ``).
    """
    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if inherited(k)}
    env.update(explicit)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, explicit.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env[TASK_PID_ENV] = str(os.getpid())
    return env


# ------------------------------------------------------------------------------------------------ the dtype

#: /proc/cpuinfo flags of native bfloat16 arithmetic: x86 AVX-512 BF16 and AMX; aarch64 ``bf16``.
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
CPUINFO = "/proc/cpuinfo"


def cpu_dtype(cpuinfo: str | None = None) -> tuple[str, str]:
    """The dtype vLLM should run in on this CPU, and why (for the log): ``"bfloat16"`` where the CPU computes
    it natively (AVX-512 BF16 or AMX on x86, the BF16 extension on aarch64), else ``"float32"``: a CPU without
    it emulates bfloat16, which measured 12.7 tokens/s against 60.6 in float32 for SmolLM2-135M on 2 AVX2 cores.

    :param cpuinfo: the text of ``/proc/cpuinfo`` (default: read it; where it cannot be read, float32).
    """
    if cpuinfo is None:
        try:
            with open(CPUINFO, encoding="utf-8", errors="replace") as fp:
                cpuinfo = fp.read()
        except OSError:
            return "float32", f"no {CPUINFO} to tell whether this CPU has native bfloat16: float32 is safe"
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    native = [f for f in BF16_FLAGS if f in flags]
    if native:
        return "bfloat16", f"this CPU computes bfloat16 natively ({', '.join(native)} in {CPUINFO})"
    return "float32", (f"this CPU has no native bfloat16 (none of {', '.join(BF16_FLAGS)} in {CPUINFO}'s flags): "
                       "vLLM would emulate it, about 5x slower than float32")


# ------------------------------------------------------------------------------------------------ the lock


def lock_path(output: str | os.PathLike[str]) -> str:
    return os.fspath(output) + LOCK_SUFFIX


def read_owner(output: str | os.PathLike[str]) -> dict[str, Any]:
    """What the last engine on ``output`` recorded about itself (pid, pgid, task_pid, host); {} if nothing."""
    try:
        with open(lock_path(output), "rb") as fp:
            data = json.loads(fp.read() or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def acquire_output_lock(output: str | os.PathLike[str], task_pid: int | None = None) -> int | None:
    """Take the engine's lock on ``output`` and record this process as its owner; return the lock's file
    descriptor (keep it open: the lock lives as long as it, in this process and the processes it forks), or
    ``None`` when another engine holds it."""
    fd = os.open(lock_path(output), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    owner = {"pid": os.getpid(), "pgid": os.getpgid(0), "task_pid": task_pid, "host": socket.gethostname(),
             "started_at": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    return fd


def end_leftover(owner: Mapping[str, Any], log: Any) -> bool:
    """SIGKILL the process group of a leftover engine recorded in ``owner`` (on this host, still its group's
    leader's group); return whether one was signalled."""
    pid, pgid = owner.get("pid"), owner.get("pgid")
    if not isinstance(pid, int) or not isinstance(pgid, int) or owner.get("host") != socket.gethostname():
        return False
    try:
        if os.getpgid(pid) != pgid:
            return False
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    log.warning("Ended the leftover vLLM engine of an earlier try (pid %d, process group %d)", pid, pgid)
    return True


def reclaim_output(output: str | os.PathLike[str], log: Any, wait: float = 10.0) -> None:
    """Before an engine starts on ``output``: when an earlier try's engine still holds the lock, wait up to
    ``wait`` seconds for it to go (its watchdog ends it within moments of its task's death), then end it.

    :raises RuntimeError: when the lock stays held (an engine on another host, or one that cannot be ended).
    """
    if not os.path.exists(lock_path(output)):
        return
    fd = os.open(lock_path(output), os.O_RDWR)
    try:
        if _wait_for_lock(fd, 0.0):
            return
        owner = read_owner(output)
        log.warning("An earlier vLLM engine still holds %s (%s); waiting up to %.0f s for it to end",
                    lock_path(output), owner, wait)
        if _wait_for_lock(fd, wait) or (end_leftover(read_owner(output), log) and _wait_for_lock(fd, 10.0)):
            return
        raise RuntimeError(f"another vLLM engine still writes {output} ({read_owner(output) or 'owner unknown'});"
                           " two engines must never append to one output file")
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _wait_for_lock(fd: int, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------- the watchdog

_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent (thread) dies. Linux only."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def task_ended(task_pid: int, runner_pid: int, grace: float = 0.5) -> bool:
    """Wait until the task or the runner ends; return whether the task did. A runner that ends on its own
    (done, or crashed while its task lives) leaves the clean-up to the task, which is still there to do it."""
    task_fd, runner_fd = _pidfd(task_pid), _pidfd(runner_pid)
    if task_fd is None or runner_fd is None:  # no pidfds here, or one of them is already gone: poll
        while _alive(task_pid) and _alive(runner_pid):
            time.sleep(0.1)
        return not _alive(task_pid)
    while True:
        try:
            ready, _, _ = select.select([task_fd, runner_fd], [], [])
        except InterruptedError:
            continue
        if task_fd in ready:
            return True
        # the runner ended first: the kernel's parent-death signal may have killed it as its task died
        ready, _, _ = select.select([task_fd], [], [], grace)
        return bool(ready)


def _watch(task_pid: int, runner_pid: int, pgid: int) -> None:
    """The watchdog process: silent; when the task dies it kills the engine's whole process group."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # never hold (or write to) the task's pipe
        os.dup2(devnull, fd)
    if task_ended(task_pid, runner_pid):
        os.killpg(pgid, signal.SIGKILL)
    os._exit(0)


def guard_engine(output: str, emit: Callable[..., None]) -> int:
    """Bind this runner's life and its engine's to the task's, and take the output file's lock. Call it first,
    before vLLM starts a thread or a process. Returns the lock's file descriptor (keep it).

    :param output: the engine's output file.
    :param emit: the runner's event writer (for the refusal when another engine holds the lock).
    :raises SystemExit: ``EXIT_LOCKED`` when another engine writes ``output``.
    """
    task_pid = int(os.environ.get(TASK_PID_ENV) or os.getppid())
    pgid = os.getpgid(0)
    if TASK_PID_ENV not in os.environ and pgid != os.getpid():
        # started by hand inside another program's group: the group the watchdog ends must be the engine's alone
        # (the operator starts the engine, or a wrapper script around it, in a session of its own)
        os.setpgid(0, 0)
        pgid = os.getpid()
    fd = acquire_output_lock(output, task_pid)
    if fd is None:
        emit("error", kind="locked", message=f"another vLLM engine is writing {output} "
             f"({read_owner(output) or 'owner unknown'}): not starting a second one")
        raise SystemExit(EXIT_LOCKED)
    # the kernel kills this runner with its parent (the task, unless a wrapper script sits between them)
    set_parent_death_signal(signal.SIGKILL)
    runner = os.getpid()
    if os.fork() == 0:
        try:
            _watch(task_pid, runner, pgid)
        finally:
            os._exit(0)
    return fd
