"""Structured-output synthesis with the quality loop: every result is a validated pydantic object.

The requests ask for JSON that fits ``QuizItem`` (the template's ``response_format``). The output checks send
answers that are cut off (``finish_reason: "length"``), refused, or do not validate against ``QuizItem`` to
``failures.jsonl`` with their text, never to ``results.jsonl``, and retry them alone (a cut-off one with a
larger ``max_completion_tokens``). When a retry round is small, it goes through the synchronous API instead
of waiting for another batch. Each results line carries the validated object under ``"parsed"``; the
manifest counts what the checks found and what they cost.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from airflow.sdk import dag, task
from pydantic import BaseModel, Field

from airflow_provider_synth.batch.checks import OutputChecks
from airflow_provider_synth.operators.openai_batch import (
    OpenAIBatchOperator,
    RequestTemplate,
)

OUTPUT_DIR = os.environ.get("SYNTH_OUTPUT_DIR", os.path.join(tempfile.gettempdir(), "synth-output"))
TOPICS = ["astronomy", "baking", "chess", "databases", "ecology", "finance", "geology", "history"]


class QuizItem(BaseModel):
    """One quiz question, as the model must answer it."""

    question: str = Field(description="the question, one sentence")
    answer: str = Field(description="the correct answer, a few words")
    difficulty: int = Field(description="1 (easy) to 5 (hard)")


@dag(schedule=None, catchup=False, tags=["synth", "openai", "example"], params={"n_records": 200})
def example_openai_structured() -> None:
    @task
    def make_records(params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        n = int((params or {}).get("n_records", 200))
        return [{"id": f"quiz-{i:06d}", "topic": TOPICS[i % len(TOPICS)], "level": 1 + i % 5} for i in range(n)]

    # [START howto_operator_openai_structured]
    synthesize = OpenAIBatchOperator(
        task_id="synthesize",
        conn_id="synth_openai_default",
        requests=make_records(),
        model="gpt-4o-mini",
        template=RequestTemplate(
            system="You write short, factual quiz questions as JSON.",
            prompt_template="Write one {topic} question at difficulty {level} of 5.",
            id_field="id",
            params={"temperature": 0.7, "max_completion_tokens": 300},
            response_format=QuizItem,  # the requests ask for it, and the checks validate against it
        ),
        checks=OutputChecks(
            finish_reasons={"length", "content_filter"},  # a cut-off or filtered answer is not data
            refusal=True,
            retry_body={"truncated": {"max_completion_tokens": 1200}},  # retry cut-off answers with more room
            direct_tail=25,  # a retry round of <= 25 requests goes through the synchronous API
        ),
        output_path=OUTPUT_DIR + "/{{ dag.dag_id }}/{{ run_id }}",
        max_failed_ratio=0.02,
        retry_failed_requests=2,
        max_cost_usd=5.0,
        deferrable=True,
    )
    # [END howto_operator_openai_structured]

    @task
    def use_rows(manifest: dict[str, Any]) -> None:
        from airflow_provider_synth.batch.extract import iter_parsed

        rows = [item for _, item in iter_parsed(manifest["results_path"], QuizItem)]
        checks = manifest["checks"]
        print(f"{len(rows)} typed rows; {checks['unusable']} unusable answers retried or reported "
              f"(truncated {checks['truncated']}, refused {checks['refused']}, schema_invalid "
              f"{checks['schema_invalid']}) for ${checks['cost_usd']}; total cost ${manifest['cost_usd']}")

    use_rows(synthesize.output)


example_openai_structured()
