"""Embed documents with the OpenAI Batch API: one request per document, one vector per chunk, at half price.

Each record is a document split into text chunks; each request sends the chunks as a list ``input``, so the
answer holds one vector per chunk, in chunk order (``extract_embeddings`` sorts them by ``index``). The
operator splits the requests so that no batch holds more than 50,000 embedding inputs, waits deferred, and
lands ``results.jsonl`` (input order), ``failures.jsonl`` and ``manifest.json`` under the output folder.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

from airflow.sdk import dag, task

from airflow_provider_synth.operators.openai_batch import (
    OpenAIBatchConfig,
    OpenAIBatchOperator,
    RequestTemplate,
)

OUTPUT_DIR = os.environ.get("SYNTH_OUTPUT_DIR", os.path.join(tempfile.gettempdir(), "synth-output"))
# None: the operator's default (60 s against a service, 2 s against a server on this machine)
POLL_INTERVAL = float(os.environ["SYNTH_POLL_INTERVAL"]) if os.environ.get("SYNTH_POLL_INTERVAL") else None
EMBEDDING_DIMENSIONS = 256
SUBJECTS = ["tide pools", "sourdough starters", "binary search", "glacial lakes", "jazz harmony",
            "solar sails", "bee colonies", "sea shanties", "rust programming", "lunar maria"]


def document_chunks(record: Mapping[str, Any]) -> list[str]:
    """The request's ``input``: the document's chunks, embedded together, one vector each."""
    return list(record["chunks"])


@dag(schedule=None, catchup=False, tags=["synth", "openai", "embeddings", "example"], params={"n_docs": 100})
def example_openai_embeddings() -> None:
    @task
    def load_documents(params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Chunked documents; in real DAGs, rows from a table or a JSONL file of chunks."""
        n = int((params or {}).get("n_docs", 100))
        return [{"doc_id": f"doc-{i:05d}",
                 "chunks": [f"Notes on {SUBJECTS[i % len(SUBJECTS)]}, document {i}, part {k + 1}."
                            for k in range(1 + i % 4)]}
                for i in range(n)]

    # [START howto_operator_openai_embeddings]
    embed = OpenAIBatchOperator(
        task_id="embed",
        conn_id="synth_openai_default",
        requests=load_documents(),
        model="text-embedding-3-small",
        template=RequestTemplate(
            builder=document_chunks,                       # a list input: one vector per chunk
            id_field="doc_id",                             # custom_id = the document id
            params={"dimensions": EMBEDDING_DIMENSIONS},   # shortened vectors (text-embedding-3 models)
        ),
        output_path=OUTPUT_DIR + "/{{ dag.dag_id }}/{{ run_id }}",
        poll_interval=POLL_INTERVAL,
        max_cost_usd=5.0,
        config=OpenAIBatchConfig(endpoint="/v1/embeddings"),   # built requests go to the embeddings endpoint
        deferrable=True,
    )
    # [END howto_operator_openai_embeddings]

    @task
    def report(manifest: dict[str, Any]) -> dict[str, int]:
        """Stream the results and count the vectors (the file may be large: never load it whole)."""
        from airflow_provider_synth.batch.extract import extract_embeddings, iter_output

        documents = vectors = 0
        for line in iter_output(manifest["results_path"]):
            found = extract_embeddings(line)
            if any(len(v) != EMBEDDING_DIMENSIONS for v in found):
                raise ValueError(f"{line['custom_id']}: expected {EMBEDDING_DIMENSIONS}-dimensional vectors")
            documents, vectors = documents + 1, vectors + len(found)
        print(f"{vectors} vectors for {documents} of {manifest['total']} documents; "
              f"{manifest['usage']['prompt_tokens']} tokens, ${manifest['cost_usd']}")
        return {"documents": documents, "vectors": vectors}

    report(embed.output)


example_openai_embeddings()
