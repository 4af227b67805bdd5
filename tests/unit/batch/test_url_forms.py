"""Azure's batch line format (``"url": "/chat/completions"``) next to OpenAI's (``/v1/chat/completions``)."""

from __future__ import annotations

import io

import orjson
import pytest

from airflow_provider_synth.batch.errors import InvalidRequestsError
from airflow_provider_synth.batch.requests import ENDPOINTS, canonical_url, service_url
from airflow_provider_synth.batch.split import split_requests
from airflow_provider_synth.batch.validate import validate_requests

BODIES = {
    "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/embeddings": {"model": "m", "input": "hi"},
    "/v1/responses": {"model": "m", "input": "hi"},
    "/v1/completions": {"model": "m", "prompt": "hi"},
}


def line(i: int, url: str) -> dict:
    return {"custom_id": f"r{i}", "method": "POST", "url": url, "body": BODIES[canonical_url(url) or url]}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_both_forms_validate_for_every_endpoint(endpoint: str) -> None:
    azure = endpoint.removeprefix("/v1")
    summary = validate_requests([line(0, azure), line(1, endpoint), line(2, azure)])
    assert summary.total == 3 and summary.endpoint == endpoint
    assert service_url(endpoint, "azure") == azure and service_url(azure, "openai") == endpoint


def test_unknown_urls_and_mixed_endpoints_are_still_refused() -> None:
    with pytest.raises(InvalidRequestsError) as err:
        validate_requests([line(0, "/chat/completions"), {**line(1, "/v1/chat/completions"), "url": "/v2/chat"},
                           {**line(2, "/embeddings")}])
    reasons = [p.reason for p in err.value.problems]
    assert any("unsupported url '/v2/chat'" in r for r in reasons)
    assert any("differs from the batch's endpoint" in r for r in reasons)


@pytest.mark.parametrize(("form", "url"), [("openai", "/v1/chat/completions"), ("azure", "/chat/completions")])
def test_split_writes_every_line_in_the_services_form(form: str, url: str) -> None:
    lines = [line(i, "/chat/completions" if i % 2 else "/v1/chat/completions") for i in range(50)]
    shards: list[io.BytesIO] = []

    def open_shard(i: int) -> io.BytesIO:
        shards.append(NoClose())
        return shards[-1]

    result = split_requests(lines, open_shard, url_form=form)  # type: ignore[arg-type]
    written = [orjson.loads(x) for s in shards for x in s.getvalue().splitlines()]
    assert result.total == 50 and result.endpoint == "/v1/chat/completions"
    assert [w["custom_id"] for w in written] == [f"r{i}" for i in range(50)]
    assert {w["url"] for w in written} == {url}
    assert [w["body"] for w in written] == [x["body"] for x in lines]


class NoClose(io.BytesIO):
    def close(self) -> None:
        pass
