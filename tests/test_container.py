"""The archive container: packing round trips, and hostile bytes fail cleanly."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lmcodec
from lmcodec.errors import (
    ArchiveError,
    CorruptArchiveError,
    NotAnArchiveError,
    TruncatedArchiveError,
    UnsupportedFormatError,
)
from lmcodec.format.container import (
    LEVELS,
    MAGIC,
    MAX_CONTEXT,
    MAX_LANES,
    MODEL_FINGERPRINTS,
    OLD_VERSIONS,
    PAYLOAD_CHECK_TOKENS,
    VARINT_MAX,
    VERSION,
    Block,
    End,
    Header,
    Level,
    Method,
    StreamEntry,
    decode_varint,
    digest,
    encode_varint,
    lm_payload_limit,
    pack_short,
    prompt_check,
    segment_layout,
    stream_count,
    stream_groups,
    stream_tokens,
)
from lmcodec.format.header import MIXER_MASK, MODEL_IDS
from lmcodec.format.reader import Reader

DEFAULT_FP = MODEL_FINGERPRINTS[1][:8]


@st.composite
def headers(draw):
    """v5 headers as an encoder writes them: a level's settings or custom ones (level 0);
    an LM archive names its model (a registered name, with its registered fingerprint
    or another, or any name) by the first 8 bytes of its fingerprint, a stored-only one
    names none; the prompt check is zeros exactly when there is no prompt; a dictionary
    id or none."""
    has_prompt = draw(st.booleans())
    if draw(st.booleans()):
        name = draw(st.one_of(st.just("smollm2-135m"), st.just("gemma3-270m"),
                              st.text(max_size=40).filter(lambda n: len(n.encode()) <= 255)))
        fp = draw(st.one_of(st.just(DEFAULT_FP), st.just(MODEL_FINGERPRINTS[2][:8]), st.binary(min_size=8, max_size=8)))
        if not name and not any(fp):  # that names no model: a stored-only header, drawn below
            fp = b"\x01" + fp[1:]
        model = dict(model_name=name, model_fingerprint=fp, tokenizer_fingerprint=b"")
    else:
        model = dict(model_name="", model_fingerprint=b"", tokenizer_fingerprint=b"")
    level = draw(st.integers(0, 9))
    if level:
        lv = LEVELS[level]
        settings = dict(context=lv.context, segment_tokens=lv.segment_tokens, mixer=lv.mixer)
    else:
        settings = dict(context=draw(st.integers(16, MAX_CONTEXT)),
                        segment_tokens=draw(st.one_of(st.integers(1, 8), st.integers(1, 1 << 30))),
                        mixer=draw(st.integers(0, MIXER_MASK)))
    return Header(**model, **settings,
                  prompt_check=draw(st.binary(min_size=4, max_size=4)) if has_prompt else bytes(4),
                  has_prompt=has_prompt,
                  lanes=draw(st.one_of(st.just(64), st.integers(1, 4), st.integers(1, MAX_LANES))),
                  block_size=draw(st.one_of(st.just(4 << 20), st.integers(4096, 64 << 20))),
                  level=level, dict_id=draw(st.one_of(st.just(b""), st.binary(min_size=4, max_size=4))))


def ref_varint(n: int) -> bytes:
    """An independent LEB128 encoder (the documented layout): 7 bits a byte, low first."""
    groups = [(n >> s) & 0x7F for s in range(0, max(n.bit_length(), 1), 7)]
    return bytes(g | 0x80 for g in groups[:-1]) + bytes(groups[-1:])


def _words(max_len: int):
    """A payload an encoder can write: whole 32-bit words, 4..max_len bytes."""
    return st.integers(1, max(1, min(max_len, 64) // 4)).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n))


@st.composite
def archives(draw):
    header = draw(headers())
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
@given(headers())
def test_header_pack_parse_round_trip(header):
    blob = header.pack() + End(0, digest(b""), 0).pack()
    assert Reader(io.BytesIO(blob), len(blob)).header() == header
    assert blob[:3] == b"\x89L\x06" and VERSION == 6


def v4_body(flags: int, level: int, mixer: int, values: tuple[int, int, int, int], name: bytes = b"",
            model_id: int = 1, fp: bytes = b"", pcheck: bytes = b"") -> bytes:
    """A v4 header as docs/FORMAT.md lays it out, whatever the values, without its CRC:
    mixer, context and segment tokens at level 0 only, lanes with flag bit 3, block size
    with bit 4; with bit 1 the model (bit 2: ``model_id``, else ``name``) and ``fp``;
    with bit 0 ``pcheck``.  Written independently of Header.pack."""
    context, seg, lanes, block = values
    body = MAGIC + bytes([4, flags, level])
    if level == 0:
        body += bytes([mixer]) + ref_varint(context) + ref_varint(seg)
    body += ref_varint(lanes) if flags & 8 else b""
    body += ref_varint(block) if flags & 16 else b""
    if flags & 2:
        body += (bytes([model_id]) if flags & 4 else bytes([len(name)]) + name) + fp
    return body + (pcheck if flags & 1 else b"")


#: Each registered model's one-byte id, by name (MODEL_IDS inverted).
MODEL_ID_OF = {name: i for i, name in MODEL_IDS.items()}


def v4_header(header: Header) -> bytes:
    """What an encoder writes for ``header``: the flags it sets, then :func:`v4_body` and the CRC."""
    named = bool(header.model_name) or any(header.model_fingerprint)
    registered = named and header.model_name in MODEL_ID_OF
    flags = (header.has_prompt | 2 * named | 4 * registered | 8 * (header.lanes != 64)
             | 16 * (header.block_size != 4 << 20))
    body = v4_body(flags, header.level, header.mixer,
                   (header.context, header.segment_tokens, header.lanes, header.block_size),
                   header.model_name.encode(), MODEL_ID_OF.get(header.model_name, 1), header.model_fingerprint,
                   header.prompt_check)
    return body + struct.pack("<I", zlib.crc32(body))


def v3_header(name: bytes | None, fps: bytes, pcheck: bytes | None, level: int, mixer: int,
              values: tuple[int, int, int, int], flags: int | None = None) -> bytes:
    """A v3 header (lmcodec 0.2's first layout, docs/FORMAT.md): level, mixer, context,
    segment tokens, lanes, block size; then name + 16 + 8 fingerprint bytes and the
    prompt check when present.  Without a CRC (see :func:`_resigned_header`)."""
    if flags is None:
        flags = (pcheck is not None) | 2 * (name is not None)
    body = MAGIC + bytes([3, flags, level, mixer]) + b"".join(ref_varint(v) for v in values)
    if name is not None:
        body += bytes([len(name)]) + name + fps
    return body + (pcheck or b"")


def v5_fields(flags: int, level: int, mixer: int, values: tuple[int, int, int, int], name: bytes = b"",
              model_id: int = 1, fp: bytes = b"", dict_id: bytes = b"", pcheck: bytes = b"",
              version: int = 6) -> bytes:
    """A v5/v6 header (one layout) as docs/FORMAT.md lays it out, whatever the values, without a CRC:
    magic 89 4C, version (6 unless given), flags, level; mixer, context and segment tokens at level 0
    only; lanes and block size with flag bit 4; the model id with bit 2, else the name
    and ``fp`` with bit 3; the dictionary id with bit 1; the prompt check with bit 0.
    Written independently of Header.fields."""
    context, seg, lanes, block = values
    body = b"\x89L" + bytes([version, flags, level])
    if level == 0:
        body += bytes([mixer]) + ref_varint(context) + ref_varint(seg)
    body += ref_varint(lanes) + ref_varint(block) if flags & 16 else b""
    if flags & 4:
        body += bytes([model_id])
    elif flags & 8:
        body += bytes([len(name)]) + name + fp
    return body + (dict_id if flags & 2 else b"") + (pcheck if flags & 1 else b"")


def v5_header(header: Header, method: int | None) -> bytes:
    """What an encoder writes for ``header`` (``method`` None: the general form, with its CRC)."""
    named = bool(header.model_name) or any(header.model_fingerprint)
    model_id = MODEL_ID_OF.get(header.model_name, 0)
    registered = named and model_id and header.model_fingerprint == MODEL_FINGERPRINTS[model_id][:8]
    layout = (header.lanes, header.block_size) != (64, 4 << 20)
    flags = (header.has_prompt | 2 * bool(header.dict_id) | 4 * registered | 8 * (named and not registered)
             | 16 * layout | (32 if method is None else method << 6))
    body = v5_fields(flags, header.level, header.mixer,
                     (header.context, header.segment_tokens, header.lanes, header.block_size),
                     header.model_name.encode(), model_id, header.model_fingerprint, header.dict_id, header.prompt_check)
    return body + (struct.pack("<I", zlib.crc32(body)) if method is None else b"")


def short_check(head: bytes, raw: bytes) -> bytes:
    """The documented short-form check: BLAKE2b-32, personalised ``lmcodec-v5``, of the header's bytes and raw."""
    import hashlib

    return hashlib.blake2b(head + raw, digest_size=4, person=b"lmcodec-v5").digest()


@settings(max_examples=200, deadline=None)
@given(headers())
def test_header_layout(header):
    """The packed header is exactly the documented v5 layout (docs/FORMAT.md)."""
    assert header.pack() == v5_header(header, None)
    # 5 + (mixer and two varints at level 0) + lanes and block size varints when not both the
    # defaults + (the id, or 1 + n + 8 when it names another model) + 4 with a dictionary
    # + (4 with a prompt) + the CRC in the general form
    size = 5 + (1 + len(ref_varint(header.context)) + len(ref_varint(header.segment_tokens))) * (header.level == 0)
    if (header.lanes, header.block_size) != (64, 4 << 20):
        size += len(ref_varint(header.lanes)) + len(ref_varint(header.block_size))
    pinned = {MODEL_IDS[i]: fp[:8] for i, fp in MODEL_FINGERPRINTS.items()}
    if pinned.get(header.model_name) == header.model_fingerprint:
        size += 1
    elif header.model_name or any(header.model_fingerprint):
        size += 9 + len(header.model_name.encode())
    size += 4 * bool(header.dict_id) + 4 * header.has_prompt
    assert len(header.fields(Method.LM)) == size and len(header.pack()) == size + 4


def _default_header(**kw) -> Header:
    lv = LEVELS[6]
    fields = dict(model_name="smollm2-135m", model_fingerprint=DEFAULT_FP, tokenizer_fingerprint=b"",
                  prompt_check=bytes(4), has_prompt=False, context=lv.context, segment_tokens=lv.segment_tokens,
                  lanes=64, block_size=4 << 20, level=6, mixer=lv.mixer)
    fields.update(kw)
    return Header(**fields)


def payload_check_of(framing: bytes, payloads: list[bytes]) -> bytes:
    """The documented v6 payload check: BLAKE2b-32, personalised ``lmcodec-v6-pay``, of every byte
    before it (header, lengths, content check), then the payloads."""
    import hashlib

    return hashlib.blake2b(framing + b"".join(payloads), digest_size=4, person=b"lmcodec-v6-pay").digest()


def test_a_small_file_has_at_most_16_bytes_of_framing():
    """One block of the default model at a level, a 32-bit check included: a record under the
    payload-check threshold keeps at most 16 bytes of framing; from PAYLOAD_CHECK_TOKENS tokens on
    the 4-byte payload check follows the content check."""
    h = _default_header()
    for raw_len, n_tokens, words, framing in ((197, 60, 8, 14), (250, PAYLOAD_CHECK_TOKENS - 1, 9, 14),
                                              (250, PAYLOAD_CHECK_TOKENS, 9, 14 + 4), (1400, 400, 16, 15 + 4),
                                              (12000, 3000, 470, 16 + 4)):
        raw = bytes(raw_len)
        block = Block.build(Method.LM, raw, [bytes(4 * words)], segment_layout(n_tokens, 8192))
        blob = pack_short(h, block, raw)
        assert len(blob) - 4 * words == framing, raw_len
        head = b"\x89L\x06" + bytes([2 << 6 | 4, 6, 1])  # magic, version, flags (LM, model id), level, id
        assert blob[:6] == head
        lengths = ref_varint(raw_len) + ref_varint(n_tokens) + ref_varint(words)
        expected = head + lengths + short_check(head, raw)
        if n_tokens >= PAYLOAD_CHECK_TOKENS:
            expected += payload_check_of(expected, block.payloads)
        assert blob[:framing] == expected
        rh, blocks, end = _parse(blob)
        assert rh == h and blocks[0].verify(raw) and not blocks[0].verify(bytes([1]) + raw[1:])
        assert blocks[0].payload_checked == (n_tokens >= PAYLOAD_CHECK_TOKENS)
        assert (blocks[0].tokens, blocks[0].payloads, end.n_blocks, end.total_len) == (
            block.tokens, block.payloads, 1, raw_len)
    # A dictionary id adds its 4 bytes; a prompt its 4-byte check.
    raw = bytes(1400)
    block = Block.build(Method.LM, raw, [bytes(64)], [400])
    assert len(pack_short(_default_header(dict_id=b"\xd1\xc7\x00\x01"), block, raw)) - 64 == 19 + 4
    assert len(pack_short(_default_header(dict_id=b"\x01" * 4, model_name="", model_fingerprint=b""),
                          block, raw)) - 64 == 19 + 4 - 1   # the dictionary names the model
    assert len(pack_short(_default_header(has_prompt=True, prompt_check=prompt_check(b"k")), block, raw)) - 64 == 23
    # An empty input: no block, just the check of the header and no bytes.
    blob = pack_short(_default_header(), None, b"")
    assert len(blob) == 6 + 1 + 4 and _parse(blob)[1:] == ([], End(0, blob[-4:], 0))


def test_v5_short_form_has_no_payload_check():
    """Format v5 wrote no payload check at any size: its archives of 64 tokens or more still parse
    (the version byte, not the token count alone, says whether the check is there)."""
    raw = bytes(1400)
    head = v5_fields(2 << 6 | 4, 6, 0, (0, 0, 0, 0), version=5)
    blob = head + ref_varint(1400) + ref_varint(400) + ref_varint(16) + short_check(head, raw) + bytes(64)
    h, blocks, end = _parse(blob)
    assert h.version == 5 and not blocks[0].payload_checked and blocks[0].verify(raw) and end.total_len == 1400


def test_header_writes_what_the_format_holds():
    h = _default_header()
    assert len(h.pack()) == 6 + 4  # magic 2, version, flags, level, model id; the general form's CRC
    # The registered name with another fingerprint (another release of its weights) is written by name.
    other = _default_header(model_fingerprint=bytes(range(8)))
    assert len(other.pack()) == 5 + 1 + 12 + 8 + 4 and Reader(io.BytesIO(other.pack())).header() == other
    assert Reader(io.BytesIO(_default_header(model_name="my.gguf").pack())).header().model_name == "my.gguf"
    # Stored-only: no model fields at all; they read back empty.
    stored = Header("", b"", b"", bytes(4), False, 2048, 2048, 64, 4 << 20)
    assert len(stored.pack()) == 5 + 1 + 2 + 2 + 4 and stored.pack()[3] == 32 and stored.pack()[4] == 0
    got = Reader(io.BytesIO(stored.pack())).header()
    assert (got.model_name, got.model_fingerprint, got.tokenizer_fingerprint, got.dict_id) == ("", b"", b"", b"")
    p = Header("", b"", b"", prompt_check(b"k"), True, 2048, 2048, 64, 4 << 20)
    assert len(p.pack()) == len(stored.pack()) + 4 and Reader(io.BytesIO(p.pack())).header() == p
    assert p.prompt_matches(b"k") and not p.prompt_matches(b"j") and not p.prompt_matches(None)
    assert stored.prompt_matches(None) and not stored.prompt_matches(b"")
    # What the format cannot hold is refused when packing.
    for bad in (dict(level=10), dict(mixer=0x80), dict(has_prompt=False, prompt_check=b"x" * 4),
                dict(prompt_check=prompt_check(b"k", 8)), dict(dict_id=b"abc"),
                dict(model_name="m", model_fingerprint=bytes(16)), dict(tokenizer_fingerprint=bytes(8)),
                dict(level=6), dict(version=4)):
        with pytest.raises(ValueError):
            Header(**{**vars(p), **bad}).pack()


def test_v3_headers_still_read():
    """lmcodec 0.2's first layout: every field stored, 16 + 8 fingerprint bytes."""
    fps = bytes(range(24))
    blob = _resigned_header(v3_header(b"smollm2-135m", fps, None, 6, MIXER_MASK, (2048, 8192, 64, 4 << 20)))
    assert len(blob) - len(End(0, digest(b""), 0).pack()) == 58
    h = Reader(io.BytesIO(blob)).header()
    assert h == Header("smollm2-135m", fps[:16], fps[16:], bytes(8), False, 2048, 8192, 64, 4 << 20, level=6,
                       mixer=MIXER_MASK, version=3)
    stored = Reader(io.BytesIO(_resigned_header(v3_header(None, b"", b"k" * 8, 0, 0, (32, 4, 2, 4096))))).header()
    assert (stored.model_name, stored.model_fingerprint, stored.tokenizer_fingerprint) == ("", bytes(16), bytes(8))
    assert stored.has_prompt and stored.prompt_check == b"k" * 8 and stored.version == 3
    with pytest.raises(ValueError):
        h.pack()  # this lmcodec writes v4 only


def _resigned_header(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body)) + End(0, digest(b""), 0).pack()


