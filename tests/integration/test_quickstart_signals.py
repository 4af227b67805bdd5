"""Ctrl-C, SIGTERM, SIGHUP or a timeout of ``make quickstart`` / ``make ui`` stops every process they started.

Each script runs as ``make`` runs it, with a marker in its environment that every process it starts inherits
(whatever its session or process group); after the signal and the script's exit, no process may carry the marker.
Before issue 24, SIGTERM killed the quickstart at once and vLLM's server and the local server ran on at 100% CPU.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
MARK = "SYNTH_TEST_PROCESS_MARK"

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def marked(mark: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``MARK=mark``."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            with open(f"/proc/{proc.pid}/environ", "rb") as fp:
                if needle in fp.read().split(b"\0"):
                    found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def start(script: str, home: Path, extra: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark, "SYNTH_QUICKSTART_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}
    for name in [k for k in env if k.startswith("AIRFLOW__") or k == "AIRFLOW_HOME"]:
        env.pop(name)
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=REPO)
    return proc, mark


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} never came; output:\n{''.join(lines)[-3000:]}")


def family(pid: int, mark: str) -> tuple[set[psutil.Process], set[int]]:
    """The script's processes: those carrying the marker and its descendants (vLLM's server gets an allow-listed
    environment, without the marker), and their process groups."""
    procs = set(marked(mark))
    with contextlib.suppress(psutil.Error):
        procs.update(psutil.Process(pid).children(recursive=True))
    groups = set()
    for p in procs:
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(p.pid))
    return procs, groups


def kill_everything(proc: subprocess.Popen[str], mark: str) -> None:
    """After a failed test too: nothing the script started may outlive it (its children's groups first, while
    the script still holds them as descendants)."""
    procs, groups = family(proc.pid, mark)
    for group in groups - {os.getpgid(0)}:
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)


def stop_and_check(proc: subprocess.Popen[str], mark: str, sig: signal.Signals,
                   group_members: Callable[[int], list[psutil.Process]]) -> str:
    children, groups = family(proc.pid, mark)
    assert len(children) >= 2, "the script started its children"
    proc.send_signal(sig)  # the script alone, as `timeout` or `kill` would: its children are in other groups
    out, _ = proc.communicate(timeout=120)
    left = set(marked(mark)) | {p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}
    left |= {p for g in groups for p in group_members(g)}
    names = [_name(p) for p in left]
    for p in left:  # clean up before failing, so a failure leaves nothing behind either
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not left, f"still running after {sig.name}: {names}"
    assert group_members(proc.pid) == []
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_quickstart_stops_the_server_and_airflow_on_a_signal(
    sig: signal.Signals, tmp_path: Path, group_members: Callable[[int], list[psutil.Process]]
) -> None:
    proc, mark = start("quickstart.py", tmp_path, {"SYNTH_QUICKSTART_BACKEND": "stand-in"})
    try:
        wait_for_line(proc, "running: airflow dags test", 240)
        time.sleep(3)  # airflow dags test has started its own processes
        out = stop_and_check(proc, mark, sig, group_members)
    finally:
        kill_everything(proc, mark)
    assert proc.returncode == 130
    assert "ending every process the quickstart started" in out


@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM interpreter: run `make vllm-venv`")
def test_quickstart_stops_vllms_server_on_a_timeout(
    tmp_path: Path, group_members: Callable[[int], list[psutil.Process]]
) -> None:
    proc, mark = start("quickstart.py", tmp_path, {"SYNTH_QUICKSTART_BACKEND": "vllm"})
    try:
        lines = wait_for_line(proc, "starting vLLM's OpenAI server", 600)
        time.sleep(5)  # vLLM's server is importing, and about to start its engine core process
        stop_and_check(proc, mark, signal.SIGTERM, group_members)  # what `timeout` sends
    finally:
        kill_everything(proc, mark)
    assert any("vLLM runs in " in line for line in lines), "the dtype and why are said"


def test_ui_stops_standalone_and_the_server_on_sigterm(
    tmp_path: Path, group_members: Callable[[int], list[psutil.Process]]
) -> None:
    from airflow_provider_synth.server.server import BatchServer  # noqa: F401  (the [server] extra is there)

    ports = {"SYNTH_UI_SERVER_PORT": str(_free_port()), "SYNTH_UI_API_PORT": str(_free_port())}
    proc, mark = start("ui.py", tmp_path, ports)
    try:
        wait_for_line(proc, "Ctrl-C stops both", 240)
        time.sleep(15)  # airflow standalone has started its scheduler, triggerer, dag-processor, api-server
        stop_and_check(proc, mark, signal.SIGTERM, group_members)
    finally:
        kill_everything(proc, mark)


def _name(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()[:4])
    except psutil.Error:
        return str(proc.pid)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
