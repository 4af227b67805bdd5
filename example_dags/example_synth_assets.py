"""A pipeline that runs on new synthetic data: generate -> judge with a second batch -> curated dataset.

``example_synth_quiz_generate`` answers quiz prompts in one batch run and declares its output folder
(``<SYNTH_OUTPUT_DIR>/quiz/raw``) as an asset: when the task succeeds, Airflow records an asset event whose ``extra`` holds the run's
counts, tokens, cost and output paths. ``example_synth_quiz_curate`` is scheduled on that asset: it reads the
newest event, has a second batch run judge every answer (structured output), keeps the answers judged
``keep`` and writes them to the ``quiz/dataset`` asset, with its own counts in that event's ``extra``.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Literal

from airflow.sdk import Asset, dag, task
from pydantic import BaseModel

from airflow_provider_synth.batch.usage import format_usd
from airflow_provider_synth.operators.openai_batch import RequestTemplate

OUTPUT_DIR = os.environ.get("SYNTH_OUTPUT_DIR", os.path.join(tempfile.gettempdir(), "synth-output"))
TOPICS = ["astronomy", "baking", "chess", "databases", "ecology", "finance", "geology", "history"]


def folder_asset(path: str) -> Asset:
    """The asset of an output folder, named by its URI (object storage URLs as they are, local folders as
    file:// URIs): another folder is another asset, never a clash over one name."""
    return Asset(path if "://" in path else "file://" + os.path.abspath(path))


# [START howto_asset_synth]
RAW_QUIZ = folder_asset(f"{OUTPUT_DIR}/quiz/raw")
QUIZ_DATASET = folder_asset(f"{OUTPUT_DIR}/quiz/dataset")


@dag(schedule=None, catchup=False, tags=["synth", "assets", "example"], params={"n_records": 120})
def example_synth_quiz_generate() -> None:
    @task.synth_openai_batch(
        model="gpt-4o-mini",
        template=RequestTemplate(system="You write short, factual quiz questions with their answer.",
                                 prompt_template="Write one {topic} question at difficulty {level} of 5.",
                                 id_field="id", params={"max_completion_tokens": 200}),
        output_path=OUTPUT_DIR + "/quiz/raw/{{ run_id }}",
        outlets=[RAW_QUIZ],  # the event's extra: counts, usage, cost_usd, results_path...
        deferrable=True,
    )
    def generate(params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        n = int((params or {}).get("n_records", 120))
        return [{"id": f"quiz-{i:05d}", "topic": TOPICS[i % len(TOPICS)], "level": 1 + i % 5} for i in range(n)]

    generate()
# [END howto_asset_synth]


class Verdict(BaseModel):
    """The judge's structured answer."""

    verdict: Literal["keep", "drop"]
    reason: str


# [START howto_asset_synth_consumer]
@dag(schedule=[RAW_QUIZ], catchup=False, tags=["synth", "assets", "example"])
def example_synth_quiz_curate() -> None:
    @task(inlets=[RAW_QUIZ])
    def newest_quiz(triggering_asset_events: Any = None, inlet_events: Any = None) -> dict[str, Any]:
        """The event that triggered this run, else (a manual run) the newest one of the asset."""
        # indexed, never hashed: an Asset is not hashable on Airflow 3.1
        events = list(triggering_asset_events[RAW_QUIZ]) if triggering_asset_events else []
        events = events or list(inlet_events[RAW_QUIZ])
        if not events:
            raise ValueError(f"no asset event for {RAW_QUIZ.uri} yet: run example_synth_quiz_generate first")
        extra = dict(events[-1].extra)
        print(f"judging {extra['succeeded']} answers of {extra['run_id']} (cost so far "
              f"{format_usd(extra['cost_usd'])})")
        return extra

    @task.synth_openai_batch(
        model="gpt-4o-mini",
        template=RequestTemplate(system="You review quiz questions. Keep a question only if it is correct, "
                                        "clear and answerable on its own.",
                                 prompt_template="{text}", id_field="id", response_format=Verdict,
                                 params={"max_completion_tokens": 100}),
        output_path=OUTPUT_DIR + "/quiz/judge/{{ run_id }}",
        deferrable=True,
    )
    def judge(raw: dict[str, Any]) -> list[dict[str, Any]]:
        """One judge request per generated answer (same custom_id)."""
        from airflow_provider_synth.batch.extract import extract_text, iter_output

        return [{"id": line["custom_id"], "text": extract_text(line)} for line in iter_output(raw["results_path"])]

    @task(outlets=[QUIZ_DATASET])
    def build_dataset(raw: dict[str, Any], verdicts: dict[str, Any], run_id: str | None = None,
                      outlet_events: Any = None) -> dict[str, Any]:
        """Keep the answers judged ``keep``; write them as the dataset, with the counts in the asset event."""
        from airflow_provider_synth.batch.extract import extract_text, iter_output, parse_structured
        from airflow_provider_synth.batch.jsonl import dumps
        from airflow_provider_synth.batch.paths import open_path

        keep = {line["custom_id"] for line in iter_output(verdicts["results_path"])
                if (v := parse_structured(line, Verdict)) is not None and v.verdict == "keep"}
        path = f"{OUTPUT_DIR}/quiz/dataset/{run_id}/dataset.jsonl"
        kept = 0
        with open_path(path, "wb") as fp:
            for line in iter_output(raw["results_path"]):
                if line["custom_id"] in keep:
                    fp.write(dumps({"id": line["custom_id"], "text": extract_text(line)}) + b"\n")
                    kept += 1
        summary = {"path": path, "kept": kept, "judged": verdicts["succeeded"], "source_run": raw["run_id"],
                   "cost_usd": round((raw["cost_usd"] or 0.0) + (verdicts["cost_usd"] or 0.0), 6)}
        outlet_events[QUIZ_DATASET].extra.update(summary)
        return summary

    raw = newest_quiz()
    build_dataset(raw, judge(raw))
# [END howto_asset_synth_consumer]


example_synth_quiz_generate()
example_synth_quiz_curate()