@settings(max_examples=300, deadline=None)
@given(flags=st.integers(0, 255), level=st.integers(0, 255), mixer=st.integers(0, 255),
       values=st.lists(st.one_of(st.integers(0, 20000), st.integers(0, VARINT_MAX)), min_size=4, max_size=4),
       name=st.binary(max_size=12), fps=st.binary(min_size=24, max_size=24), pcheck=st.binary(min_size=8, max_size=8))
def test_resigned_v3_header_fields_parse_in_range_or_fail_cleanly(flags, level, mixer, values, name, fps, pcheck):
    """Any value in any v3 header field, with a valid CRC: an in-range header or a clean refusal."""
    body = MAGIC + bytes([3, flags, level, mixer]) + b"".join(encode_varint(v) for v in values)
    if flags & 2:
        body += bytes([len(name)]) + name + fps
    if flags & 1:
        body += pcheck
    blob = _resigned_header(body)
    try:
        h = Reader(io.BytesIO(blob), len(blob)).header()
    except ArchiveError as exc:
        assert "\n" not in str(exc)
        context, seg, lanes, block = values
        name_ok = not flags & 2 or ((name or any(fps)) and _utf8(name))
        assert (flags & ~3 or level > 9 or mixer & ~MIXER_MASK
                or not 16 <= context <= MAX_CONTEXT or not 1 <= seg <= 1 << 30
                or not 1 <= lanes <= MAX_LANES or not 4096 <= block <= 64 << 20 or not name_ok)
    else:
        assert (h.context, h.segment_tokens, h.lanes, h.block_size, h.level, h.mixer) == (*values, level, mixer)
        assert h.has_prompt == bool(flags & 1) and h.prompt_check == (pcheck if flags & 1 else bytes(8))
        assert h.version == 3
        if flags & 2:
            assert (h.model_name.encode(), h.model_fingerprint + h.tokenizer_fingerprint) == (name, fps)
        else:
            assert (h.model_name, h.model_fingerprint, h.tokenizer_fingerprint) == ("", bytes(16), bytes(8))


