#!/usr/bin/env python
"""Corruption campaign: damage real archives and check that the decoder never lies.

Real archives are made with the real default model (SmolLM2-135M, small
segments so each takes a few seconds) and with the stored methods (zstd, raw,
several blocks).  Each one is then corrupted many ways:

* ``flip-header-bit``: every bit of every header, one at a time (exhaustive);
* ``truncate-boundary``: cut at, just before and just after every structure
  boundary (every header field, every block-table field and stream entry, the
  block CRC, each payload, every end-record field; in format v5's short form,
  every header field, the block's lengths, its check and payloads);
* ``flip-random``: 1-3 random bits anywhere;  ``truncate-random``;
* ``splice``: a prefix of one archive + a suffix of another (random offsets,
  half of them at structure boundaries);
* ``version`` / ``fingerprint``: the format version or the model fingerprint
  changed (in a stored-only archive, which names no model, a model
  section is inserted), with and without re-signing the header CRC;
* ``resign-header`` / ``resign-block`` / ``resign-end``: one field of a header,
  block table (stream entries included) or end record changed to a random or
  hostile value -- a varint field re-encoded (its length may change), or
  replaced by a non-minimal or overlong encoding -- and the CRC recomputed with
  zlib.crc32, so the deeper checks are reached.  A short-form archive (at most
  one block: the corpus's archives of one block) has no CRC.  From format v6 an
  LM one of at least ``PAYLOAD_CHECK_TOKENS`` tokens carries a payload check over
  every byte but itself, so its damage is refused before the model; under that
  size (and in v5) the one check, over the header's bytes and the original, is
  verified after decoding, so a changed field that still parses reaches the
  model and fails after it.

Every result must be the exact original (e.g. a re-signed parameter a stored
block does not use) or an :class:`lmcodec.LMCodecError` with a one-line
message.  A wrong output, any other exception, or a case running past
``--timeout`` seconds is a failure (exit status 1).

Decoding an LM archive runs the 135M model (tens of ms a step on a CPU), so
the campaign counts how many cases reached the model (``ModelCache.engine``, where
an LM block's decoding starts running it): nearly all must be refused by the
CRC and structure checks first.  Mutations that by construction can only be
caught after the model ran (a re-signed block checksum, a token count the
block can still hold, a changed coding parameter of an LM archive) are
limited to ``--deep`` cases.  The report breaks "reached the model" down by the
class of the archive a case starts from: stored, LM general form, LM short form
with a payload check (must be 0), LM short form under the threshold.

    python scripts/corruption_campaign.py --count 10000 --seed 1 --json campaign.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import signal
import struct
import sys
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lmcodec  # noqa: E402
from lmcodec.errors import LMCodecError  # noqa: E402
from lmcodec.format.container import (  # noqa: E402
    MODEL_IDS,
    PAYLOAD_CHECK_TOKENS,
    decode_varint,
    encode_varint,
    has_payload_check,
)

LM_SETTINGS = dict(segment_tokens=24, lanes=2, context=32, threads=2)

#: Formats v4 and v5 (lmcodec/format/container.py, docs/FORMAT.md): a field is (name, start, end, kind), kind one
#: of "u8", "varint", "u32" (a CRC32 inside a table), "8s" (digests, fingerprints, checks, ids: any
#: length), "name", or "mark" (an empty field: where the header's settings end).
FLAG_PROMPT, FLAG_MODEL, FLAG_MODEL_ID, FLAG_LANES, FLAG_BLOCK_SIZE = 1, 2, 4, 8, 16
#: v5 flags: prompt check, dictionary id, model id, model name, lanes + block size, general form; bits 6-7 method.
F5_PROMPT, F5_DICT, F5_MODEL_ID, F5_MODEL_NAME, F5_LAYOUT, F5_GENERAL = 1, 2, 4, 8, 16, 32
LM_METHOD, RAW_METHOD = 2, 0

TEXTS = {
    "prose": (b"It was the best of times, it was the worst of times, it was the age of wisdom, "
              b"it was the age of foolishness, it was the epoch of belief, it was the epoch of "
              b"incredulity, it was the season of Light, it was the season of Darkness.\n"),
    "code": (b"def fib(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
             b"    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
             b"if __name__ == '__main__':\n    print([fib(i) for i in range(10)])\n"),
    "unicode": ("Grüße aus Köln! Ein naïves Café, 日本語のテキスト, и немного русского текста. "
                "Emoji: 😀👍🏽. The end.\n").encode(),
}
#: Texts long enough (over PAYLOAD_CHECK_TOKENS tokens) for a v6 short-form archive's payload check.
LONG_TEXTS = {
    "prose-long": TEXTS["prose"] + TEXTS["code"],
    "mixed-long": TEXTS["unicode"] + TEXTS["code"] + TEXTS["prose"][:120],
}
PROMPT = b"A Tale of Two Cities, by Charles Dickens. Book the First: Recalled to Life."


@dataclass
class Record:
    """One CRC-covered structure: its fields, where it starts, where its CRC is."""

    kind: str                            # "header", "block" or "end"
    start: int
    crc: int | None                      # offset of the CRC32 of [start, crc); None: v5 short form
    fields: list[tuple[str, int, int, str]] = field(default_factory=list)
    payload_ends: list[int] = field(default_factory=list)
    method: int = -1
    raw_len: int = 0


@dataclass
class Sample:
    name: str
    blob: bytes
    original: bytes
    prompt: bytes | None
    lm: bool
    header_end: int = 0
    records: list[Record] = field(default_factory=list)
    end_start: int = 0
    payload_check: bool = False          # a v6 short-form LM archive whose damage is refused before the model

    @property
    def size_class(self) -> str:
        """Which of the reliability promise's cases the archive is (docs/RELIABILITY.md)."""
        if not self.lm:
            return "stored"
        if self.header.crc is not None:
            return "LM, general form"
        return ("LM, short form, payload check" if self.payload_check
                else f"LM, short form, under {PAYLOAD_CHECK_TOKENS} tokens")

    @property
    def checked_late(self) -> bool:
        """Whether damage to a field that still parses can only be found after the model ran."""
        return self.lm and self.header.crc is None and not self.payload_check

    @property
    def header(self) -> Record:
        return self.records[0]

    @property
    def blocks(self) -> list[Record]:
        return [r for r in self.records if r.kind == "block"]

    def hfield(self, name: str) -> tuple[str, int, int, str] | None:
        """A header field by name (None: not in this archive)."""
        return next((f for f in self.header.fields if f[0] == name), None)

    def boundaries(self) -> list[int]:
        b = {0, 4, len(self.blob)}
        for r in self.records:
            b |= {r.start, *r.payload_ends} | ({r.crc, r.crc + 4} if r.crc is not None else set())
            for _, start, end, kind in r.fields:
                b |= {start, end} | ({start + 1} if kind == "name" else set())  # a name: after its length
        return sorted(b)


