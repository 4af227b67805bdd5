"""The OpenAI Batch API in TaskFlow form: ``@task.synth_openai_batch``, mapped over topics with ``.expand``.

The decorated function returns records (or request lines); the decorator's arguments are
``OpenAIBatchOperator``'s; the task's XCom is the manifest. Each mapped task instance runs its own batch run,
in its own output folder (``{{ ti.map_index }}`` in ``output_path``), and a retry re-attaches to its batches.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from airflow.sdk import dag, task

from airflow_provider_synth.operators.openai_batch import RequestTemplate

OUTPUT_DIR = os.environ.get("SYNTH_OUTPUT_DIR", os.path.join(tempfile.gettempdir(), "synth-output"))


@dag(schedule=None, catchup=False, tags=["synth", "openai", "taskflow", "example"],
     params={"topics": ["astronomy", "baking", "chess"], "per_topic": 50})
def example_openai_batch_taskflow() -> None:
    @task
    def topics(params: dict[str, Any] | None = None) -> list[str]:
        return list((params or {}).get("topics", ["astronomy"]))

    # [START howto_decorator_openai_batch]
    @task.synth_openai_batch(
        conn_id="synth_openai_default",
        model="gpt-4o-mini",
        template=RequestTemplate(
            system="You write short, factual quiz questions.",
            prompt_template="Write one {topic} question at difficulty {level} of 5, then its answer.",
            id_field="id",
            params={"temperature": 0.7, "max_completion_tokens": 200},
        ),
        output_path=OUTPUT_DIR + "/{{ dag.dag_id }}/{{ run_id }}/{{ ti.map_index }}",
        max_failed_ratio=0.01,
        max_cost_usd=20.0,
        deferrable=True,
    )
    def quiz(topic: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The records of one topic; the batch run answers them."""
        n = int((params or {}).get("per_topic", 50))
        return [{"id": f"{topic}-{i:04d}", "topic": topic, "level": 1 + i % 5} for i in range(n)]

    manifests = quiz.expand(topic=topics())
    # [END howto_decorator_openai_batch]

    @task
    def report(manifests: list[dict[str, Any]]) -> dict[str, Any]:
        total = {k: sum(m[k] for m in manifests) for k in ("total", "succeeded", "failed")}
        cost = sum(m["cost_usd"] or 0.0 for m in manifests)
        print(f"{total['succeeded']} of {total['total']} answered over {len(manifests)} topic(s); cost ${cost:.4f}")
        return {**total, "cost_usd": cost, "runs": len(manifests)}

    report(manifests)


example_openai_batch_taskflow()