@settings(max_examples=400, deadline=None)
@given(flags=st.integers(0, 255), level=st.integers(0, 255), mixer=st.integers(0, 255),
       values=st.lists(st.one_of(st.integers(0, 20000), st.just(64), st.just(4 << 20), st.integers(0, VARINT_MAX)),
                       min_size=4, max_size=4),
       model_id=st.integers(0, 3), name=st.binary(max_size=12), fp=st.binary(min_size=8, max_size=8),
       pcheck=st.binary(min_size=8, max_size=8))
def test_resigned_v4_header_fields_parse_in_range_or_fail_cleanly(flags, level, mixer, values, model_id, name, fp,
                                                                  pcheck):
    """Any value in any v4 header field, with a valid CRC: an in-range header that packs
    back to the same bytes (one encoding per header), or a clean one-line refusal."""
    context, seg, lanes, block = values
    blob = _resigned_header(v4_body(flags, level, mixer, values, name, model_id, fp, pcheck))
    try:
        h = Reader(io.BytesIO(blob), len(blob)).header()
    except UnsupportedFormatError as exc:
        assert flags & 6 == 6 and model_id not in MODEL_IDS and "registered model" in str(exc)
    except ArchiveError as exc:
        assert "\n" not in str(exc)
        if level and level <= 9:
            context, seg, mixer = LEVELS[level].context, LEVELS[level].segment_tokens, LEVELS[level].mixer
        lanes, block = (lanes if flags & 8 else 64), (block if flags & 16 else 4 << 20)
        name_ok = not flags & 2 or flags & 4 or ((name or any(fp)) and _utf8(name))
        assert (flags & ~31 or level > 9 or (flags & 4 and not flags & 2) or (flags & 8 and lanes == 64)
                or (flags & 16 and block == 4 << 20) or mixer & ~MIXER_MASK
                or not 16 <= context <= MAX_CONTEXT or not 1 <= seg <= 1 << 30
                or not 1 <= lanes <= MAX_LANES or not 4096 <= block <= 64 << 20 or not name_ok)
    else:
        assert h.version == 4 and h.level == level and h.has_prompt == bool(flags & 1)
        assert (h.lanes, h.block_size) == (lanes if flags & 8 else 64, block if flags & 16 else 4 << 20)
        if level:
            assert LEVELS[level] == Level(h.segment_tokens, h.context, h.mixer)
        else:
            assert (h.context, h.segment_tokens, h.mixer) == (context, seg, mixer)
        assert h.prompt_check == (pcheck if flags & 1 else bytes(8))
        assert h.model_fingerprint == (fp if flags & 2 else b"") and h.tokenizer_fingerprint == b""
        if flags & 4:
            assert h.model_name == MODEL_IDS[model_id]
        if not (flags & 2 and not flags & 4 and name in {n.encode() for n in MODEL_ID_OF}):  # packs as its id
            assert v4_header(h) == blob[:len(v4_header(h))]  # one encoding per header


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_header_refuses_what_no_encoder_writes():
    ok = MAGIC + bytes([4, 0, 0, 0]) + b"".join(encode_varint(v) for v in (32, 4))
    assert Reader(io.BytesIO(_resigned_header(ok))).header().level == 0
    for body in (MAGIC + bytes([4, 32, 0, 0]) + ok[8:],                      # an unknown flag bit
                 MAGIC + bytes([4, 0, 10]),                                   # level 10
                 MAGIC + bytes([4, 0, 0, 0x80]) + ok[8:],                    # an unknown mixer bit
                 MAGIC + bytes([4, 2, 0, 0]) + ok[8:] + bytes(1 + 8),        # names a model, but none
                 MAGIC + bytes([4, 4, 0, 0]) + ok[8:] + b"\x01",             # an id without a model
                 MAGIC + bytes([4, 8, 0, 0]) + ok[8:] + encode_varint(64),   # the default lanes, stored
                 MAGIC + bytes([4, 16, 0, 0]) + ok[8:] + encode_varint(4 << 20),  # the default block size
                 ok[:8] + b"\xa0\x00" + ok[9:],                               # non-minimal context (32 in 2 bytes)
                 ok[:8] + b"\xff" * 10 + b"\x01" + ok[9:]):                   # an 11-byte varint
        with pytest.raises(CorruptArchiveError):
            Reader(io.BytesIO(_resigned_header(body))).header()
    with pytest.raises(UnsupportedFormatError, match="registered model #9"):
        Reader(io.BytesIO(_resigned_header(MAGIC + bytes([4, 6, 6, 9]) + bytes(8)))).header()
    v3 = v3_header(None, b"", None, 0, 0, (32, 4, 2, 4096))
    assert Reader(io.BytesIO(_resigned_header(v3))).header().version == 3
    for body in (v3[:5] + bytes([4]) + v3[6:],                                # an unknown v3 flag bit
                 v3_header(b"", bytes(24), None, 0, 0, (32, 4, 2, 4096))):    # names a model, but none
        with pytest.raises(CorruptArchiveError):
            Reader(io.BytesIO(_resigned_header(body))).header()


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.integers(0, 300), st.integers(0, VARINT_MAX)))
def test_varint_round_trip(n):
    b = encode_varint(n)
    assert b == ref_varint(n) and 1 <= len(b) <= 10 and len(b) == max(1, -(-n.bit_length() // 7))
    assert decode_varint(b) == (n, len(b))
    assert decode_varint(b"xy" + b + b"tail", 2) == (n, 2 + len(b))
    assert decode_varint(b, max_value=n) == (n, len(b))
    if n:
        with pytest.raises(CorruptArchiveError, match="out of range"):
            decode_varint(b, max_value=n - 1)
    for cut in range(len(b)):  # data that ends inside it is truncated, never read past
        with pytest.raises(TruncatedArchiveError):
            decode_varint(memoryview(b)[:cut])


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**63), st.integers(1, 9))
def test_varint_non_minimal_and_overlong_are_refused(n, pad):
    b = bytearray(encode_varint(n))
    b[-1] |= 0x80
    padded = bytes(b) + b"\x80" * (pad - 1) + b"\x00"  # the same value, with zero groups after it
    with pytest.raises(CorruptArchiveError):
        decode_varint(padded)
    with pytest.raises(CorruptArchiveError, match="longer than 10"):
        decode_varint(b"\x80" * 10 + b"\x00")
    with pytest.raises(CorruptArchiveError, match="longer than 10"):
        decode_varint(b"\xff" * 11)
    with pytest.raises(CorruptArchiveError, match="out of range"):  # 10 bytes, above 2^64 - 1
        decode_varint(b"\xff" * 9 + b"\x02")
    for bad in (-1, VARINT_MAX + 1):
        with pytest.raises(ValueError):
            encode_varint(bad)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, VARINT_MAX), st.lists(st.tuples(st.integers(0, VARINT_MAX), st.integers(0, 2**32 - 1)),
       max_size=8), st.sampled_from(list(Method)), st.integers(0, VARINT_MAX), st.binary(min_size=8, max_size=8))
