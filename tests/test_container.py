"""The archive container: packing round trips, and hostile bytes fail cleanly."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lmcodec
from lmcodec.container import MAGIC, Block, End, Header, Method, Reader, digest, prompt_check, segment_layout
from lmcodec.errors import (
    ArchiveError,
    CorruptArchiveError,
    NotAnArchiveError,
    TruncatedArchiveError,
    UnsupportedFormatError,
)

headers = st.builds(
    Header,
    model_name=st.text(max_size=40),
    model_fingerprint=st.binary(min_size=16, max_size=16),
    tokenizer_fingerprint=st.binary(min_size=16, max_size=16),
    prompt_check=st.binary(min_size=8, max_size=8),
    has_prompt=st.booleans(),
    device=st.sampled_from(["cpu", "cuda"]),
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    threads=st.integers(1, 256),
    batch_size=st.integers(1, 65535),
    context=st.integers(16, 1 << 20),
    segment_tokens=st.integers(1, 1 << 30),
    escape_bits=st.integers(4, 30),
    block_size=st.integers(4096, 64 << 20),
)


@st.composite
def archives(draw):
    header = draw(headers.filter(lambda h: len(h.model_name.encode()) <= 255))
    parts = [header.pack()]
    content = b""
    blocks = []
    for _ in range(draw(st.integers(0, 3))):
        raw = draw(st.binary(max_size=64))
        if draw(st.booleans()):
            block = Block.build(Method.RAW, raw, [raw], [0])
        else:  # what an encoder writes: the header's segment layout, whole 32-bit words
            n = draw(st.integers(1, len(raw))) if raw else 0
            tokens = segment_layout(n, header.segment_tokens)
            payloads = [draw(st.binary(min_size=4, max_size=16).map(lambda p: p[:len(p) // 4 * 4]))
                        for _ in tokens]
            block = Block.build(Method.LM, raw, payloads, tokens)
        blocks.append(block)
        parts.append(block.pack())
        content += raw
    parts.append(End(len(content), digest(content), len(blocks)).pack())
    return header, blocks, b"".join(parts)


def _parse(blob: bytes):
    reader = Reader(io.BytesIO(blob), len(blob))
    header = reader.header()
    out = []
    while True:
        rec = reader.next(header)
        if isinstance(rec, End):
            return header, out, rec
        out.append(rec)


@settings(max_examples=200, deadline=None)
@given(archives())
def test_pack_parse_round_trip(arch):
    header, blocks, blob = arch
    parsed_header, parsed_blocks, end = _parse(blob)
    assert parsed_header == header
    assert parsed_header.model_fingerprint == header.model_fingerprint
    assert (parsed_header.threads, parsed_header.context) == (header.threads, header.context)
    assert [b.payloads for b in parsed_blocks] == [b.payloads for b in blocks]
    assert end.n_blocks == len(blocks)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_fail_cleanly(blob):
    with pytest.raises(ArchiveError):
        _parse(blob)


@settings(max_examples=300, deadline=None)
@given(archives(), st.data())
def test_any_single_byte_change_is_caught(arch, data):
    _, _, blob = arch
    i = data.draw(st.integers(0, len(blob) - 1))
    bit = data.draw(st.integers(0, 7))
    bad = bytearray(blob)
    bad[i] ^= 1 << bit
    with pytest.raises(ArchiveError):
        _parse(bytes(bad))


@settings(max_examples=200, deadline=None)
@given(archives(), st.data())
def test_every_truncation_is_caught(arch, data):
    _, _, blob = arch
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(ArchiveError):
        _parse(blob[:cut])


def test_not_an_archive():
    with pytest.raises(NotAnArchiveError):
        _parse(b"hello world, not an archive")


def test_newer_version_is_named():
    blob = bytearray(lmcodec.Codec(method="raw").compress(b"abc"))
    blob[4] = 9
    with pytest.raises(UnsupportedFormatError, match="version 9"):
        _parse(bytes(blob))


def test_huge_declared_segment_count_is_refused_before_allocation():
    header = lmcodec.Codec(method="raw").compress(b"")[:-25]  # header only, end record dropped
    body = struct.pack("<BBI8sI", 0x42, Method.LM, 1 << 20, bytes(8), 0xFFFFFFFF)
    blob = header + body + struct.pack("<I", zlib.crc32(body))
    with pytest.raises((CorruptArchiveError, TruncatedArchiveError)):
        _parse(blob)


def test_prompt_check_distinguishes_prompts():
    assert prompt_check(None) == bytes(8)
    assert prompt_check(b"a") != prompt_check(b"b")
    assert MAGIC.startswith(b"\x89")
