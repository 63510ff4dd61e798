"""The archive container: packing round trips, and hostile bytes fail cleanly."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lmcodec
from lmcodec.container import (MAGIC, MAX_CONTEXT, MAX_LANES, OLD_VERSIONS, VERSION, Block, End, Header, Method,
                               Reader, StreamEntry, digest, lm_payload_limit, prompt_check, segment_layout,
                               stream_groups)
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
    context=st.integers(16, MAX_CONTEXT),
    segment_tokens=st.one_of(st.integers(1, 8), st.integers(1, 1 << 30)),
    lanes=st.one_of(st.integers(1, 4), st.integers(1, MAX_LANES)),
    block_size=st.integers(4096, 64 << 20),
)


def _words(max_len: int):
    """A payload an encoder can write: whole 32-bit words, 4..max_len bytes."""
    return st.integers(1, max(1, min(max_len, 64) // 4)).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n))


@st.composite
def archives(draw):
    header = draw(headers.filter(lambda h: len(h.model_name.encode()) <= 255))
    parts = [header.pack()]
    content = b""
    blocks = []
    for _ in range(draw(st.integers(0, 3))):
        raw = draw(st.binary(max_size=64))
        kind = draw(st.sampled_from(["raw", "zstd", "lm"]) if raw else st.sampled_from(["raw", "zstd"]))
        if kind == "raw":
            block = Block.build(Method.RAW, raw, [raw], [])
        elif kind == "zstd":
            import zstandard

            block = Block.build(Method.ZSTD, raw, [zstandard.ZstdCompressor(level=1).compress(raw)], [])
        else:  # what an encoder writes: the header's segment layout, one stream per `lanes` segments
            n = draw(st.integers(1, len(raw)))
            tokens = segment_layout(n, header.segment_tokens)
            groups = stream_groups(len(tokens), header.lanes)
            payloads = [draw(_words(lm_payload_limit(sum(tokens[i] for i in g)))) for g in groups]
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
    assert (parsed_header.lanes, parsed_header.context) == (header.lanes, header.context)
    assert parsed_blocks == blocks  # method, length, check, tokens, streams and payloads
    for b in parsed_blocks:
        if b.method == Method.LM:
            assert len(b.streams) == len(stream_groups(len(b.tokens), header.lanes))
        else:
            assert b.tokens == [] and len(b.streams) == 1
    assert end.n_blocks == len(blocks)
    assert end.total_len == sum(b.raw_len for b in blocks)


@settings(max_examples=200, deadline=None)
@given(headers.filter(lambda h: len(h.model_name.encode()) <= 255))
def test_header_pack_parse_round_trip(header):
    blob = header.pack() + End(0, digest(b""), 0).pack()
    assert Reader(io.BytesIO(blob), len(blob)).header() == header
    assert blob[4] == VERSION == 3


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=20), st.lists(st.tuples(st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1)), max_size=8), st.sampled_from(list(Method)), st.integers(0, 2**32 - 1),
       st.binary(min_size=8, max_size=8))
def test_block_table_layout(tokens, streams, method, raw_len, check):
    """The packed block table is exactly the documented layout (docs/FORMAT.md)."""
    entries = [StreamEntry(*e) for e in streams]
    packed = Block(method, raw_len, check, tokens, entries, []).pack()
    fixed = struct.pack("<BBI8sII", 0x42, method, raw_len, check, len(tokens), len(entries))
    table = fixed + b"".join(struct.pack("<I", n) for n in tokens)
    table += b"".join(struct.pack("<II", e.payload_len, e.payload_crc) for e in entries)
    assert packed == table + struct.pack("<I", zlib.crc32(table))
    assert len(fixed) == 22


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 300), st.integers(1, 80))
def test_stream_groups_cover_the_segments_in_order(n_tokens, seg, lanes):
    tokens = segment_layout(n_tokens, seg)
    groups = stream_groups(len(tokens), lanes)
    assert [i for g in groups for i in g] == list(range(len(tokens)))
    assert all(len(g) == lanes for g in groups[:-1]) and 1 <= len(groups[-1]) <= lanes
    assert sum(tokens) == n_tokens and all(t == seg for t in tokens[:-1]) and 1 <= tokens[-1] <= seg


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


def _v2_archive() -> bytes:
    """A format-v2 archive as lmcodec 0.1.x wrote it (raw method, valid CRCs).

    v2 header parameters: fingerprints, prompt check, device, dtype, threads,
    batch size, context, segment tokens, escape bits, block size.
    """
    head = MAGIC + bytes([2, 0, 0]) + struct.pack(
        "<16s16s8sBBHHIIBI", bytes(16), bytes(16), bytes(8), 0, 0, 2, 3, 32, 24, 16, 4096)
    head += struct.pack("<I", zlib.crc32(head))
    raw = b"abc"
    table = struct.pack("<BBI8sI", 0x42, Method.RAW, len(raw), digest(raw), 1)
    table += struct.pack("<III", 0, len(raw), zlib.crc32(raw))
    block = table + struct.pack("<I", zlib.crc32(table)) + raw
    return head + block + End(len(raw), digest(raw), 1).pack()


@pytest.mark.parametrize("version", [1, 2])
def test_old_versions_are_refused_naming_the_release_that_reads_them(version):
    blob = bytearray(_v2_archive())
    blob[4] = version
    struct.pack_into("<I", blob, 66, zlib.crc32(bytes(blob[:66])))  # a valid header CRC either way
    with pytest.raises(UnsupportedFormatError, match=r"version %d .*lmcodec 0\.1\.x" % version) as info:
        Reader(io.BytesIO(bytes(blob)), len(blob)).header()
    assert "\n" not in str(info.value)
    assert "0.1.x" in OLD_VERSIONS[version]
    # Through the codec too: refused from the header alone, no model is loaded.
    with pytest.raises(UnsupportedFormatError, match=r"decode it with lmcodec 0\.1\.x"):
        lmcodec.Codec().decompress(bytes(blob))


def test_huge_declared_segment_count_is_refused_before_allocation():
    header = lmcodec.Codec(method="raw").compress(b"")[:-25]  # header only, end record dropped
    for n_seg, n_str in ((0xFFFFFFFF, 1), (1 << 20, 0xFFFFFFFF), (0, 0xFFFFFFFF)):
        body = struct.pack("<BBI8sII", 0x42, Method.LM, 1 << 20, bytes(8), n_seg, n_str)
        blob = header + body + struct.pack("<I", zlib.crc32(body))
        with pytest.raises((CorruptArchiveError, TruncatedArchiveError)):
            _parse(blob)


def _lm_block_archive(header: Header, tokens: list[int], payload_lens: list[int]) -> bytes:
    payloads = [bytes(n) for n in payload_lens]
    raw = b"x" * max(sum(tokens), 1)
    block = Block.build(Method.LM, raw, payloads, tokens)
    return header.pack() + block.pack() + End(len(raw), digest(raw), 1).pack()


def _header(**kw) -> Header:
    fields = dict(model_name="", model_fingerprint=bytes(16), tokenizer_fingerprint=bytes(16),
                  prompt_check=bytes(8), has_prompt=False, context=32, segment_tokens=4, lanes=2,
                  block_size=4096)
    fields.update(kw)
    return Header(**fields)


def test_stream_count_must_follow_the_lanes():
    h = _header()
    tokens = [4, 4, 4, 1]                     # 4 segments, 2 lanes: 2 streams
    assert len(_parse(_lm_block_archive(h, tokens, [8, 8]))[1][0].streams) == 2
    for streams in ([8], [8, 8, 8], [8, 8, 8, 8]):
        with pytest.raises(CorruptArchiveError, match="stream count"):
            _parse(_lm_block_archive(h, tokens, streams))
    # The same block under a header with 4 lanes needs exactly one stream.
    assert len(_parse(_lm_block_archive(_header(lanes=4), tokens, [8]))[1][0].streams) == 1


def test_stream_payload_bound_is_per_group():
    h = _header()
    tokens = [4, 4, 4, 1]                     # groups of 8 and 5 tokens
    limit = [lm_payload_limit(8), lm_payload_limit(5)]
    ok = [limit[0] // 4 * 4, limit[1] // 4 * 4]
    assert _parse(_lm_block_archive(h, tokens, ok))
    for bad in ([ok[0] + 4, ok[1]], [ok[0], ok[1] + 4], [0, 4], [4, 6]):
        with pytest.raises(CorruptArchiveError, match="payload length"):
            _parse(_lm_block_archive(h, tokens, bad))


def test_stored_blocks_have_no_segments_and_one_stream():
    h = _header()
    raw = b"hello"
    for tokens, payloads in (([1], [raw]), ([], [raw, raw]), ([], [])):
        block = Block.build(Method.RAW, raw, payloads, tokens)
        blob = h.pack() + block.pack() + End(len(raw), digest(raw), 1).pack()
        with pytest.raises(CorruptArchiveError):
            _parse(blob)


def test_prompt_check_distinguishes_prompts():
    assert prompt_check(None) == bytes(8)
    assert prompt_check(b"a") != prompt_check(b"b")
    assert MAGIC.startswith(b"\x89")
