"""THE budget rule before anything is paid for (``batch.usage.check_budget``), used by every priced backend."""

from __future__ import annotations

import logging

import pytest

from airflow_provider_synth.batch.usage import check_budget
from airflow_provider_synth.exceptions import BudgetExceededError

log = logging.getLogger("budget-test")


def test_within_the_budget_the_estimate_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    check_budget(0.25, 1.0, model="gpt-4o-mini", input_tokens=1000, output_tokens=500, log=log)
    assert "round 0: estimated cost $0.25" in caplog.text and "within max_cost_usd=$1.0" in caplog.text


def test_over_the_budget_nothing_is_paid() -> None:
    with pytest.raises(BudgetExceededError, match=r"over max_cost_usd=\$0.1; nothing was staged"):
        check_budget(0.25, 0.1, model="m", input_tokens=1, output_tokens=1, log=log, what="staged")


def test_an_unknown_price_with_a_budget_refuses() -> None:
    with pytest.raises(BudgetExceededError, match="model 'gpt-4o-mni' has no known price"):
        check_budget(None, 5.0, model="gpt-4o-mni", input_tokens=1, output_tokens=1, log=log)


def test_an_unknown_price_without_a_budget_warns_on_every_backend(caplog: pytest.LogCaptureFixture) -> None:
    check_budget(None, None, model="gpt-4o-mni", input_tokens=0, output_tokens=0, log=log)
    assert "model 'gpt-4o-mni' has no known price" in caplog.text and "cost_usd will be unknown" in caplog.text
    caplog.clear()
    check_budget(None, None, model="claude-haiku-9", input_tokens=0, output_tokens=0, log=log,
                 unknown="model 'claude-haiku-9' has no known price: add it to config.prices")
    assert "add it to config.prices; cost_usd will be unknown (null)" in caplog.text
    caplog.clear()
    check_budget(0.0, None, model="gpt-4o-mini", input_tokens=0, output_tokens=0, log=log)
    assert caplog.text == ""  # a known price and no budget: nothing to say
