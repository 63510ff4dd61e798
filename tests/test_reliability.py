"""Reliability: hostile archives, corruption, faults and signals never crash, hang or lie.

* property tests: arbitrary bytes and *re-signed* hostile fields (valid CRCs, so
  the deeper checks are reached) give an :class:`LMCodecError`, and no length
  field makes the parser read or allocate more than the data holds;
* a small corruption campaign over real archives (scripts/corruption_campaign.py
  runs the big one);
* wrong prompt and wrong model are refused before the model runs;
* CLI faults in real subprocesses: unwritable output, disk full, SIGINT/SIGTERM,
  bounded memory on a large stream.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import os
import resource
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from conftest import FAST
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import lmcodec
from lmcodec.coding.coder import StreamDecoder, StreamEncoder
from lmcodec.coding.frequencies import (
    BUCKET_FLOOR,
    BUCKETS,
    MIN_TOKEN_BITS,
    TOTAL,
    CodingTables,
    bucket_width,
)
from lmcodec.engine import ops_torch
from lmcodec.errors import (
    ArchiveError,
    ChecksumError,
    CorruptArchiveError,
    LMCodecError,
    ModelMismatchError,
    PromptMismatchError,
    TruncatedArchiveError,
)
from lmcodec.fileio import atomic_output
from lmcodec.format.container import (
    MAGIC,
    MAX_CONTEXT,
    MAX_LANES,
    READ_CHUNK,
    VARINT_MAX,
    VERSION,
    Block,
    End,
    Header,
    Method,
    digest,
    encode_varint,
    lm_payload_limit,
    segment_layout,
    stream_count,
    stream_groups,
)
from lmcodec.format.reader import Reader

ROOT = Path(__file__).resolve().parents[1]
V = MAGIC + bytes([4])  # the start of a v4 archive (still read; the hostile-header tests build v4)
V5 = b"\x89L" + bytes([VERSION])  # the start of every archive this version writes
HYPO = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.cache  # header_fields maps headers with it: load the script once
def _load_campaign():
    spec = importlib.util.spec_from_file_location("corruption_campaign", ROOT / "scripts" / "corruption_campaign.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# -- helpers ------------------------------------------------------------------------

class Pipe(io.RawIOBase):
    """A non-seekable stream (like stdin) that records the largest read request."""

    def __init__(self, data: bytes):
        self._b = io.BytesIO(data)
        self.largest = 0
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        self.largest = max(self.largest, n if n >= 0 else 1 << 62)
        out = self._b.read(n)
        self.consumed += len(out)
        return out

    def readinto(self, b) -> int:  # what io.BufferedReader calls
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


def parse(blob: bytes, pipe: bool = False):
    """Parse a whole archive with the container alone (no decoding)."""
    src = Pipe(blob) if pipe else io.BytesIO(blob)
    reader = Reader(src, None if pipe else len(blob))
    header = reader.header()
    blocks = []
    while True:
        rec = reader.next(header)
        if isinstance(rec, End):
            return header, blocks, rec, src
        blocks.append(rec)


def stored_header(**kw) -> Header:
    fields = dict(model_name="", model_fingerprint=b"", tokenizer_fingerprint=b"",
                  prompt_check=bytes(4), has_prompt=False, context=32, segment_tokens=24, lanes=2,
                  block_size=4096)
    fields.update(kw)
    return Header(**fields)


varint = encode_varint


def signed_block(method: int, raw_len: int, check: bytes, n_tokens: int, entries, payload: bytes = b"") -> bytes:
    """A block table in the v3 layout with a valid CRC, whatever its values.

    LM blocks (method 2) declare ``n_tokens`` and list ``entries`` (payload length,
    CRC) -- as many as given, whether or not the header's layout implies that many.
    Other methods (raw 0, zstd 1, any unknown byte) write ``entries[0]`` as a stored
    block does: a raw block only its CRC, the others the length and the CRC; with
    no entry, nothing.
    """
    table = bytes([0x42, method]) + varint(raw_len) + check
    if method == Method.LM:
        table += varint(n_tokens) + b"".join(varint(n) + struct.pack("<I", c) for n, c in entries)
    elif entries:
        n, c = entries[0]
        table += (b"" if method == Method.RAW else varint(n)) + struct.pack("<I", c)
    return table + struct.pack("<I", zlib.crc32(table)) + payload


def signed_end(total: int, check: bytes, n_blocks: int) -> bytes:
    """An end record as docs/FORMAT.md lays it out: the content check only from two blocks on."""
    body = b"\x45" + varint(total) + varint(n_blocks) + (check if n_blocks >= 2 else b"")
    return body + struct.pack("<I", zlib.crc32(body))


def signed_header(flags: int, level: int, params, name: bytes = b"", fingerprint: bytes = bytes(8),
                  pcheck: bytes = bytes(8), mixer: int = 0, model_id: int = 1) -> bytes:
    """A v4 header with a valid CRC, whatever its values: ``params`` are (context, segment
    tokens, lanes, block size), each an int or its raw varint bytes.  Written as flags and
    level say: mixer, context and segment tokens at level 0 only, lanes with flag bit 3,
    block size with bit 4; with bit 1 the model (bit 2: ``model_id``, else ``name``) and
    its ``fingerprint``; with bit 0 the prompt check."""
    enc = [p if isinstance(p, bytes) else varint(p) for p in params]
    body = V + bytes([flags, level])
    if level == 0:
        body += bytes([mixer]) + enc[0] + enc[1]
    body += (enc[2] if flags & 8 else b"") + (enc[3] if flags & 16 else b"")
    if flags & 2:
        body += (bytes([model_id]) if flags & 4 else bytes([len(name)]) + name) + fingerprint
    if flags & 1:
        body += pcheck
    return body + struct.pack("<I", zlib.crc32(body))


def header_fields(buf) -> dict[str, tuple[int, int]]:
    """(start, end) of every field of the v4 or v5 header at the start of ``buf`` (the campaign's
    map); "crc" only where one follows (v4, v5's general form)."""
    fields, end, signed = _load_campaign().header_fields(bytes(buf))
    out = {name: (start, stop) for name, start, stop, _ in fields}
    out["end"] = (end, end)
    if signed:
        out["crc"] = (end, end + 4)
    return out


def one_line_error(exc: BaseException) -> None:
    assert isinstance(exc, LMCodecError), f"{type(exc).__name__}: {exc}"
    msg = str(exc)
    assert msg.strip() and "\n" not in msg, repr(msg)


_NO_MODEL = lmcodec.Codec()  # never loads a model unless an archive gets that far


class ReachedModel(BaseException):
    pass


def decode_without_model(blob: bytes, prompt=None):
    """Codec.decompress, but reaching the model is a test failure (it must be refused before).

    ``ModelCache.engine`` is where an LM block's decoding starts running the model:
    after the structure checks, the token bound and the model fingerprints.
    """
    def refuse(*a, **k):
        raise ReachedModel()

    _NO_MODEL.models.engine = refuse
    try:
        return _NO_MODEL.decompress(blob, prompt)
    except LMCodecError as exc:
        one_line_error(exc)
        return exc


# -- property tests: the container and the segment table ------------------------------

@HYPO
@given(st.binary(max_size=400))
def test_arbitrary_bytes_after_a_valid_magic_fail_cleanly(tail):
    for blob in (tail, b"\x89LMC" + tail, V + tail, V + b"\x00" + tail, V5 + tail, V5 + b"\x00" + tail):
        assert isinstance(decode_without_model(blob), LMCodecError)
        with pytest.raises(LMCodecError):  # the module-level API too
            lmcodec.decompress(blob)
        with pytest.raises(ArchiveError):
            parse(blob, pipe=True)


varint_field = st.one_of(st.integers(0, 9000), st.integers(0, 2**32 - 1), st.integers(0, VARINT_MAX),
                         st.binary(min_size=1, max_size=11))   # raw bytes: non-minimal, overlong, cut short


@HYPO
@given(name=st.binary(max_size=40), fingerprint=st.binary(min_size=8, max_size=8),
       params=st.lists(varint_field, min_size=4, max_size=4), flags=st.integers(0, 255), level=st.integers(0, 255),
       mixer=st.integers(0, 255), model_id=st.integers(0, 3), pcheck=st.binary(min_size=8, max_size=8))
def test_resigned_hostile_header_fields(name, fingerprint, params, flags, level, mixer, model_id, pcheck):
    """Any header field value with a valid CRC: a clean refusal, or an in-range header."""
    blob = (signed_header(flags, level, params, name, fingerprint, pcheck, mixer, model_id)
            + signed_end(0, digest(b""), 0))
    try:
        header, blocks, end, _ = parse(blob)
    except ArchiveError as exc:
        one_line_error(exc)
    else:
        assert 16 <= header.context <= MAX_CONTEXT and 1 <= header.lanes <= MAX_LANES
        assert 1 <= header.segment_tokens <= 1 << 30 and 0 <= header.level <= 9
        assert 4096 <= header.block_size <= 64 << 20 and blocks == [] and end.total_len == 0
        assert header.version == 4   # (the one-encoding property of v4 headers: test_container)
    out = decode_without_model(blob, b"p" if flags & 1 else None)
    assert out == b"" or isinstance(out, LMCodecError)


u32 = st.integers(0, 2**32 - 1)
small_or_huge = st.one_of(st.integers(0, 64), u32, st.integers(0, VARINT_MAX),
                          st.sampled_from([2**32 - 1, 2**31, 4096, 4097, VARINT_MAX]))


@HYPO
@given(method=st.integers(0, 255), raw_len=small_or_huge, n_tokens=small_or_huge,
       entries=st.lists(st.tuples(small_or_huge, u32), max_size=6),
       payload=st.binary(max_size=64), crc_ok=st.booleans(), counts_ok=st.booleans(), pipe=st.booleans(),
       data=st.data())
def test_resigned_hostile_block_fields(method, raw_len, n_tokens, entries, payload, crc_ok, counts_ok, pipe, data):
    """Signed block headers and tables with any values: refused without over-reading.

    The stream table may hold more or fewer entries than the declared token count
    implies (unless ``counts_ok``: then the count implies exactly the entries present);
    payload CRCs are made to match when asked, so the length and layout checks are
    what must hold.
    """
    if crc_ok:
        entries = [(len(payload), zlib.crc32(payload)) for _ in entries]
    if counts_ok and entries:  # 24-token segments, 2 lanes: 48 tokens a stream
        n_tokens = 48 * (len(entries) - 1) + data.draw(st.integers(1, 48))
        assert stream_count(n_tokens, 24, 2) == len(entries)
    tail = data.draw(st.sampled_from([b"", payload, payload * 3]))
    blob = (stored_header().pack() + signed_block(method, raw_len, bytes(8), n_tokens, entries, tail)
            + signed_end(raw_len & 0xFFFF, bytes(8), 1))
    tracemalloc.start()
    try:
        try:
            _, blocks, _, src = parse(blob, pipe=pipe)
        except ArchiveError as exc:
            one_line_error(exc)
            src = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Nothing proportional to a declared length: memory and read requests follow the data.
    assert peak < 64 * len(blob) + 256 * 1024, peak
    if src is not None and pipe:
        assert src.largest <= READ_CHUNK
    assert isinstance(decode_without_model(blob), LMCodecError)


@HYPO
@given(total=st.integers(0, VARINT_MAX), n_blocks=st.one_of(u32, st.integers(0, VARINT_MAX)),
       check=st.binary(min_size=8, max_size=8))
def test_resigned_end_record_must_match_the_blocks(total, n_blocks, check):
    raw = b"hello, world"
    blob = (stored_header().pack() + Block.build(Method.RAW, raw, [raw], []).pack()
            + signed_end(total, check, n_blocks))
    result = decode_without_model(blob)
    if (total, n_blocks, check) == (len(raw), 1, digest(raw)):
        assert result == raw
    else:
        assert isinstance(result, (CorruptArchiveError, ChecksumError))


@HYPO
@given(seg=st.integers(1, 300), full=st.integers(0, 6), rest=st.integers(0, 299), lanes=st.integers(1, 4),
       near_limit=st.booleans(), extra=st.integers(0, 24))
@example(seg=35, full=3, rest=0, lanes=1, near_limit=False, extra=0)  # CI's find: a short table runs off the end
def test_lm_stream_table_is_checked_against_the_header(seg, full, rest, lanes, near_limit, extra):
    """The token count fits the block, the streams follow the header's segment size and
    lanes, and each stream's payload must fit the tokens of its segments."""
    n_tokens = full * seg + rest % seg
    assume(n_tokens > 0)
    payload_len = 4 * seg * near_limit + extra  # tiny payloads, or ones around a segment's limit
    header = stored_header(segment_tokens=seg, lanes=lanes, block_size=1 << 16)
    layout = segment_layout(n_tokens, seg)
    groups = stream_groups(len(layout), lanes)
    payload = bytes(payload_len)
    entries = [(payload_len, zlib.crc32(payload))] * len(groups)

    def archive(n, streams, raw_len=n_tokens):
        return (header.pack() + signed_block(Method.LM, raw_len, bytes(8), n, streams, payload * len(streams))
                + signed_end(raw_len, bytes(8), 1))

    ok = all(payload_len % 4 == 0 and 4 <= payload_len <= lm_payload_limit(sum(layout[i] for i in g))
             for g in groups)
    if ok:
        blocks = parse(archive(n_tokens, entries))[1]
        assert len(blocks) == 1 and blocks[0].tokens == layout and blocks[0].n_tokens == n_tokens
    else:
        with pytest.raises(CorruptArchiveError, match="payload length"):
            parse(archive(n_tokens, entries))
    # More tokens than bytes, or none, is refused (the segments are derived from the count).
    for n, raw_len in ((n_tokens + 1, n_tokens), (0, n_tokens)):
        with pytest.raises(CorruptArchiveError, match="impossible number of tokens"):
            parse(archive(n, entries, raw_len))
    # One stream too many or too few for the header's lanes is refused: the table the
    # header implies ends elsewhere, so its CRC does not check (or the count cannot fit),
    # or -- a short table, empty payloads and a one-block end record -- it runs past the
    # archive's end.
    for streams in (entries + entries[:1], entries[:-1]):
        if streams:
            with pytest.raises((CorruptArchiveError, TruncatedArchiveError),
                               match="CRC mismatch|impossible number|varint|truncated"):
                parse(archive(n_tokens, streams))


def test_huge_lengths_from_a_pipe_are_read_in_pieces():
    """A 4 GiB payload length on a stream of unknown size: read requests stay small."""
    entries = [(2**32 - 1, 0)]
    blob = stored_header(block_size=64 << 20).pack() + signed_block(Method.RAW, 2**32 - 1, bytes(8), 0, entries)
    with pytest.raises(CorruptArchiveError):  # raw_len over the block size
        parse(blob, pipe=True)
    blob = (stored_header(block_size=64 << 20).pack()
            + signed_block(Method.RAW, 60 << 20, bytes(8), 0, [(60 << 20, 0)]) + b"x" * 5000)
    tracemalloc.start()
    try:
        with pytest.raises(TruncatedArchiveError):
            parse(blob, pipe=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * READ_CHUNK


def test_zstd_frame_declaring_more_than_the_block_is_refused_before_allocation():
    """A 2 KB zstd frame that inflates to 64 MiB inside a block that says 4000 bytes.

    zstandard allocates the size a frame declares (max_output_size does not
    apply then), so the container checks the frame's declared size first.
    """
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(64 << 20))
    assert len(bomb) < 4000
    blob = (stored_header().pack()
            + signed_block(Method.ZSTD, 4000, bytes(8), 0, [(len(bomb), zlib.crc32(bomb))], bomb)
            + signed_end(4000, bytes(8), 1))
    tracemalloc.start()
    try:
        err = decode_without_model(blob)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(err, CorruptArchiveError) and "zstd block" in str(err), err
    assert peak < 8 << 20


def _rows(rng, n: int, k: int, spread: float) -> np.ndarray:
    """Integer frequency rows (every entry >= 1, each row summing to 2^24)."""
    w = np.exp(rng.normal(size=(n, k)) * spread)
    g = 1 + np.floor(w / w.sum(1, keepdims=True) * (TOTAL - k)).astype(np.int64)
    g[np.arange(n), w.argmax(1)] += TOTAL - g.sum(1)
    return g


@HYPO
@given(payload=st.binary(max_size=64).map(lambda b: b[:len(b) // 4 * 4]), seed=st.integers(0, 2**16),
       steps=st.integers(1, 40), lanes=st.integers(1, 5))
def test_range_decoder_on_arbitrary_payloads(payload, seed, steps, lanes):
    """The coder on garbage, both stages, several lanes a call: symbols inside each row, or a
    CorruptArchiveError."""
    rng = np.random.default_rng(seed)
    dec = StreamDecoder(payload)
    for _ in range(steps):
        for k in (BUCKETS, 193):
            try:
                sym = dec.decode(_rows(rng, lanes, k, 3.0))
            except CorruptArchiveError as exc:
                one_line_error(exc)
                return
            assert sym.shape == (lanes,) and sym.min() >= 0 and sym.max() < k


def _tables(rng, n: int, vocab: int = 300, scale: int = 1 << 26) -> CodingTables:
    """Coding tables of ``n`` positions from random integer logits, via the engine's output step."""
    alphabet = vocab + 256
    lam = torch.from_numpy(rng.integers(-scale, scale + 1, size=(n, vocab)))
    hi = (lam + 128) >> 8
    y = torch.cat([hi, lam - (hi << 8)]).to(torch.int32)
    exp = torch.full((n, 1), -20, dtype=torch.int64)
    w = ops_torch.weights(y, torch.ones(vocab, dtype=torch.int64), exp, alphabet, bucket_width(alphabet))
    return CodingTables(w, alphabet)


@HYPO
@given(n=st.integers(1, 200), lanes=st.integers(1, 8), seed=st.integers(0, 2**16), worst=st.booleans())
def test_lm_payload_limit_holds_for_the_worst_symbols(n, lanes, seed, worst):
    """The payload bound the container enforces (per stream) is never hit by an honest
    encoder, not even when every symbol is the least likely one of both stages."""
    rng = np.random.default_rng(seed)
    layout = segment_layout(n, max(1, -(-n // lanes)))   # ``lanes`` segments in one stream
    enc = StreamEncoder()
    if worst:  # the extremes the tables allow: stage 1 at the floor (16 bits), stage 2 at 1 (24 bits)
        s1 = np.full(BUCKETS, BUCKET_FLOOR, dtype=np.int64)
        s1[0] += TOTAL - s1.sum()
        s2 = np.ones(193, dtype=np.int64)
        s2[0] += TOTAL - s2.sum()
        for t in range(max(layout)):
            live = sum(t < m for m in layout)
            enc.encode(np.full(live, BUCKETS - 1), np.repeat(s1[None], live, 0))
            enc.encode(np.full(live, 192), np.repeat(s2[None], live, 0))
    else:      # real tables, least likely bucket and least likely place in it
        tables = _tables(rng, n)
        s1 = tables.stage1()
        b = s1.argmin(1)
        s2 = tables.stage2(b)
        j = s2.argmin(1)
        offsets = np.cumsum([0] + layout)
        for t in range(max(layout)):
            rows = [offsets[i] + t for i, m in enumerate(layout) if t < m]
            enc.encode(b[rows], s1[rows])
            enc.encode(j[rows], s2[rows])
    payload = enc.finish()
    assert len(payload) % 4 == 0 and 4 <= len(payload) <= lm_payload_limit(n)
    # And the decoder's token bound (MIN_TOKEN_BITS) never refuses an honest stream.
    assert n * MIN_TOKEN_BITS <= 8 * len(payload) + 64


def test_token_bound_admits_the_most_predictable_honest_stream():
    """The cheapest tokens the tables allow (top bucket at 2^24 - 255*256, a certain place):
    the payload still satisfies the decoder's bound n * MIN_TOKEN_BITS <= 8 * payload + 64."""
    s1 = np.full(BUCKETS, BUCKET_FLOOR, dtype=np.int64)
    s1[7] += TOTAL - s1.sum()
    s2 = np.ones(193, dtype=np.int64)
    s2[3] += TOTAL - s2.sum()
    n = 20000
    enc = StreamEncoder()
    for _ in range(n // 100):
        enc.encode(np.full(100, 7), np.repeat(s1[None], 100, 0))
        enc.encode(np.full(100, 3), np.repeat(s2[None], 100, 0))
    payload = enc.finish()
    assert n * MIN_TOKEN_BITS <= 8 * len(payload) + 64
    assert len(payload) <= lm_payload_limit(n)


def test_truncated_magic_is_named_truncated():
    with pytest.raises(TruncatedArchiveError):
        parse(b"\x89LM")
    with pytest.raises(lmcodec.NotAnArchiveError, match="empty"):
        parse(b"")


# -- hostile fields of a real LM archive (each case runs the model for at most 2 steps) --

@pytest.fixture(scope="module")
def tiny_lm():
    text = b"Hi there"
    c = lmcodec.Codec(method="lm", **FAST)  # auto would store 8 bytes raw (as small as LM here)
    blob = c.compress(text)
    assert c.last_stats.methods == ["lm"]
    return text, blob


def short_lm_archive(v: dict, text: bytes, payload: bytes) -> bytes:
    """A v5 short-form LM archive (docs/FORMAT.md) of the registered model from field values, whatever
    they are, its check re-signed over the header and ``text`` (a forger who knows the text)."""
    layout = (v["lanes"], v["block_size"]) != (64, 4 << 20)
    head = V5 + bytes([4 | 16 * layout | v["method"] << 6, v["level"]])
    if v["level"] == 0:
        head += bytes([v["mixer"]]) + varint(v["context"]) + varint(v["segment_tokens"])
    if layout:
        head += varint(v["lanes"]) + varint(v["block_size"])
    head += b"\x01"
    body = varint(v["raw_len"]) + varint(v["n_tokens"]) + varint(v["payload_words"])
    return head + body + hashlib.blake2b(head + text, digest_size=4, person=b"lmcodec-v5").digest() + payload


def _tiny_lm_fields(blob: bytes) -> tuple[dict, bytes]:
    h, (blk,), end, _ = parse(blob)
    assert blk.method == Method.LM and len(blk.tokens) == 1 and len(blk.streams) == 1  # one segment, one stream
    return dict(level=h.level, mixer=h.mixer, context=h.context, segment_tokens=h.segment_tokens, lanes=h.lanes,
                block_size=h.block_size, method=int(blk.method), raw_len=blk.raw_len, n_tokens=blk.n_tokens,
                payload_words=blk.streams[0].payload_len // 4), blk.payloads[0]


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_resigned_fields_of_a_real_lm_archive(codec, tiny_lm, data):
    """Change any header or block field of a real LM archive and re-sign its check: exact or refused.

    The archive (v5 short form) is rebuilt from its fields with one value changed (a varint may
    change its length) and its check recomputed over the new header and the original text, so
    every check but the decoded content's is passed.
    """
    text, blob = tiny_lm
    fields, payload = _tiny_lm_fields(blob)
    tops = dict(level=255, mixer=255, method=3)
    name = data.draw(st.sampled_from(sorted(fields)))
    top = tops.get(name, VARINT_MAX)
    value = data.draw(st.one_of(st.integers(0, min(40, top)), st.integers(0, top)))
    assume(value != fields[name])
    buf = short_lm_archive({**fields, name: value}, text, payload)
    assert buf != blob
    try:
        out = codec.decompress(buf)
    except LMCodecError as exc:
        one_line_error(exc)
    else:
        assert out == text, (name, value)


def test_real_lm_archive_rebuilds_from_its_fields(tiny_lm):
    """The rebuild above is faithful: unchanged fields give the archive back byte for byte."""
    text, blob = tiny_lm
    h = parse(blob)[0]
    # Names the registered model by its id, two lanes (so the layout is stored), no prompt.
    assert blob[:4] == V5 + bytes([2 << 6 | 4 | 16]) and header_fields(blob)["end"][0] == len(h.fields(Method.LM))
    fields, payload = _tiny_lm_fields(blob)
    assert short_lm_archive(fields, text, payload) == blob


# -- the corruption campaign, small --------------------------------------------------

def test_corruption_campaign_small(codec):
    campaign = _load_campaign()
    corpus = campaign.build_corpus(codec, small=True)
    cases = campaign.make_cases(corpus, count=300, seed=7, deep=2)
    report = campaign.run_cases(codec, cases, timeout=60)
    assert report["total"] == 300
    assert report["failures_total"] == 0, campaign.format_report(report)
    assert report["wrong_output"] == report["crash"] == report["hang"] == 0
    assert report["rejected"] + report["exact_original"] == 300
    # A general-form archive (CRCs) refuses nearly everything before the model runs, and so does a
    # v6 short-form LM archive with a payload check (PAYLOAD_CHECK_TOKENS tokens or more): none of
    # its cases may reach the model.  A short-form LM archive under the threshold (one check, after
    # decoding) runs the model for a damaged header or payload that still parses, and must then
    # refuse it.
    classes = {smp.name: smp.size_class for smp in corpus}
    assert set(classes.values()) >= {"LM, short form, payload check", "stored"}, classes
    assert any(c.startswith("LM, short form, under") for c in classes.values()), classes
    assert report["reached_model_above_threshold"] == 0, campaign.format_report(report)
    general = sum(n for name, n in report["reached_model_by_sample"].items()
                  if classes[name.split("+")[0]] in ("stored", "LM, general form"))
    assert general <= 2 + 3, campaign.format_report(report)


# -- wrong prompt and wrong model: named, and found before the model runs ---------------

@pytest.fixture(scope="module")
def prompted(codec):
    text = b"It was the best of times, it was the worst of times.\n"
    return text, codec.compress(text, prompt="the key")


@contextmanager
def model_must_not_run(codec):
    """Fail the test if ``codec`` runs the model inside the block."""
    calls = []
    original = codec.models.engine

    def engine(*a, **k):  # every LM block's decoding gets its engine here, before the model runs
        calls.append(1)
        return original(*a, **k)

    codec.models.engine = engine
    try:
        yield
    finally:
        vars(codec.models).pop("engine", None)
    assert calls == [], "the model ran"


def test_wrong_prompt_is_refused_before_the_model_and_after_the_header_only(codec, prompted):
    _, blob = prompted
    with model_must_not_run(codec):
        with pytest.raises(PromptMismatchError, match="wrong prompt"):
            codec.decompress(blob, prompt="another key")
        # From a pipe, nothing past the header is read.
        pipe = Pipe(blob + b"\x00" * (1 << 20))
        with pytest.raises(PromptMismatchError, match="wrong prompt"):
            codec.decompress_stream(io.BufferedReader(pipe, 64), io.BytesIO(), prompt="another key")
        assert pipe.consumed < 200


def test_wrong_model_fingerprint_is_named_before_the_model_runs(codec, prompted):
    """v5 names the registered model by its id (which pins its fingerprint): an archive that names
    it with another fingerprint (another release of the weights) is refused before the model runs."""
    _, blob = prompted
    h = parse(blob)[0]
    other = Header(**{**vars(h), "model_fingerprint": bytes(b ^ 1 for b in h.model_fingerprint)})
    head = other.fields(Method.LM)
    assert b"smollm2-135m" in head and head[3] & 4 == 0   # by name, with its 8 bytes
    bad = head + blob[len(h.fields(Method.LM)):]
    with model_must_not_run(codec), pytest.raises(
            ModelMismatchError, match=r"wrong model: archive needs 'smollm2-135m' \(fingerprint [0-9a-f]{16}\), "
                                      r"got 'smollm2-135m' \(fingerprint [0-9a-f]{16}\)"):
        codec.decompress(bytes(bad), prompt="the key")


def test_unregistered_model_name_is_named(codec, prompted):
    _, blob = prompted
    h = parse(blob)[0]
    renamed = Header(**{**vars(h), "model_name": "my-private-model"}).fields(Method.LM)
    assert renamed[3] & 4 == 0 and b"my-private-model" in renamed  # a name, not the registered id
    buf = renamed + blob[len(h.fields(Method.LM)):]
    with pytest.raises(ModelMismatchError, match="'my-private-model'.*not registered"):
        codec.decompress(buf, prompt="the key")


# -- CLI faults in real subprocesses ---------------------------------------------------

CLI = [sys.executable, "-c", "import sys; from lmcodec.cli.main import main; sys.exit(main(prog_name='lmcodec'))"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}


def _default_signals():
    """A child that can be interrupted even when this test runs in the background."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _fsize_limit(nbytes: int):
    def pre():
        _default_signals()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return pre


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


def _assert_one_line_error(r: subprocess.CompletedProcess | tuple, code: int = 1):
    rc, err = (r.returncode, r.stderr) if isinstance(r, subprocess.CompletedProcess) else r
    err = err.decode() if isinstance(err, bytes) else err
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmcodec: error: "), err
    return lines[0]


@pytest.fixture
def work(tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(os.urandom(150_000))
    return tmp_path, src, _sha(src)


def test_unwritable_output_locations(work):
    tmp, src, sha = work
    not_a_dir = tmp / "plain-file"
    not_a_dir.write_bytes(b"x")
    targets = [(tmp / "missing" / "dir" / "out.lmc", "No such file"),
               (not_a_dir / "out.lmc", "Not a directory")]
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if not os.access(locked, os.W_OK):  # as root, permissions do not stop writes
        targets.append((locked / "out.lmc", "Permission denied"))
    try:
        for target, reason in targets:
            r = subprocess.run(CLI + ["-q", "compress", "--method", "raw", "-o", str(target), str(src)],
                               capture_output=True, env=ENV, timeout=120)
            line = _assert_one_line_error(r)
            assert reason in line and ".tmp" not in line, line
            assert not target.exists()
    finally:
        locked.chmod(0o700)
    assert _leftovers(tmp) == [] and list(locked.iterdir()) == [] and _sha(src) == sha


def test_disk_full_leaves_nothing_behind(work):
    tmp, src, sha = work
    out = tmp / "out.lmc"
    r = subprocess.run(CLI + ["-q", "compress", "--method", "raw", "-o", str(out), str(src)],
                       capture_output=True, env=ENV, timeout=120, preexec_fn=_fsize_limit(64 * 1024))
    line = _assert_one_line_error(r)
    assert line == f"lmcodec: error: {out}: File too large", line
    assert not out.exists() and _leftovers(tmp) == [] and _sha(src) == sha
    # Decompression into a full disk: same guarantees (the archive is made without the limit).
    arc = tmp / "in.txt.lmc"
    subprocess.run(CLI + ["-q", "compress", "--method", "raw", str(src)], check=True, env=ENV, timeout=120)
    arc_sha = _sha(arc)
    restored = tmp / "restored.txt"
    r = subprocess.run(CLI + ["-q", "decompress", "-o", str(restored), str(arc)],
                       capture_output=True, env=ENV, timeout=120, preexec_fn=_fsize_limit(64 * 1024))
    assert _assert_one_line_error(r) == f"lmcodec: error: {restored}: File too large"
    assert not restored.exists() and _sha(arc) == arc_sha and _sha(src) == sha
    assert _leftovers(tmp) == []


def test_atomic_output_in_process(tmp_path):
    """Whole file or nothing; the destination (not the temporary file) is named; normal permissions."""
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_output(target, force=False) as f:
            f.write(b"partial")
            raise RuntimeError("fail half way")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(target, force=False) as f:
        f.write(b"whole")
    assert target.read_bytes() == b"whole"
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    with pytest.raises(FileExistsError):
        with atomic_output(target, force=False):
            pass
    with pytest.raises(NotADirectoryError) as info:
        with atomic_output(target / "below-a-file", force=True):
            pass
    assert info.value.filename == str(target / "below-a-file")


def test_forced_output_to_a_fifo_is_written_in_place(tmp_path):
    """-f -o onto a FIFO or device writes into it; it is never renamed over (think /dev/null)."""
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    src = tmp_path / "in.txt"
    src.write_bytes(b"hello fifo\n" * 100)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    r = subprocess.run(CLI + ["-q", "compress", "--method", "zstd", "-f", "-o", str(fifo), str(src)],
                       capture_output=True, env=ENV, timeout=120)
    reader.join(60)
    assert r.returncode == 0, r.stderr
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and _leftovers(tmp_path) == []
    assert decode_without_model(got[0]) == src.read_bytes()


LONG_TEXT = (b"It was the best of times, it was the worst of times, it was the age of wisdom, it was "
             b"the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, "
             b"it was the season of Light, it was the season of Darkness, it was the spring of hope, "
             b"it was the winter of despair, we had everything before us, we had nothing before us.\n")


def _interrupt(cmd: list[str], directory: Path, sig: int, after: float = 3.0):
    """Start ``cmd``, wait until its temporary output exists, wait ``after`` s, send ``sig``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                            preexec_fn=_default_signals)
    deadline = time.monotonic() + 90
    while not any(p.name.endswith(".tmp") for p in directory.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no temporary output appeared"
        time.sleep(0.05)
    time.sleep(after)
    assert proc.poll() is None, "finished before the signal: make the input larger"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode()


SWALLOWED = """
import ctypes, signal, sys, time
from lmcodec.fileio import Terminated, install_signal_handlers
install_signal_handlers()
def callback():  # like numba's JIT calling back into Python: an exception raised here is only reported
    signal.raise_signal(signal.{sig})
    for _ in range(1000):
        pass
try:
    ctypes.CFUNCTYPE(None)(callback)()
    time.sleep(10)
    print("went on")
except (Terminated, KeyboardInterrupt) as exc:
    print(type(exc).__name__)
"""


@pytest.mark.parametrize("sig,name", [("SIGTERM", "Terminated"), ("SIGINT", "KeyboardInterrupt")])
def test_a_signal_swallowed_inside_a_callback_still_ends_the_command(sig, name):
    """A signal whose exception is raised inside a ctypes callback is sent again once the callback returned."""
    t = time.monotonic()
    res = subprocess.run([sys.executable, "-c", SWALLOWED.format(sig=sig)], capture_output=True, env=ENV,
                         timeout=60, preexec_fn=_default_signals)
    assert res.stdout.decode().strip() == name and res.stderr == b"", res.stderr.decode()
    assert time.monotonic() - t < 9


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"),
                                           (signal.SIGTERM, 143, "terminated")])
def test_signal_during_compression(tmp_path, sig, code, word):
    src = tmp_path / "book.txt"
    # ~22 KB, ~5,500 tokens: its parallel pass alone outlasts the 3 s before the signal by far (at ~4 KB the
    # compiled coding finished about then, and a signal in the interpreter's exit met the default action).
    src.write_bytes(LONG_TEXT * 64)
    sha = _sha(src)
    rc, err = _interrupt(CLI + ["-q", "compress", "--method", "lm", "--threads", "2", str(src)], tmp_path, sig)
    assert rc == code and err.strip() == f"lmcodec: {word}", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["book.txt"] and _sha(src) == sha


TALE = (b"There were a king with a large jaw and a queen with a plain face, on the throne of England; "
        b"there were a king with a large jaw and a queen with a fair face, on the throne of France. In "
        b"both countries it was clearer than crystal to the lords of the State preserves of loaves and "
        b"fishes, that things in general were settled for ever. It was the year of Our Lord one thousand "
        b"seven hundred and seventy-five. Spiritual revelations were conceded to England at that favoured "
        b"period, as at this. Mrs. Southcott had recently attained her five-and-twentieth blessed "
        b"birthday, of whom a prophetic private in the Life Guards had heralded the sublime appearance by "
        b"announcing that arrangements were made for the swallowing up of London and Westminster.\n")


@pytest.fixture(scope="module")
def long_archive(tmp_path_factory):
    d = tmp_path_factory.mktemp("long")
    arc = d / "book.txt.lmc"
    # One segment: the decoder steps through its ~150 tokens one at a time (the encoder
    # scores it in one pass), so decoding lasts over a second (1.2 s with the model loaded)
    # while encoding does not; the signal comes 0.5 s after the temporary output appears.
    c = lmcodec.Codec(segment_tokens=400, lanes=1, context=32, threads=2)
    arc.write_bytes(c.compress(TALE))
    assert c.last_stats.methods == ["lm"] and c.last_stats.tokens > 100
    return arc


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"),
                                           (signal.SIGTERM, 143, "terminated")])
def test_signal_during_decompression(tmp_path, long_archive, sig, code, word):
    arc = tmp_path / long_archive.name
    arc.write_bytes(long_archive.read_bytes())
    sha = _sha(arc)
    rc, err = _interrupt(CLI + ["-q", "decompress", str(arc)], tmp_path, sig, after=0.5)
    assert rc == code and err.strip() == f"lmcodec: {word}", err
    assert sorted(p.name for p in tmp_path.iterdir()) == [arc.name] and _sha(arc) == sha


def _peak_rss_mib(proc: subprocess.Popen) -> tuple[int, float]:
    """Wait for ``proc`` and return (exit code, its own peak RSS in MiB)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


_GEN = ("import sys, hashlib\nn = int(sys.argv[1]); h = hashlib.blake2b(digest_size=16)\n"
        "line = b''.join(b'%06d the quick brown fox jumps over the lazy dog\\n' % i for i in range(20000))\n"
        "while n > 0:\n    b = line[:n]; sys.stdout.buffer.write(b); h.update(b); n -= len(b)\n"
        "sys.stdout.flush(); sys.stderr.write(h.hexdigest())\n")


def test_large_stdin_stream_has_bounded_memory():
    """192 MiB through compress | decompress pipes: peak RSS does not grow with the input."""
    size = 192 << 20
    base = subprocess.Popen(CLI + ["-q", "compress", "--method", "raw", "-c", "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, env=ENV)
    base.stdin.write(b"x")
    base.stdin.close()
    rc, base_rss = _peak_rss_mib(base)
    assert rc == 0
    gen = subprocess.Popen([sys.executable, "-c", _GEN, str(size)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    enc = subprocess.Popen(CLI + ["-q", "compress", "--method", "raw", "-c", "-"], stdin=gen.stdout,
                           stdout=subprocess.PIPE, env=ENV)
    gen.stdout.close()
    dec = subprocess.Popen(CLI + ["-q", "decompress", "-c", "-"], stdin=enc.stdout, stdout=subprocess.PIPE,
                           env=ENV)
    enc.stdout.close()
    h, n = hashlib.blake2b(digest_size=16), 0
    while chunk := dec.stdout.read(1 << 20):
        h.update(chunk)
        n += len(chunk)
    expected = gen.stderr.read().decode()
    gen.wait()
    (rc_enc, enc_rss), (rc_dec, dec_rss) = _peak_rss_mib(enc), _peak_rss_mib(dec)
    assert (rc_enc, rc_dec) == (0, 0) and n == size and h.hexdigest() == expected
    # Default 4 MiB blocks: a few blocks' worth of buffers, not the 192 MiB input.
    assert enc_rss - base_rss < 64, (base_rss, enc_rss)
    assert dec_rss - base_rss < 64, (base_rss, dec_rss)
