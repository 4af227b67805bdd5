"""The quickstart sizes its real-model run to the speed it measured (issue 24)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def quickstart(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    monkeypatch.delitem(sys.modules, "quickstart", raising=False)
    import quickstart as module

    return module


def test_a_slow_engine_gets_fewer_requests_a_fast_one_all(quickstart: ModuleType) -> None:
    speed = quickstart.Speed
    # this 2-core machine under load, float32: 14 tokens/s, 78 tokens an answer
    assert quickstart.plan_requests(speed(14.0, 78.0), None, 600.0) == 96
    assert quickstart.plan_requests(speed(200.0, 78.0), None, 600.0) == 300
    assert quickstart.plan_requests(speed(2.0, 78.0), None, 600.0) is None, "too slow: the stand-in answers"
    assert quickstart.plan_requests(speed(2.0, 78.0), 40, 600.0) == 40, "the user's choice is kept"
    assert speed(14.0, 78.0).seconds_for(96) == pytest.approx(534.9, abs=0.1)


def test_the_run_gets_what_is_left_of_the_target(quickstart: ModuleType) -> None:
    assert quickstart.run_budget(240.0) == quickstart.TARGET_S - 240.0
    assert quickstart.run_budget(10_000.0) == quickstart.TARGET_S / 3


def test_the_warm_up_asks_what_the_dag_asks(quickstart: ModuleType) -> None:
    dag = quickstart.dag_constants()
    assert len(dag["SEEDS"]) * len(dag["STYLES"]) == 300
    assert "{persona}" in dag["PROMPT"] and dag["PARAMS"]["max_completion_tokens"] == 120