def test_block_table_layout(n_tokens, streams, method, raw_len, check):
    """The packed block table is exactly the documented layout (docs/FORMAT.md)."""
    entries = [StreamEntry(*e) for e in streams]
    fixed = bytes([0x42, method]) + ref_varint(raw_len) + check
    if method == Method.LM:
        packed = Block(method, raw_len, check, [n_tokens], entries, []).pack()
        table = fixed + ref_varint(n_tokens)
        table += b"".join(ref_varint(e.payload_len) + struct.pack("<I", e.payload_crc) for e in entries)
    else:
        e = StreamEntry(raw_len if method == Method.RAW else streams[0][0] if streams else 7, 99)
        packed = Block(method, raw_len, check, [], [e], []).pack()
        table = fixed + (ref_varint(e.payload_len) if method == Method.ZSTD else b"") + struct.pack("<I", 99)
    assert packed == table + struct.pack("<I", zlib.crc32(table))
    assert len(fixed) == 2 + len(ref_varint(raw_len)) + 8


@settings(max_examples=200, deadline=None)
@given(seg=st.integers(1, 64), lanes=st.integers(1, 8), raw_len=st.integers(1, 3000), data=st.data())
def test_block_tables_with_arbitrary_token_counts_and_streams(seg, lanes, raw_len, data):
    """Any token count: the streams follow from it; honest entries parse back, others fail cleanly."""
    header = _header(segment_tokens=seg, lanes=lanes)
    n = data.draw(st.integers(1, raw_len))
    layout = segment_layout(n, seg)
    groups = stream_groups(len(layout), lanes)
    assert stream_count(n, seg, lanes) == len(groups)
    assert [stream_tokens(i, n, seg, lanes) for i in range(len(groups))] == [sum(layout[j] for j in g)
                                                                              for g in groups]
    payloads = [data.draw(_words(lm_payload_limit(sum(layout[j] for j in g)))) for g in groups]
    raw = bytes(raw_len)
    honest = Block.build(Method.LM, raw, payloads, layout)
    blob = header.pack() + honest.pack() + End(raw_len, digest(raw), 1).pack()
    assert _parse(blob)[1] == [honest]
    # Arbitrary entries (any count, any lengths and CRCs) under a valid block CRC.
    entries = data.draw(st.lists(st.tuples(st.one_of(st.integers(0, 80), st.integers(0, VARINT_MAX)),
                                           st.integers(0, 2**32 - 1)), max_size=len(groups) + 2))
    forged = Block(Method.LM, raw_len, digest(raw), layout, [StreamEntry(*e) for e in entries], [])
    tail = b"".join(payloads)
    blob = header.pack() + forged.pack() + tail + End(raw_len, digest(raw), 1).pack()
    try:
        _, blocks, _ = _parse(blob)
    except ArchiveError as exc:
        assert "\n" not in str(exc)
    else:  # only what an honest encoder could have written gets through
        assert len(blocks) == 1 and blocks[0].tokens == layout and len(blocks[0].streams) == len(groups)
        for i, e in enumerate(blocks[0].streams):
            assert e.payload_len % 4 == 0 and 4 <= e.payload_len <= lm_payload_limit(stream_tokens(i, n, seg, lanes))


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
    blob = bytearray(pack_short(_header(), Block.build(Method.RAW, b"abc", [b"abc"], []), b"abc"))
    blob[2] = 9
    with pytest.raises(UnsupportedFormatError, match="version 9"):
        _parse(bytes(blob))
    old_magic = MAGIC + bytes([9]) + blob[3:]   # a version after the 4-byte magic is named too
    with pytest.raises(UnsupportedFormatError, match="version 9"):
        _parse(old_magic)
    for blob in (b"\x89LM", b"\x89LMX\x04" + bytes(30)):
        with pytest.raises((NotAnArchiveError, TruncatedArchiveError)):
            _parse(blob)


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


