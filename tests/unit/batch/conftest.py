from __future__ import annotations

import io
from collections.abc import Callable

import pytest


class ShardSink:
    """In-memory shard files for split_requests: open(i) returns a file whose bytes are kept on close."""

    def __init__(self) -> None:
        self.data: dict[int, bytes] = {}

    def open(self, index: int) -> io.BytesIO:
        sink = self

        class _F(io.BytesIO):
            def close(self) -> None:
                sink.data[index] = self.getvalue()
                super().close()

        return _F()

    def opener(self, index: int) -> Callable[[], io.BytesIO]:
        return lambda: io.BytesIO(self.data[index])


@pytest.fixture
def sink() -> ShardSink:
    return ShardSink()
