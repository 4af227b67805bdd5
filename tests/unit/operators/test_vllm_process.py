"""The vLLM engine's process: allow-listed environment, death with its task, one engine per output file.

The engine is the real runner in a real subprocess with the fake ``LLM`` (airflow_provider_synth.testing.vllm);
tests/integration/test_vllm_engine.py repeats the kill test with the real engine.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest

from airflow_provider_synth.engine.vllm.process import (
    EXIT_LOCKED,
    TASK_PID_ENV,
    acquire_output_lock,
    engine_env,
    read_owner,
    reclaim_output,
    task_ended,
)
from airflow_provider_synth.testing.vllm import write_fake_python

REPO = Path(__file__).resolve().parents[3]
LOG = logging.getLogger("test")


def chat(cid: str) -> bytes:
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"question {cid}"}], "max_tokens": 4}
    return orjson.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})


def context() -> dict:
    return {"ti": SimpleNamespace(try_number=1, dag_id="d", task_id="t", run_id="r", map_index=-1)}


def test_engine_env_is_an_allow_list() -> None:
    worker = {
        "PATH": "/bin", "HOME": "/home/w", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TMPDIR": "/tmp/w",
        "CUDA_VISIBLE_DEVICES": "0,1", "NVIDIA_VISIBLE_DEVICES": "all", "HF_HOME": "/hf", "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "4", "OMP_NUM_THREADS": "2", "TORCHINDUCTOR_CACHE_DIR": "/c",
        "TOKENIZERS_PARALLELISM": "false", "LD_LIBRARY_PATH": "/usr/local/cuda/lib64",
        # never: connections, variables, keys, tokens, passwords, anything else of the worker's
        "AIRFLOW_CONN_WAREHOUSE": "postgres://u:p@h/db", "AIRFLOW_VAR_PLAN": "x", "AIRFLOW__CORE__FERNET_KEY": "k",
        "OPENAI_API_KEY": "sk-1", "VLLM_API_KEY": "v", "HF_TOKEN": "hf_1", "HUGGING_FACE_HUB_TOKEN": "hf_2",
        "CUDA_SECRET_THING": "s", "DB_PASSWORD": "pw", "AWS_SECRET_ACCESS_KEY": "a", "PYTHONPATH": "/airflow/dags",
        "SYNTH_UPSTREAM_API_KEY": "u", "RANDOM_SETTING": "r",
    }
    env = engine_env({"HF_TOKEN": "hf_given", "PYTHONPATH": "/extra", "MY_FLAG": "1"}, pythonpath="/shim",
                     environ=worker)
    inherited = {k for k in worker if k in env and env[k] == worker[k]}
    assert inherited == {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
                         "HF_HOME", "HF_HUB_OFFLINE", "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS",
                         "TORCHINDUCTOR_CACHE_DIR", "TOKENIZERS_PARALLELISM", "LD_LIBRARY_PATH"}
    assert env["HF_TOKEN"] == "hf_given" and env["MY_FLAG"] == "1"  # what the user passes goes as given
    assert env["PYTHONPATH"] == os.pathsep.join(["/shim", "/extra"])  # never the worker's own PYTHONPATH
    assert env[TASK_PID_ENV] == str(os.getpid())


def test_the_engine_process_sees_only_the_allow_list(tmp_path, monkeypatch) -> None:
    from airflow_provider_synth.operators.vllm import VLLMBatchOperator

    fake = write_fake_python(tmp_path / "vllm-python")
    dump = tmp_path / "engine-env.json"
    wrapper = tmp_path / "env-python"  # records the environment the engine process starts with
    wrapper.write_text(f'#!/bin/sh\n"{sys.executable}" -c "import json, os, sys; '
                       f'json.dump(dict(os.environ), open(sys.argv[1], \'w\'))" "{dump}"\nexec "{fake}" "$@"\n')
    wrapper.chmod(0o755)
    for name, value in {"AIRFLOW_CONN_WAREHOUSE": "postgres://u:secret@h/db", "AIRFLOW_VAR_KEY": "v",
                        "OPENAI_API_KEY": "sk-worker", "MY_SERVICE_PASSWORD": "pw", "HF_TOKEN": "hf_worker",
                        "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(chat(f"r{i}") for i in range(4)) + b"\n")
    manifest = VLLMBatchOperator(task_id="v", input_path=str(src), output_path=str(tmp_path / "out"), model="tiny",
                                 python=str(wrapper), env={"HF_TOKEN": "hf_for_the_engine"}).execute(context())
    assert manifest["succeeded"] == 4
    seen = json.loads(dump.read_text())
    assert not [k for k in seen if k.startswith(("AIRFLOW_CONN_", "AIRFLOW_VAR_"))]
    assert "OPENAI_API_KEY" not in seen and "MY_SERVICE_PASSWORD" not in seen
    assert not any(v in json.dumps(seen) for v in ("secret@h", "sk-worker", "hf_worker"))
    assert seen["HF_TOKEN"] == "hf_for_the_engine" and seen["HF_HUB_OFFLINE"] == "1" and seen["OMP_NUM_THREADS"] == "1"
    assert seen["PATH"] == os.environ["PATH"]


def test_a_second_engine_on_the_same_output_refuses_to_start(tmp_path) -> None:
    output = tmp_path / "engine-output.jsonl"
    config = tmp_path / "run.json"
    src = tmp_path / "in.jsonl"
    src.write_bytes(chat("a") + b"\n")
    config.write_text(json.dumps({"input": str(src), "output": str(output), "model": "tiny"}))
    fd = acquire_output_lock(output)
    assert fd is not None and read_owner(output)["pid"] == os.getpid()
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-m", "airflow_provider_synth.engine.vllm", "--config",
                               str(config)], capture_output=True, env=env, timeout=60, start_new_session=True)
    finally:
        os.close(fd)
    assert done.returncode == EXIT_LOCKED, done.stdout + done.stderr
    event = json.loads(done.stdout.splitlines()[-1])
    assert event["synth_vllm"] == "error" and event["kind"] == "locked"
    assert not output.exists()  # nothing appended


def test_a_retry_waits_for_a_leftover_engine_then_ends_it(tmp_path, caplog) -> None:
    output = tmp_path / "engine-output.jsonl"
    holder = subprocess.Popen(  # a leftover engine: holds the lock and never ends on its own
        [sys.executable, "-c", "import sys, time; from airflow_provider_synth.engine.vllm.process import "
         "acquire_output_lock; assert acquire_output_lock(sys.argv[1]) is not None; print('locked', flush=True); "
         "time.sleep(600)", str(output)],
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        assert read_owner(output)["pid"] == holder.pid
        started = time.monotonic()
        with caplog.at_level(logging.INFO):
            reclaim_output(output, LOG, wait=0.5)
        assert time.monotonic() - started >= 0.5  # waited first
        assert holder.wait(timeout=10) == -signal.SIGKILL
        assert "Ended the leftover vLLM engine" in caplog.text
        fd = acquire_output_lock(output)
        assert fd is not None
        os.close(fd)
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()
    reclaim_output(tmp_path / "never-used.jsonl", LOG)  # no lock file: nothing to do


TASK = """
import sys
from types import SimpleNamespace
from airflow_provider_synth.operators.vllm import VLLMBatchOperator