def test_huge_declared_token_count_is_refused_before_allocation():
    """Token counts implying millions of streams (1-token segments, one lane): refused from the
    counts and the bytes that remain, before anything is allocated from them."""
    for pipe in (False, True):
        for seg, lanes, raw_len, n in ((1, 1, 4096, 4096), (1, 1, 1 << 20, 1 << 20), (1, 1, 4096, VARINT_MAX),
                                       (1, 1, VARINT_MAX, 1), (2048, 4096, 4096, 0)):
            header = _header(segment_tokens=seg, lanes=lanes, block_size=4096).pack()
            body = bytes([0x42, Method.LM]) + encode_varint(raw_len) + bytes(8) + encode_varint(n)
            body += encode_varint(4) + bytes(4)  # one stream entry, where thousands are implied
            blob = header + body + struct.pack("<I", zlib.crc32(body)) + bytes(4)
            tracemalloc.start()
            try:
                with pytest.raises((CorruptArchiveError, TruncatedArchiveError)):
                    reader = Reader(io.BytesIO(blob), None if pipe else len(blob))
                    h = reader.header()
                    reader.next(h)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < 64 * 1024, (seg, lanes, raw_len, n, peak)


def _lm_block_archive(header: Header, tokens: list[int], payload_lens: list[int]) -> bytes:
    payloads = [bytes(n) for n in payload_lens]
    raw = b"x" * max(sum(tokens), 1)
    block = Block.build(Method.LM, raw, payloads, tokens)
    return header.pack() + block.pack() + End(len(raw), digest(raw), 1).pack()