def _varint_at(blob: bytes, pos: int) -> tuple[int, int]:
    return decode_varint(blob, pos)


def v4_header_fields(blob: bytes) -> tuple[list[tuple[str, int, int, str]], int]:
    """The fields of the v4 header at the start of ``blob`` (docs/FORMAT.md), and where its CRC is."""
    flags, level = blob[5], blob[6]
    fields = [("magic", 0, 4, "magic"), ("version", 4, 5, "u8"), ("flags", 5, 6, "u8"), ("level", 6, 7, "u8")]
    pos = 7
    names = (["mixer", "context", "segment_tokens"] if level == 0 else []) + (
        ["lanes"] if flags & FLAG_LANES else []) + (["block_size"] if flags & FLAG_BLOCK_SIZE else [])
    for name in names:
        end = pos + 1 if name == "mixer" else _varint_at(blob, pos)[1]
        fields.append((name, pos, end, "u8" if name == "mixer" else "varint"))
        pos = end
    fields.append(("settings_end", pos, pos, "mark"))
    if flags & FLAG_MODEL:
        if flags & FLAG_MODEL_ID:
            fields.append(("model_id", pos, pos + 1, "u8"))
            pos += 1
        else:
            fields.append(("name", pos, pos + 1 + blob[pos], "name"))
            pos += 1 + blob[pos]
        fields.append(("model_fingerprint", pos, pos + 8, "8s"))
        pos += 8
    if flags & FLAG_PROMPT:
        fields.append(("prompt_check", pos, pos + 8, "8s"))
        pos += 8
    return fields, pos


