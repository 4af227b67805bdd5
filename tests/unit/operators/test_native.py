"""The operator-side native behaviour shared by every batch operator (operators/_native.py): the asset event's
extra, the metric counts, and the OpenLineage datasets and run facet, from one manifest."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from airflow.sdk import Asset, AssetAlias
from airflow.sdk.execution_time.context import OutletEventAccessors

from airflow_provider_synth.operators import _native
from airflow_provider_synth.operators.vllm import VLLMBatchOperator
from airflow_provider_synth.testing.vllm import write_fake_python

MANIFEST = {
    "backend": "openai", "model": "gpt-4o-mini", "total": 10, "succeeded": 7, "failed": 2, "missing": 1,
    "cost_usd": 0.0012346, "output_dir": "s3://bucket/synth/run-1", "results_path": "s3://bucket/synth/run-1/r",
    "failures_path": "f", "manifest_path": "m", "run_id": "r", "dag_id": "d", "task_id": "t", "map_index": -1,
    "batch_ids": ["batch_1"], "work_dir": "s3://bucket/synth/run-1/_work", "error_codes": {"x": 2},
    "usage": {"requests": 7, "prompt_tokens": 700, "completion_tokens": 350, "cached_tokens": 100,
              "reasoning_tokens": 0, "total_tokens": 1050},
}


def test_asset_extra_holds_counts_tokens_cost_and_paths_only() -> None:
    extra = _native.asset_extra(MANIFEST)
    assert (extra["total"], extra["succeeded"], extra["failed"], extra["missing"]) == (10, 7, 2, 1)
    assert extra["cost_usd"] == 0.0012346 and extra["usage"]["prompt_tokens"] == 700
    assert extra["results_path"] == "s3://bucket/synth/run-1/r" and "batch_ids" not in extra
    assert "error_codes" not in extra and json.loads(json.dumps(extra)) == extra  # JSON only
    assert _native.asset_extra({**MANIFEST, "cost_usd": None})["cost_usd"] is None  # unpriced: said so


def test_metric_counts_add_failed_and_missing_and_count_cost_in_micro_dollars() -> None:
    counts = _native.metric_counts(MANIFEST)
    assert counts == {"requests": 10, "requests.succeeded": 7, "requests.failed": 3, "tokens.input": 700,
                      "tokens.output": 350, "tokens.cached": 100, "cost_microusd": 1235}
    assert "cost_microusd" not in _native.metric_counts({**MANIFEST, "cost_usd": None})


def test_emit_metrics_names_the_backend_and_tags_the_task(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.providers.common.compat.sdk import Stats

    sent: list[tuple[str, int, dict]] = []
    monkeypatch.setattr(Stats, "incr", lambda name, count=1, rate=1, *, tags=None: sent.append((name, count, tags)))
    _native.emit_metrics({**MANIFEST, "backend": "cortex", "failed": 0, "missing": 0})
    names = {n: c for n, c, _ in sent}
    assert names["synth.cortex.requests"] == 10 and "synth.cortex.requests.failed" not in names
    assert all(t == {"dag_id": "d", "task_id": "t", "model": "gpt-4o-mini"} for _, _, t in sent)


@pytest.mark.parametrize(("path", "expected"), [
    ("s3://bucket/a/b", ("s3://bucket", "a/b")),
    ("gs://b/x/", ("gs://b", "x/")),
    ("file:///tmp/out", ("file", "/tmp/out")),
    ("/tmp/out", ("file", "/tmp/out")),
])
def test_lineage_dataset_follows_the_openlineage_naming(path: str, expected: tuple[str, str]) -> None:
    assert _native.lineage_dataset(path) == expected


@pytest.fixture
def vllm_op(tmp_path: Path) -> VLLMBatchOperator:
    rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "tiny", "messages": [{"role": "user", "content": f"q {i}"}], "max_tokens": 4}}
            for i in range(5)]
    (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return VLLMBatchOperator(task_id="t", input_path=str(tmp_path / "in.jsonl"), output_path=str(tmp_path / "out"),
                             model="tiny", python=write_fake_python(tmp_path / "py"),
                             outlets=[Asset(name="synth_out", uri="file:///data/synth"), AssetAlias(name="alias")])


def context() -> dict:
    return {"ti": SimpleNamespace(try_number=1, dag_id="d", task_id="t", run_id="r", map_index=-1),
            "outlet_events": OutletEventAccessors()}


def test_a_run_sets_the_asset_events_extra_from_its_manifest(vllm_op: VLLMBatchOperator) -> None:
    ctx = context()
    manifest = vllm_op.execute(ctx)
    extra = ctx["outlet_events"][Asset(name="synth_out", uri="file:///data/synth")].extra
    assert (extra["backend"], extra["total"], extra["succeeded"]) == ("vllm", 5, 5)
    assert extra["usage"]["completion_tokens"] == manifest["usage"]["completion_tokens"] > 0
    assert extra["output_dir"] == manifest["output_dir"]
    assert ctx["outlet_events"][AssetAlias(name="alias")].asset_alias_events == []  # aliases: left to the user


def test_lineage_of_a_finished_run(vllm_op: VLLMBatchOperator) -> None:
    pytest.importorskip("airflow.providers.openlineage")
    assert vllm_op.get_openlineage_facets_on_complete(None).run_facets == {}  # nothing ran in this try
    manifest = vllm_op.execute(context())
    lineage = vllm_op.get_openlineage_facets_on_complete(None)
    assert [(d.namespace, d.name) for d in lineage.inputs] == [("file", vllm_op.input_path)]
    assert [(d.namespace, d.name) for d in lineage.outputs] == [("file", manifest["output_dir"])]
    facet = lineage.run_facets["synthBatch"]
    assert (facet.backend, facet.model, facet.total, facet.succeeded, facet.costUsd) == ("vllm", "tiny", 5, 5, None)
    assert facet.usage["total_tokens"] == manifest["usage"]["total_tokens"]


def test_a_metrics_backend_that_fails_does_not_fail_the_task(vllm_op: VLLMBatchOperator,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def down(manifest: object) -> None:
        raise OSError("statsd host unreachable")

    monkeypatch.setattr(_native, "emit_metrics", down)
    assert vllm_op.execute(context())["succeeded"] == 5


def test_cortex_table_input_is_named_like_the_snowflake_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("airflow.providers.openlineage")
    from airflow_provider_synth.operators.cortex import CortexBatchOperator
    from airflow_provider_synth.runs.cortex_sql import TableSource

    monkeypatch.setenv("AIRFLOW_CONN_SNOWFLAKE_DEFAULT", json.dumps(
        {"conn_type": "snowflake", "login": "u", "password": "p", "schema": "PUBLIC",
         "extra": {"account": "acme-xy123", "database": "SYNTH_DB", "warehouse": "WH"}}))
    op = CortexBatchOperator(task_id="t", output_path="s3://b/out", model="llama3.1-8b",
                             source_table=TableSource(table="tickets", id_column="id", prompt_column="body"))
    assert list(op.lineage_inputs({})) == [("snowflake://acme-xy123", "SYNTH_DB.PUBLIC.TICKETS")]
    op.source_table = TableSource(table="other_db.raw.tickets", id_column="id", prompt_column="body")
    assert list(op.lineage_inputs({})) == [("snowflake://acme-xy123", "OTHER_DB.RAW.TICKETS")]


def test_openai_input_is_the_request_file_built_from_records_when_there_is_one(tmp_path: Path) -> None:
    from airflow_provider_synth.operators.openai_batch import OpenAIBatchOperator, OpenAIBatchResultsOperator

    work = tmp_path / "out" / "_work"
    op = OpenAIBatchOperator(task_id="t", requests=[{"prompt": "x"}], model="m", output_path=str(tmp_path / "out"))
    collect = OpenAIBatchResultsOperator(task_id="c", submitted=str(tmp_path / "out"))
    assert list(op.lineage_inputs({"work_dir": str(work)})) == []  # the submitter was given a file we do not know
    work.mkdir(parents=True)
    (work / "requests.jsonl").write_bytes(b"{}\n")
    for task in (op, collect):
        assert list(task.lineage_inputs({"work_dir": str(work)})) == [("file", str(work / "requests.jsonl"))]
    op.input_path = "s3://bucket/in/requests.jsonl"
    assert list(op.lineage_inputs({"work_dir": str(work)})) == [("s3://bucket", "in/requests.jsonl")]


def test_without_the_openlineage_packages_a_run_still_finishes(vllm_op: VLLMBatchOperator,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    for name in [m for m in sys.modules if m.startswith(("openlineage", "airflow.providers.openlineage"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "openlineage", None)  # `import openlineage...` now raises ImportError
    monkeypatch.setitem(sys.modules, "airflow.providers.openlineage", None)
    _native._run_facet_class.cache_clear()
    assert vllm_op.execute(context())["succeeded"] == 5
    with pytest.raises(ImportError):  # only the OpenLineage provider calls this, and only when installed
        vllm_op.get_openlineage_facets_on_complete(None)
    _native._run_facet_class.cache_clear()