def _header(**kw) -> Header:
    fields = dict(model_name="", model_fingerprint=b"", tokenizer_fingerprint=b"",
                  prompt_check=bytes(4), has_prompt=False, context=32, segment_tokens=4, lanes=2,
                  block_size=4096)
    fields.update(kw)
    return Header(**fields)


def test_stream_count_must_follow_the_lanes():
    """The stream table has exactly one entry per ``lanes`` segments of the token count:
    a table written for other lanes does not parse (its CRC is not where the header puts it)."""
    h = _header()
    tokens = [4, 4, 4, 1]                     # 4 segments, 2 lanes: 2 streams
    assert len(_parse(_lm_block_archive(h, tokens, [8, 8]))[1][0].streams) == 2
    for streams in ([8], [8, 8, 8], [8, 8, 8, 8]):
        with pytest.raises(CorruptArchiveError, match="CRC mismatch|impossible number|varint"):
            _parse(_lm_block_archive(h, tokens, streams))
    # The same block under a header with 4 lanes needs exactly one stream.
    assert len(_parse(_lm_block_archive(_header(lanes=4), tokens, [8]))[1][0].streams) == 1
    with pytest.raises(CorruptArchiveError):
        _parse(_lm_block_archive(_header(lanes=4), tokens, [8, 8]))


def test_token_count_must_fit_the_block():
    """At least one token, at most one per byte (the segments are derived from the count)."""
    h = _header()
    for n, raw_len in ((0, 5), (6, 5), (1, 0)):
        body = bytes([0x42, Method.LM]) + encode_varint(raw_len) + bytes(8) + encode_varint(n)
        body += (encode_varint(4) + struct.pack("<I", zlib.crc32(bytes(4)))) * max(1, stream_count(n, 4, 2))
        blob = h.pack() + body + struct.pack("<I", zlib.crc32(body)) + bytes(4) + End(raw_len, bytes(8), 1).pack()
        with pytest.raises(CorruptArchiveError, match="impossible number of tokens"):
            _parse(blob)
    assert _parse(_lm_block_archive(h, [4, 1], [8]))[1][0].tokens == [4, 1]


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
    """The format has no room for segments or a second stream in a stored block (and a raw
    block's payload is its bytes): the writer refuses such a block."""
    raw = b"hello"
    for method in (Method.RAW, Method.ZSTD):
        for tokens, payloads in (([1], [raw]), ([], [raw, raw]), ([], [])):
            with pytest.raises(ValueError):
                Block.build(method, raw, payloads, tokens).pack()
    with pytest.raises(ValueError):
        Block.build(Method.RAW, raw, [raw + b"!"], []).pack()
    # A zstd payload longer than any frame of the block is refused by the reader.
    h = _header()
    big = bytes(5 + 1024 + 1)
    block = Block.build(Method.ZSTD, raw, [big], [])
    with pytest.raises(CorruptArchiveError, match="stored payload length"):
        _parse(h.pack() + block.pack() + End(len(raw), digest(raw), 1).pack())


def test_end_record_layout():
    """The content check is stored from two blocks on; with one block it is the block's check."""
    end = End(3721, bytes(range(8)), 1)
    body = b"\x45" + ref_varint(3721) + ref_varint(1)
    assert end.pack() == body + struct.pack("<I", zlib.crc32(body)) and len(end.pack()) == 8
    end = End(300, bytes(range(8)), 2)
    body = b"\x45" + ref_varint(300) + ref_varint(2) + bytes(range(8))
    assert end.pack() == body + struct.pack("<I", zlib.crc32(body)) and len(end.pack()) == 16
    assert len(End(0, digest(b""), 0).pack()) == 7


def test_end_record_check_is_filled_in_when_not_stored():
    import zstandard

    raw = b"hello"
    h = _header()
    block = Block.build(Method.ZSTD, raw, [zstandard.ZstdCompressor(level=1).compress(raw)], [])
    assert _parse(h.pack() + block.pack() + End(len(raw), bytes(8), 1).pack())[2].check == digest(raw)
    assert _parse(h.pack() + End(0, bytes(8), 0).pack())[2].check == digest(b"")
    two = h.pack() + block.pack() + block.pack() + End(2 * len(raw), digest(raw + raw), 2).pack()
    assert _parse(two)[2].check == digest(raw + raw)