src, out, python = sys.argv[1:4]
VLLMBatchOperator(task_id="v", input_path=src, output_path=out, model="tiny", python=python, chunk_size=2,
                  env={"SYNTH_FAKE_VLLM_DELAY": "4"}).execute(
    {"ti": SimpleNamespace(try_number=1, dag_id="d", task_id="t", run_id="r", map_index=-1)})
"""


def test_the_engine_dies_with_its_task(tmp_path, group_members) -> None:
    """SIGKILL the task's whole process group: no on_kill, no clean-up. The python is a wrapper script that does
    not exec (so no parent-death signal reaches the runner), and each engine call takes 4 s (so no write to the
    dead task's pipe stops the runner sooner): the watchdog alone ends the engine, within 2 s."""
    fake = write_fake_python(tmp_path / "fake-python")
    wrapper = tmp_path / "wrapper-python"
    wrapper.write_text(f'#!/bin/sh\n"{fake}" "$@"\n')
    wrapper.chmod(0o755)
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(chat(f"r{i:03d}") for i in range(60)) + b"\n")
    out = tmp_path / "out"
    engine_output = out / "_vllm" / "engine-output.jsonl"
    log = (tmp_path / "task.log").open("wb")
    task = subprocess.Popen([sys.executable, "-c", TASK, str(src), str(out), str(wrapper)], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)},
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (engine_output.exists() and engine_output.read_bytes().count(b"\n") >= 2):
            assert task.poll() is None and time.monotonic() < deadline, (tmp_path / "task.log").read_text()
            time.sleep(0.05)
        owner = read_owner(engine_output)
        assert owner["task_pid"] == task.pid and group_members(owner["pgid"])
        os.killpg(task.pid, signal.SIGKILL)
        killed = time.monotonic()
        task.wait()
        while group_members(owner["pgid"]) and time.monotonic() - killed < 5:
            time.sleep(0.02)
        gone_after = time.monotonic() - killed
        assert not group_members(owner["pgid"]) and gone_after < 2.0, gone_after
    finally:
        if task.poll() is None:
            os.killpg(task.pid, signal.SIGKILL)
        log.close()
    answered = engine_output.read_bytes().count(b"\n")
    assert 2 <= answered < 60

    from airflow_provider_synth.operators.vllm import VLLMBatchOperator

    manifest = VLLMBatchOperator(task_id="v", input_path=str(src), output_path=str(out), model="tiny",
                                 python=str(fake)).execute(context())
    assert (manifest["total"], manifest["succeeded"], manifest["duplicates"]) == (60, 60, 0)
    ids = [orjson.loads(x)["custom_id"] for x in engine_output.read_bytes().splitlines()]
    assert sorted(ids) == [f"r{i:03d}" for i in range(60)]  # every id exactly once


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")
def test_parent_death_signal_is_set() -> None:
    code = ("import ctypes, signal; from airflow_provider_synth.engine.vllm.process import set_parent_death_signal; "
            "assert set_parent_death_signal(signal.SIGKILL); v = ctypes.c_int(); "
            "ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); print(v.value)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.strip() == str(int(signal.SIGKILL))


@pytest.mark.parametrize("first", ["task", "runner"])
def test_the_watchdog_acts_only_on_the_tasks_death(first: str) -> None:
    short, long = (subprocess.Popen(["sleep", s]) for s in ("0.3", "30"))
    task, runner = (short, long) if first == "task" else (long, short)
    try:
        started = time.monotonic()
        assert task_ended(task.pid, runner.pid, grace=0.2) is (first == "task")
        assert time.monotonic() - started < 5
    finally:
        for proc in (short, long):
            proc.kill()
            proc.wait()
