"""Streaming JSONL I/O through file objects, so local paths and ObjectStoragePath/fsspec URLs work alike."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import IO, Any

import orjson

#: Bytes read per chunk when streaming a file line by line.
READ_CHUNK = 1 << 20


def dumps(obj: Any) -> bytes:
    """Serialize ``obj`` to compact JSON bytes (no trailing newline). Key order is kept, so output is stable."""
    return orjson.dumps(obj)


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse one JSON document."""
    return orjson.loads(data)


def iter_jsonl(fp: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw_line)`` for each non-blank line of a binary file object.

    Line numbers are 1-based and count blank lines, so they match what an editor shows.
    The trailing newline (and a CR before it) is stripped.
    """
    for lineno, raw in enumerate(fp, start=1):
        line = raw.rstrip(b"\r\n")
        if line and not line.isspace():
            yield lineno, line


def write_jsonl(fp: IO[bytes], rows: Iterable[Any]) -> int:
    """Write one JSON document per line; return the number of lines written."""
    n = 0
    write = fp.write
    for row in rows:
        write(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE))
        n += 1
    return n


#: Bytes per block when a whole block of lines is decoded at once.
BLOCK_BYTES = 1 << 20


def iter_block_bytes(fp: IO[bytes], block_bytes: int = BLOCK_BYTES) -> Iterator[bytes]:
    """Yield blocks of whole lines, each without its last newline: a block can be decoded at once (msgspec's
    ``decode_lines``) without splitting and re-joining it."""
    carry = b""
    while True:
        chunk = fp.read(block_bytes)
        if not chunk:
            break
        data = carry + chunk if carry else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            carry = data
            continue
        carry = data[cut + 1:]
        yield data[:cut]
    if carry:
        yield carry


def iter_blocks(fp: IO[bytes], block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, list[bytes]]]:
    """Yield ``(first_line_number, lines)`` for blocks of whole lines (newlines removed, blank lines kept so
    numbering stays exact). Decoding a block at once moves the per-line work out of Python."""
    lineno = 1
    for block in iter_block_bytes(fp, block_bytes):
        lines = block.split(b"\n")
        yield lineno, lines
        lineno += len(lines)