def test_prompt_check_distinguishes_prompts():
    assert prompt_check(None) == bytes(4) and prompt_check(None, 8) == bytes(8)
    assert prompt_check(b"a") != prompt_check(b"b") and prompt_check(b"a", 8)[:4] == prompt_check(b"a")
    assert MAGIC.startswith(b"\x89")


# -- v5 short form (one block, no CRCs: one check over the header and the original) ----------

@st.composite
def short_archives(draw):
    """A short-form archive as an encoder writes it: a header, at most one block."""
    header = draw(headers())
    raw = draw(st.binary(max_size=64))
    block = None
    if raw:
        kind = draw(st.sampled_from(["raw", "zstd", "lm"]))
        if kind == "raw":
            block = Block.build(Method.RAW, raw, [raw], [])
        elif kind == "zstd":
            import zstandard

            block = Block.build(Method.ZSTD, raw, [zstandard.ZstdCompressor(level=1).compress(raw)], [])
        else:
            tokens = segment_layout(draw(st.integers(1, len(raw))), header.segment_tokens)
            groups = stream_groups(len(tokens), header.lanes)
            payloads = [draw(_words(lm_payload_limit(sum(tokens[i] for i in g)))) for g in groups]
            block = Block.build(Method.LM, raw, payloads, tokens)
    return header, block, raw, pack_short(header, block, raw)


def _verified(blob: bytes) -> tuple[Header, list[Block], End, bytes]:
    """Parse ``blob`` and check what a decoder checks without the model: stored blocks' bytes
    against their check, and the end record; return them too (an LM block's are the caller's)."""
    import zstandard

    reader = Reader(io.BytesIO(blob), len(blob))
    header = reader.header()
    blocks, hasher, content = [], reader.content_hasher(), b""
    while not isinstance(rec := reader.next(header), End):
        blocks.append(rec)
        if rec.method != Method.LM:
            try:
                raw = rec.payloads[0] if rec.method == Method.RAW else zstandard.ZstdDecompressor().decompress(
                    rec.payloads[0], max_output_size=rec.raw_len)
            except zstandard.ZstdError as exc:  # the codec reports it as a CorruptArchiveError
                raise CorruptArchiveError(str(exc)) from exc
            if not rec.verify(raw):
                raise lmcodec.errors.ChecksumError("block check")
            hasher.update(raw)
            content += raw
    if not blocks and hasher.digest() != rec.check:
        raise lmcodec.errors.ChecksumError("empty content check")
    return header, blocks, rec, content