def v5_header_fields(blob: bytes) -> tuple[list[tuple[str, int, int, str]], int]:
    """The fields of the v5 header at the start of ``blob`` (docs/FORMAT.md), and where they end."""
    flags, level = blob[3], blob[4]
    fields = [("magic", 0, 2, "magic"), ("version", 2, 3, "u8"), ("flags", 3, 4, "u8"), ("level", 4, 5, "u8")]
    pos = 5
    names = (["mixer", "context", "segment_tokens"] if level == 0 else []) + (
        ["lanes", "block_size"] if flags & F5_LAYOUT else [])
    for name in names:
        end = pos + 1 if name == "mixer" else _varint_at(blob, pos)[1]
        fields.append((name, pos, end, "u8" if name == "mixer" else "varint"))
        pos = end
    fields.append(("settings_end", pos, pos, "mark"))
    if flags & F5_MODEL_ID:
        fields.append(("model_id", pos, pos + 1, "u8"))
        pos += 1
    elif flags & F5_MODEL_NAME:
        fields.append(("name", pos, pos + 1 + blob[pos], "name"))
        pos += 1 + blob[pos]
        fields.append(("model_fingerprint", pos, pos + 8, "8s"))
        pos += 8
    for flag, name in ((F5_DICT, "dict_id"), (F5_PROMPT, "prompt_check")):
        if flags & flag:
            fields.append((name, pos, pos + 4, "8s"))
            pos += 4
    return fields, pos


def header_fields(blob: bytes) -> tuple[list[tuple[str, int, int, str]], int, bool]:
    """The header's fields, where they end, and whether a CRC follows (v4, v5's general form)."""
    if blob[2] >= 5:
        fields, pos = v5_header_fields(blob)
        return fields, pos, bool(blob[3] & F5_GENERAL)
    fields, pos = v4_header_fields(blob)
    return fields, pos, True


