"""The first OpenAIBatchTrigger of a triggerer process must not block the loop: Airflow's own detector
(``TriggerRunner.block_watchdog``, "Triggerer's async thread was blocked ... badly-written trigger") stays quiet.

The trigger imports the OpenAI SDK in a worker thread; what held the loop was not the import but a full garbage
collection it set off over the triggerer's heap (0.2-0.4 s). Each run is a fresh interpreter holding what a
triggerer holds (its runner module, hence Airflow's models and SQLAlchemy).
"""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import asyncio, gc, json, sys, time
from airflow.jobs.triggerer_job_runner import TriggerRunner
from airflow_provider_synth.triggers import base
from airflow_provider_synth.triggers.openai_batch import OpenAIBatchTrigger

if sys.argv[1] == "without-the-fix":
    base._without_full_collection = lambda work: work()

full = []
gc.callbacks.append(lambda phase, info: full.append(phase) if info["generation"] == 2 and phase == "stop" else None)

class Log:
    def __init__(self): self.messages = []
    async def ainfo(self, msg, *args): self.messages.append(msg % args)

async def main():
    runner = TriggerRunner.__new__(TriggerRunner)  # only the detector's state: stop flag, log, threshold
    runner.stop, runner.log = False, Log()
    runner.blocked_main_thread_warning_threshold = 0.2
    watchdog = asyncio.create_task(TriggerRunner.block_watchdog(runner))
    await asyncio.sleep(0.3)
    before = len(full)
    await OpenAIBatchTrigger._prepare()
    during = len(full) - before
    await asyncio.sleep(0.3)
    runner.stop = True
    await watchdog
    print(json.dumps({"full_collections": during, "warnings": runner.log.messages}))

asyncio.run(main())
"""


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_first_trigger_does_not_block_the_triggerer_loop() -> None:
    result = _run("with-the-fix")
    assert result["full_collections"] == 0
    assert result["warnings"] == []


def test_without_the_fix_the_import_sets_off_a_full_collection() -> None:
    """The control: what the fix prevents does happen without it (so the test above can fail)."""
    assert _run("without-the-fix")["full_collections"] >= 1