@settings(max_examples=200, deadline=None)
@given(short_archives())
def test_short_form_round_trip_and_layout(arch):
    header, block, raw, blob = arch
    head = v5_header(header, block.method if block else 0)
    body = ref_varint(len(raw))
    if block and block.method == Method.LM:
        body += ref_varint(len(block.tokens) and sum(block.tokens)) + b"".join(ref_varint(len(p) // 4)
                                                                                for p in block.payloads)
    elif block and block.method == Method.ZSTD:
        body += ref_varint(len(block.payloads[0]))
    payloads = b"".join(block.payloads) if block else b""
    assert blob == head + body + short_check(head, raw) + payloads  # the documented layout
    parsed, blocks, end, _ = _verified(blob)
    assert parsed == header and (end.total_len, end.n_blocks) == (len(raw), 1 if raw else 0)
    if raw:
        (got,) = blocks
        assert (got.method, got.raw_len, got.tokens, got.streams, got.payloads) == (
            block.method, block.raw_len, block.tokens, block.streams, block.payloads)
        assert got.verify(raw) and end.check == got.check
        h = Reader(io.BytesIO(blob), len(blob))
        h.header()
        hasher = h.content_hasher()
        hasher.update(raw)
        assert hasher.digest() == end.check


@settings(max_examples=300, deadline=None)
@given(short_archives(), st.data())
def test_short_form_any_single_bit_change_is_caught(arch, data):
    """A flipped bit fails the parse, a stored block's check, or leaves an LM block whose
    header key, lengths or payloads differ (so its check fails after decoding)."""
    header, block, raw, blob = arch
    i = data.draw(st.integers(0, len(blob) - 1))
    bad = bytearray(blob)
    bad[i] ^= 1 << data.draw(st.integers(0, 7))
    try:
        _, blocks, end, content = _verified(bytes(bad))
    except ArchiveError as exc:
        assert "\n" not in str(exc)
        return
    if not blocks or blocks[0].method != Method.LM:
        assert content == raw   # a redundant bit of a zstd frame: the same bytes, never others
        return
    got = blocks[0]
    assert (not got.verify(raw) or (got.tokens, got.payloads) != (block.tokens, block.payloads))


@settings(max_examples=200, deadline=None)
@given(short_archives(), st.data())
def test_short_form_every_truncation_and_extension_is_caught(arch, data):
    _, _, _, blob = arch
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(ArchiveError):
        _parse(blob[:cut])
    with pytest.raises(ArchiveError, match="trailing"):
        _parse(blob + data.draw(st.binary(min_size=1, max_size=4)))


@settings(max_examples=400, deadline=None)
@given(flags=st.integers(0, 255), level=st.integers(0, 255), mixer=st.integers(0, 255),
       values=st.lists(st.one_of(st.integers(0, 20000), st.just(64), st.just(4 << 20), st.integers(0, VARINT_MAX)),
                       min_size=4, max_size=4),
       model_id=st.integers(0, 3), name=st.one_of(st.binary(max_size=12), st.just(b"smollm2-135m")),
       fp=st.one_of(st.binary(min_size=8, max_size=8), st.just(DEFAULT_FP)), dict_id=st.binary(min_size=4, max_size=4),
       pcheck=st.binary(min_size=4, max_size=4), raw=st.binary(max_size=8), version=st.sampled_from([5, 6]))
def test_v5_header_fields_parse_in_range_or_fail_cleanly(flags, level, mixer, values, model_id, name, fp, dict_id,
                                                         pcheck, raw, version):
    """Any value in any v5 or v6 header field (short form, then a raw block; or the general form with a
    valid CRC): an in-range header that packs back to the same bytes (v6, what is written), or a clean
    one-line refusal."""
    context, seg, lanes, block = values
    head = v5_fields(flags, level, mixer, values, name, model_id, fp, dict_id, pcheck, version)
    if flags & 32:
        blob = _resigned_header(head)
    else:
        blob = head + ref_varint(len(raw)) + short_check(head, raw) + raw
    try:  # the header alone (the block after it is a raw one, whatever the method bits say)
        h = Reader(io.BytesIO(blob), len(blob), prescan=False).header()
    except UnsupportedFormatError as exc:
        assert flags & 4 and model_id not in MODEL_FINGERPRINTS and "registered model" in str(exc)
    except ArchiveError as exc:
        assert "\n" not in str(exc)
        if level and level <= 9:
            context, seg, mixer = LEVELS[level].context, LEVELS[level].segment_tokens, LEVELS[level].mixer
        lanes, block = (lanes, block) if flags & 16 else (64, 4 << 20)
        name_ok = not flags & 8 or ((name or any(fp)) and _utf8(name) and not (name == b"smollm2-135m"
                                                                               and fp == DEFAULT_FP))
        assert (level > 9 or flags & 12 == 12 or (flags & 16 and (lanes, block) == (64, 4 << 20))
                or (flags & 32 and flags >> 6) or flags >> 6 == 3 or mixer & ~MIXER_MASK
                or not 16 <= context <= MAX_CONTEXT or not 1 <= seg <= 1 << 30
                or not 1 <= lanes <= MAX_LANES or not 4096 <= block <= 64 << 20 or not name_ok)
    else:
        assert h.version == version and h.level == level and h.has_prompt == bool(flags & 1)
        assert (h.lanes, h.block_size) == ((lanes, block) if flags & 16 else (64, 4 << 20))
        if level:
            assert LEVELS[level] == Level(h.segment_tokens, h.context, h.mixer)
        else:
            assert (h.context, h.segment_tokens, h.mixer) == (context, seg, mixer)
        assert h.prompt_check == (pcheck if flags & 1 else bytes(4)) and h.dict_id == (dict_id if flags & 2 else b"")
        if flags & 4:
            assert (h.model_name, h.model_fingerprint) == (MODEL_IDS[model_id], MODEL_FINGERPRINTS[model_id][:8])
        else:
            assert h.model_fingerprint == (fp if flags & 8 else b"")
        if version == VERSION:
            assert h.fields(None if flags & 32 else flags >> 6) == head  # one encoding per header


def test_v5_refuses_what_no_encoder_writes():
    ok = v5_fields(0, 0, 0, (32, 4, 0, 0))
    blob = ok + b"\x00" + short_check(ok, b"")
    assert _parse(blob)[2] == End(0, blob[-4:], 0)
    raw = b"abc"
    for head, rest in (
            (v5_fields(3 << 6, 0, 0, (32, 4, 0, 0)), b"\x03"),                    # method 3
            (v5_fields(32 | 1 << 6, 0, 0, (32, 4, 0, 0)), b""),                  # a method in the general form
            (v5_fields(12, 0, 0, (32, 4, 0, 0), b"m", 1, bytes(8)), b"\x03"),    # model by id and by name
            (v5_fields(8, 0, 0, (32, 4, 0, 0), b"", 1, bytes(8)), b"\x03"),      # names a model, but none
            (v5_fields(8, 6, 0, (0, 0, 0, 0), b"smollm2-135m", 1, DEFAULT_FP), b"\x03"),  # the id's own model by name
            (v5_fields(16, 0, 0, (32, 4, 64, 4 << 20)), b"\x03"),                # the default layout, stored
            (v5_fields(0, 10, 0, (32, 4, 0, 0)), b"\x03")):                      # level 10
        blob = (_resigned_header(head) if head[3] & 32 else head + rest + short_check(head, raw) + raw)
        with pytest.raises(CorruptArchiveError):
            _parse(blob)
    # Block fields: the raw length over the block size, tokens, stream and zstd lengths out of range.
    lm = v5_fields(2 << 6, 0, 0, (32, 4, 0, 0))
    zs = v5_fields(1 << 6, 0, 0, (32, 4, 0, 0))
    for head, body in ((ok, ref_varint((4 << 20) + 1)), (lm, b"\x05\x00\x01"), (lm, b"\x05\x06\x01"),
                       (lm, b"\x05\x02\x00"), (lm, b"\x05\x02" + ref_varint(lm_payload_limit(2) // 4 + 1)),
                       (lm, b"\x00"), (zs, b"\x00"), (zs, b"\x05\x00"), (zs, b"\x05" + ref_varint(5 + 1025))):
        blob = head + body + short_check(head, raw) + bytes(64)
        with pytest.raises(CorruptArchiveError, match="invalid fields|impossible|length|empty block"):
            _parse(blob)
    with pytest.raises(UnsupportedFormatError, match="registered model #9"):
        _parse(v5_fields(4, 6, 0, (0, 0, 0, 0), model_id=9) + b"\x00" + bytes(4))


def test_short_form_stream_table_is_bounded_before_allocation():
    """A token count implying millions of one-token segments is refused from the bytes that remain."""
    head = _header(segment_tokens=1, lanes=1, block_size=1 << 20).fields(Method.LM)
    for pipe in (False, True):
        blob = head + ref_varint(1 << 20) + ref_varint(1 << 20) + b"\x01" + bytes(8)
        tracemalloc.start()
        try:
            with pytest.raises((CorruptArchiveError, TruncatedArchiveError)):
                reader = Reader(io.BytesIO(blob), None if pipe else len(blob))
                reader.next(reader.header())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 64 * 1024, peak