def _describe_short(sample: Sample, pos: int, seg: int, lanes: int) -> None:
    """v5 short form after the header: raw length, an LM block's token count and stream lengths in
    words, or a zstd block's payload length; the check; the payloads (no CRC, no end record)."""
    blob = sample.blob
    r = Record("block", pos, None, [])
    r.method = blob[3] >> 6
    r.raw_len, p = _varint_at(blob, pos)
    r.fields.append(("raw_len", pos, p, "varint"))
    lengths = []
    if r.method == LM_METHOD:
        n_tokens, end = _varint_at(blob, p)
        r.fields.append(("n_tokens", p, end, "varint"))
        p = end
        for i in range(-(-(-(-n_tokens // seg)) // lanes)):
            words, end = _varint_at(blob, p)
            r.fields.append((f"stream{i}.payload_words", p, end, "varint"))
            lengths.append(4 * words)
            p = end
    elif r.method == RAW_METHOD:
        lengths.append(r.raw_len)
    else:
        length, end = _varint_at(blob, p)
        r.fields.append(("payload_len", p, end, "varint"))
        lengths.append(length)
        p = end
    r.fields.append(("check", p, p + 4, "8s"))
    p += 4
    if has_payload_check(blob[2], r.method, n_tokens if r.method == LM_METHOD else 0):
        r.fields.append(("payload_check", p, p + 4, "8s"))
        sample.payload_check = True
        p += 4
    for length in lengths:
        p += length
        r.payload_ends.append(p)
    assert p == len(blob), sample.name
    sample.records.append(r)
    sample.end_start = len(blob)


def describe(sample: Sample) -> Sample:
    """Fill in the structure of a valid archive: every field of every record."""
    blob = sample.blob
    fields, pos, signed = header_fields(blob)
    h = Record("header", 0, pos if signed else None, fields)
    sample.records = [h]
    header = lmcodec.format.reader.Reader(io.BytesIO(blob), len(blob)).header()
    seg, lanes = header.segment_tokens, header.lanes
    if not signed:
        sample.header_end = pos
        _describe_short(sample, pos, seg, lanes)
        return sample
    sample.header_end = pos = pos + 4
    while blob[pos] == 0x42:
        r = Record("block", pos, 0, [("tag", pos, pos + 1, "u8"), ("method", pos + 1, pos + 2, "u8")])
        r.method = blob[pos + 1]
        r.raw_len, p = _varint_at(blob, pos + 2)
        r.fields += [("raw_len", pos + 2, p, "varint"), ("check", p, p + 8, "8s")]
        p += 8
        lengths = []
        if r.method == LM_METHOD:
            n_tokens, end = _varint_at(blob, p)
            r.fields.append(("n_tokens", p, end, "varint"))
            p = end
            for i in range(-(-(-(-n_tokens // seg)) // lanes)):
                length, end = _varint_at(blob, p)
                r.fields += [(f"stream{i}.payload_len", p, end, "varint"),
                             (f"stream{i}.payload_crc", end, end + 4, "u32")]
                lengths.append(length)
                p = end + 4
        else:
            length = r.raw_len
            if r.method != RAW_METHOD:
                length, end = _varint_at(blob, p)
                r.fields.append(("payload_len", p, end, "varint"))
                p = end
            r.fields.append(("payload_crc", p, p + 4, "u32"))
            lengths.append(length)
            p += 4
        r.crc = p
        p += 4
        for length in lengths:
            p += length
            r.payload_ends.append(p)
        sample.records.append(r)
        pos = p
    sample.end_start = pos
    e = Record("end", pos, 0, [("tag", pos, pos + 1, "u8")])
    total_end = _varint_at(blob, pos + 1)[1]
    n_blocks, blocks_end = _varint_at(blob, total_end)
    e.fields += [("total", pos + 1, total_end, "varint"), ("n_blocks", total_end, blocks_end, "varint")]
    e.crc = blocks_end
    if n_blocks >= 2:        # the content check is stored from two blocks on (docs/FORMAT.md, "End")
        e.fields.append(("check", blocks_end, blocks_end + 8, "8s"))
        e.crc += 8
    sample.records.append(e)
    assert e.crc + 4 == len(blob), sample.name
    return sample


def build_corpus(lm_codec: lmcodec.Codec, small: bool = False) -> list[Sample]:
    """Real archives: LM-coded small texts (one with a prompt) and stored zstd/raw ones."""
    out: list[Sample] = []
    texts = dict(list(TEXTS.items())[:1]) if small else TEXTS
    for name, text in texts.items():
        out.append(Sample(f"lm-{name}", lm_codec.compress(text), text, None, True))
    long_texts = dict(list(LONG_TEXTS.items())[:1]) if small else LONG_TEXTS
    for name, text in long_texts.items():
        out.append(Sample(f"lm-{name}", lm_codec.compress(text), text, None, True))
    if not small:
        out.append(Sample("lm-prose-prompt", lm_codec.compress(TEXTS["prose"], PROMPT),
                          TEXTS["prose"], PROMPT, True))
    rng = random.Random(1234)
    noise = bytes(rng.getrandbits(8) for _ in range(600))
    many = b"".join(b"%05d " % i + TEXTS["prose"][i % 50:i % 50 + 40] + b"\n" for i in range(220))
    stored = [
        ("zstd-prose", dict(method="zstd"), TEXTS["code"] * 3, None),
        ("zstd-blocks", dict(method="zstd", block_size=4096), many, None),
        ("zstd-prompt", dict(method="zstd"), TEXTS["unicode"], PROMPT),
        ("raw-noise", dict(method="raw"), noise, None),
        ("raw-blocks", dict(method="raw", block_size=4096), (noise * 16)[:9000], None),
        ("raw-empty", dict(method="raw"), b"", None),
    ]
    if small:
        stored = [stored[1], stored[4], stored[5]]
    for name, settings, data, prompt in stored:
        out.append(Sample(name, lmcodec.Codec(**settings).compress(data, prompt), data, prompt, False))
    for s in out:
        describe(s)
        assert lm_codec.decompress(s.blob, s.prompt) == s.original, s.name
    return out


# -- mutations ------------------------------------------------------------------------

@dataclass
class Case:
    kind: str
    sample: str
    what: str
    blob: bytes
    expected: bytes
    prompt: bytes | None
    deep: bool = False
    size_class: str = ""                 # the class of the archive whose header the case starts with


def _resign(buf: bytearray, start: int, end: int | None) -> None:
    """Recompute the CRC32 of buf[start:end] stored at buf[end:end + 4] (None: no CRC to fix)."""
    if end is None:
        return
    struct.pack_into("<I", buf, end, zlib.crc32(bytes(buf[start:end])))


def _flip(buf: bytearray, bit: int) -> None:
    buf[bit // 8] ^= 1 << (bit % 8)


def exhaustive_cases(corpus: list[Sample]) -> list[Case]:
    cases = []
    for s in corpus:
        for bit in range(s.header_end * 8):
            buf = bytearray(s.blob)
            _flip(buf, bit)
            cases.append(Case("flip-header-bit", s.name, f"bit {bit}", bytes(buf), s.original, s.prompt))
        cuts = sorted({c for b in s.boundaries() for c in (b - 1, b, b + 1) if 0 <= c < len(s.blob)})
        for cut in cuts:
            cases.append(Case("truncate-boundary", s.name, f"cut {cut}", s.blob[:cut], s.original, s.prompt))
    return cases


VARINT_TOP = (1 << 64) - 1


def _hostile_int(rng: random.Random, bits: int, old: int) -> int:
    top = (1 << bits) - 1
    choices = [0, 1, top, top - 1, old + 1, max(old - 1, 0), old * 2, old // 2,
               rng.randrange(top + 1), 1 << rng.randrange(bits), rng.randrange(1 << rng.randrange(1, bits + 1))]
    value = rng.choice(choices) & top
    return value if value != old else (old + 1) & top


def _maybe_resign_header(rng: random.Random, buf: bytearray, crc_at: int | None) -> str:
    """Half the time, fix the header CRC after a change (" re-signed"), else leave it ("")."""
    if crc_at is not None and rng.random() < 0.5:
        _resign(buf, 0, crc_at)
        return " re-signed"
    return ""


def _new_bytes(rng: random.Random, name: str, old: bytes, kind: str) -> tuple[bytes, str, int | None]:
    """Hostile bytes for one field: (new bytes, what changed, the new integer or None)."""
    if kind == "8s":
        return rng.randbytes(len(old)), name, None
    if kind == "u8":
        new = _hostile_int(rng, 8, old[0])
        return bytes([new]), f"{name} {old[0]} -> {new}", new
    if kind == "u32":
        o = struct.unpack("<I", old)[0]
        new = _hostile_int(rng, 32, o)
        return struct.pack("<I", new), f"{name} {o} -> {new}", new
    assert kind == "varint", kind
    o = decode_varint(old)[0]
    r = rng.random()
    if r < 0.08:   # the same value, non-minimal (padded with zero groups)
        pad = rng.randrange(1, 4)
        enc = bytearray(old)
        enc[-1] |= 0x80
        return bytes(enc) + b"\x80" * (pad - 1) + b"\x00", f"{name} {o} non-minimal (+{pad} bytes)", None
    if r < 0.12:   # longer than 10 bytes
        return b"\xff" * rng.randrange(10, 13) + b"\x01", f"{name} overlong varint", None
    new = _hostile_int(rng, 64, o)
    return encode_varint(new), f"{name} {o} -> {new}", new


def _replace(rng: random.Random, s: Sample, rec: Record, fields) -> tuple[bytearray, str, str, int | None]:
    """Overwrite one field of ``rec`` and re-sign the record's CRC (wherever the change moved it).

    Returns (buffer, field name, what changed, the new integer value or None).
    """
    name, start, end, kind = rng.choice(fields)
    buf = bytearray(s.blob)
    new, what, value = _new_bytes(rng, name, s.blob[start:end], kind)
    buf[start:end] = new
    _resign(buf, rec.start, None if rec.crc is None else rec.crc + len(new) - (end - start))
    return buf, name, what, value


def random_case(rng: random.Random, corpus: list[Sample], kind: str) -> Case:
    s = rng.choice(corpus)
    buf = bytearray(s.blob)
    h = s.header
    if kind == "flip-random":
        bits = rng.sample(range(len(buf) * 8), k=min(len(buf) * 8, rng.choice([1, 1, 2, 3])))
        for bit in bits:
            _flip(buf, bit)
        return Case(kind, s.name, f"bits {bits}", bytes(buf), s.original, s.prompt)
    if kind == "truncate-random":
        cut = rng.randrange(len(s.blob))
        return Case(kind, s.name, f"cut {cut}", s.blob[:cut], s.original, s.prompt)
    if kind == "splice":
        donor = rng.choice(corpus)
        if rng.random() < 0.5:
            i = rng.choice([b for b in s.boundaries() if b > 0])
            j = rng.choice([b for b in donor.boundaries() if b < len(donor.blob)])
        else:
            i, j = rng.randrange(1, len(s.blob) + 1), rng.randrange(len(donor.blob))
        return Case(kind, f"{s.name}+{donor.name}", f"[:{i}] + [{j}:]", s.blob[:i] + donor.blob[j:],
                    donor.original, s.prompt)
    if kind == "version":
        at = s.hfield("version")[1]
        buf[at] = rng.choice([v for v in range(256) if v != buf[at]])
        signed = _maybe_resign_header(rng, buf, h.crc)
        return Case(kind, s.name, f"version {buf[at]}{signed}", bytes(buf), s.original, s.prompt)
    if kind == "fingerprint":
        f = s.hfield("model_fingerprint")
        crc_at = h.crc
        if f is None and s.blob[2] >= 5:
            # v5 writes a registered model's id without a fingerprint (the id pins it): name the
            # model instead, with a fingerprint that is not its own (or give a stored-only archive one).
            section = bytes([len(MODEL_IDS[1])]) + MODEL_IDS[1].encode() + rng.randbytes(8)
            at, end = s.hfield("settings_end")[1], s.hfield("settings_end")[1]
            if s.hfield("model_id"):
                end += 1
            buf[at:end] = section
            buf[3] = buf[3] & ~F5_MODEL_ID | F5_MODEL_NAME
            crc_at = None if crc_at is None else crc_at + len(section) - (end - at)
            what = "model named with another fingerprint"
        elif f is None:
            # A stored-only archive names no model: give it a model section (the flags, the
            # registered model's id, a fingerprint) -- it never loads a model, so re-signed
            # this is harmless.
            at = s.hfield("settings_end")[1]
            section = b"\x01" + rng.randbytes(8)
            buf[5] |= FLAG_MODEL | FLAG_MODEL_ID
            buf[at:at] = section
            crc_at += len(section)
            what = "model fingerprint (model section inserted)"
        else:
            _, start, end, _ = f
            if rng.random() < 0.5:
                _flip(buf, start * 8 + rng.randrange(8 * (end - start)))
            else:
                buf[start:end] = rng.randbytes(end - start)
            what = "model fingerprint"
        signed = _maybe_resign_header(rng, buf, crc_at)
        return Case(kind, s.name, f"{what}{signed}", bytes(buf), s.original, s.prompt)
    if kind == "resign-header":
        fields = [f for f in h.fields if f[0] in ("flags", "level", "mixer", "context", "segment_tokens", "lanes",
                                                  "block_size", "prompt_check", "name", "model_id", "dict_id")]
        name, start, end, fmt = rng.choice(fields)
        if fmt == "name":
            new = rng.choice([b"", b"smollm2-135m", b"smollm2-360m", rng.randbytes(rng.randrange(1, 12))])
            buf[start:end] = bytes([len(new)]) + new
            _resign(buf, 0, None if h.crc is None else h.crc + len(new) + 1 - (end - start))
            what = f"name {new!r}"
        else:
            buf, _, what, _ = _replace(rng, s, h, [(name, start, end, fmt)])
        return Case(kind, s.name, what, bytes(buf), s.original, s.prompt, deep=s.checked_late)
    if kind == "resign-block":
        if not s.blocks:
            return random_case(rng, corpus, "resign-end")
        blk = rng.choice(s.blocks)
        buf, name, what, value = _replace(rng, s, blk, blk.fields)
        # Only a changed block checksum of an LM block, or a token count it can still hold,
        # survives to the model (and fails after it).
        deep = s.lm and not s.payload_check and (name == "check" or (name == "n_tokens" and value is not None
                                                                     and 1 <= value <= blk.raw_len)
                                                 or (blk.crc is None and name.endswith("payload_words")))
        return Case(kind, s.name, what, bytes(buf), s.original, s.prompt, deep=deep)
    if kind == "resign-end":
        e = s.records[-1]
        if e.kind != "end":   # a short-form archive has no end record
            return random_case(rng, corpus, "resign-block")
        buf, name, what, _ = _replace(rng, s, e, e.fields)
        return Case(kind, s.name, what, bytes(buf), s.original, s.prompt, deep=s.lm and name == "check")
    raise ValueError(kind)


RANDOM_KINDS = {"flip-random": 30, "truncate-random": 10, "splice": 15, "version": 5, "fingerprint": 8,
                "resign-header": 10, "resign-block": 15, "resign-end": 7}


def make_cases(corpus: list[Sample], count: int, seed: int, deep: int) -> list[Case]:
    """``count`` corruptions: up to 60% from the exhaustive lists, the rest random."""
    rng = random.Random(seed)
    originals = {s.blob for s in corpus}
    exhaustive = exhaustive_cases(corpus)
    take = min(len(exhaustive), int(count * 0.6))
    cases = rng.sample(exhaustive, take)
    kinds, weights = zip(*RANDOM_KINDS.items())
    n_deep = 0
    while len(cases) < count:
        case = random_case(rng, corpus, rng.choices(kinds, weights)[0])
        if case.blob in originals:
            continue  # not a corruption (e.g. a splice that rebuilt a whole archive)
        if case.deep:
            if n_deep >= deep:
                continue
            n_deep += 1
        cases.append(case)
    rng.shuffle(cases)
    by_name = {s.name: s for s in corpus}
    for case in cases:   # a splice starts with its first part's header
        case.size_class = by_name[case.sample.split("+")[0]].size_class
    return cases


# -- running --------------------------------------------------------------------------

class Hang(BaseException):
    """A case ran past its time limit (raised from SIGALRM; not an Exception, so not caught)."""


def _alarm(signum, frame):
    raise Hang()


def run_cases(codec: lmcodec.Codec, cases: list[Case], timeout: int = 120, log=None) -> dict:
    """Decode every case with ``codec``; count outcomes and the cases that reached the model.

    An LM block's decoding asks ``codec.models.engine`` for the model's engine only after
    the structure checks, the token bound and the fingerprints: each such call is
    one model run, and the whole decode time of a case that made one counts as
    model time.
    """
    model = {"runs": 0, "seconds": 0.0}
    original_engine = codec.models.engine

    def counting_engine(*args, **kwargs):
        model["runs"] += 1
        return original_engine(*args, **kwargs)

    codec.models.engine = counting_engine
    outcomes: Counter = Counter()
    by_kind: dict[str, Counter] = defaultdict(Counter)
    reached: Counter = Counter()
    reached_by_sample: Counter = Counter()
    reached_by_class: Counter = Counter()
    cases_by_class = Counter(case.size_class for case in cases)
    failures: list[dict] = []
    old_handler = signal.signal(signal.SIGALRM, _alarm)
    t0 = time.perf_counter()
    try:
        for n, case in enumerate(cases):
            runs_before = model["runs"]
            t_case = time.perf_counter()
            signal.alarm(timeout)
            detail = ""
            try:
                out = codec.decompress(case.blob, case.prompt)
            except LMCodecError as exc:
                msg = str(exc)
                outcome = f"error:{type(exc).__name__}"
                if "\n" in msg or not msg.strip():
                    outcome, detail = "bad-message", msg
            except Hang:
                outcome = "hang"
            except Exception as exc:  # noqa: BLE001 - exactly what the campaign looks for
                outcome, detail = f"crash:{type(exc).__name__}", repr(exc)[:300]
            else:
                outcome = "exact-original" if out == case.expected else "wrong-output"
            finally:
                signal.alarm(0)
            outcomes[outcome] += 1
            by_kind[case.kind][outcome] += 1
            if model["runs"] > runs_before:
                reached[case.kind] += 1
                reached_by_sample[case.sample] += 1
                reached_by_class[case.size_class] += 1
                model["seconds"] += time.perf_counter() - t_case
            if outcome in ("wrong-output", "hang", "bad-message") or outcome.startswith("crash:"):
                failures.append(dict(kind=case.kind, sample=case.sample, what=case.what, outcome=outcome,
                                     detail=detail, blob_b64=base64.b64encode(case.blob).decode()[:20000]))
            if log and (n + 1) % 1000 == 0:
                log(f"{n + 1}/{len(cases)} cases, {time.perf_counter() - t0:.0f} s, "
                    f"{model['runs']} model runs")
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        del codec.models.engine   # the instance attribute shadowing the method
    bad = sum(v for k, v in outcomes.items()
              if k in ("wrong-output", "hang", "bad-message") or k.startswith("crash:"))
    return dict(total=len(cases), outcomes=dict(sorted(outcomes.items())),
                rejected=sum(v for k, v in outcomes.items() if k.startswith("error:")),
                exact_original=outcomes["exact-original"], wrong_output=outcomes["wrong-output"],
                crash=sum(v for k, v in outcomes.items() if k.startswith("crash:")),
                hang=outcomes["hang"], bad_message=outcomes["bad-message"], failures_total=bad,
                by_kind={k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
                reached_model=sum(reached.values()), reached_model_by_kind=dict(sorted(reached.items())),
                reached_model_by_sample=dict(sorted(reached_by_sample.items())),
                reached_model_by_class={k: f"{reached_by_class[k]} of {n}" for k, n in sorted(cases_by_class.items())},
                reached_model_above_threshold=reached_by_class["LM, short form, payload check"],
                model_runs=model["runs"], model_seconds=round(model["seconds"], 1),
                seconds=round(time.perf_counter() - t0, 1), failures=failures[:50])


def format_report(r: dict) -> str:
    lines = [f"total corrupted archives: {r['total']}  ({r['seconds']} s decoding)"]
    lines.append(f"  rejected with an LMCodecError: {r['rejected']}")
    for k, v in r["outcomes"].items():
        if k.startswith("error:"):
            lines.append(f"    {k[6:]:<28} {v}")
    lines.append(f"  exact original:                {r['exact_original']}")
    lines.append(f"  wrong output (must be 0):      {r['wrong_output']}")
    lines.append(f"  crash (must be 0):             {r['crash']}")
    lines.append(f"  hang (must be 0):              {r['hang']}")
    lines.append(f"  multi-line message (must be 0): {r['bad_message']}")
    lines.append(f"  reached the model: {r['reached_model']} cases ({r['model_seconds']} s in the model)"
                 f" {r['reached_model_by_kind']}")
    lines.append("  reached the model, by the archive the case starts from:")
    for k, v in r["reached_model_by_class"].items():
        lines.append(f"    {k:<36} {v}")
    lines.append("by mutation:")
    for kind, v in r["by_kind"].items():
        lines.append(f"  {kind:<18} " + ", ".join(f"{k}={n}" for k, n in v.items()))
    for f in r["failures"][:10]:
        lines.append(f"FAILURE {f['outcome']}: {f['kind']} {f['sample']} {f['what']} {f['detail']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=10000, help="corrupted archives to try [10000]")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    ap.add_argument("--deep", type=int, default=40,
                    help="at most this many mutations that can only fail after the model ran [40]")
    ap.add_argument("--timeout", type=int, default=120, help="seconds one case may take [120]")
    ap.add_argument("--small", action="store_true", help="a smaller corpus (one LM archive)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    codec = lmcodec.Codec(**LM_SETTINGS)
    corpus = build_corpus(codec, small=args.small)
    built = time.perf_counter() - t0
    print(f"corpus: {len(corpus)} archives ({', '.join(f'{s.name}:{len(s.blob)}B' for s in corpus)}) "
          f"built in {built:.1f} s", file=sys.stderr)
    cases = make_cases(corpus, args.count, args.seed, args.deep)
    report = run_cases(codec, cases, args.timeout, log=lambda m: print(m, file=sys.stderr))
    report.update(seed=args.seed, count=args.count, deep=args.deep, corpus_seconds=round(built, 1),
                  wall_seconds=round(time.perf_counter() - t0, 1),
                  corpus=[dict(name=s.name, archive_bytes=len(s.blob), original_bytes=len(s.original),
                               lm=s.lm, prompt=s.prompt is not None, blocks=len(s.blocks),
                               size_class=s.size_class) for s in corpus],
                  command=" ".join([os.path.basename(sys.argv[0]), *(argv or sys.argv[1:])]))
    print(format_report(report))
    print(f"wall time {report['wall_seconds']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if report["failures_total"] else 0


if __name__ == "__main__":
    sys.exit(main())
