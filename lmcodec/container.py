"""The archive format: a header, blocks, and an end record.  See docs/FORMAT.md.

Every structure carries its own CRC32 and every length is checked against the
bytes actually present *before* anything is allocated from it, so a damaged or
hostile archive fails with a named :class:`ArchiveError`, early and cheaply.
The original bytes are covered twice: a BLAKE2b-64 digest per block (catches a
wrong decode of that block as soon as it is done) and one over the whole
content in the end record (catches reordered, dropped or spliced blocks).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import BinaryIO

from .errors import (
    CorruptArchiveError,
    NotAnArchiveError,
    TruncatedArchiveError,
    UnsupportedFormatError,
)

MAGIC = b"\x89LMC"
VERSION = 1
MAX_BLOCK_SIZE = 64 << 20
MAX_NAME = 255

_HEAD = struct.Struct("<4sBB")                  # magic, version, flags
_PARAMS = struct.Struct("<16s16s8sBBHHIIBI")    # fps, prompt check, device..block size
_BLOCK = struct.Struct("<BBI8sI")               # tag, method, raw_len, check, n_segments
_SEGMENT = struct.Struct("<III")                # n_tokens, payload_len, payload_crc
_END = struct.Struct("<BQ8sI")                  # tag, total_len, check, n_blocks
_CRC = struct.Struct("<I")

FLAG_PROMPT = 1
BLOCK_TAG = 0x42  # 'B'
END_TAG = 0x45    # 'E'

DEVICES = {"cpu": 0, "cuda": 1}
DTYPES = {"float32": 0, "bfloat16": 1, "float16": 2}


class Method(IntEnum):
    """How a block's bytes are stored."""

    RAW = 0
    ZSTD = 1
    LM = 2


def content_hasher() -> "hashlib.blake2b":
    """The content checksum: BLAKE2b with an 8-byte digest (feed it incrementally)."""
    return hashlib.blake2b(digest_size=8)


def digest(data: bytes | memoryview) -> bytes:
    """:func:`content_hasher` of one buffer."""
    h = content_hasher()
    h.update(data)
    return h.digest()


def prompt_check(prompt: bytes | None) -> bytes:
    """8 bytes telling a wrong prompt from the right one; not a secret (see README)."""
    if prompt is None:
        return bytes(8)
    return hashlib.blake2b(prompt, digest_size=8, person=b"lmcodec-prompt").digest()


@dataclass(frozen=True)
class Header:
    """What a decoder needs before the first block: model, prompt and coding layout."""

    model_name: str
    model_fingerprint: bytes
    tokenizer_fingerprint: bytes
    prompt_check: bytes
    has_prompt: bool
    device: str
    dtype: str
    threads: int
    batch_size: int
    context: int
    segment_tokens: int
    escape_bits: int
    block_size: int

    def pack(self) -> bytes:
        name = self.model_name.encode("utf-8")[:MAX_NAME]
        body = _HEAD.pack(MAGIC, VERSION, FLAG_PROMPT if self.has_prompt else 0)
        body += bytes([len(name)]) + name + _PARAMS.pack(
            self.model_fingerprint, self.tokenizer_fingerprint, self.prompt_check,
            DEVICES[self.device], DTYPES[self.dtype], self.threads, self.batch_size,
            self.context, self.segment_tokens, self.escape_bits, self.block_size)
        return body + _CRC.pack(zlib.crc32(body))


@dataclass(frozen=True)
class SegmentEntry:
    n_tokens: int
    payload_len: int
    payload_crc: int


@dataclass
class Block:
    """One block of the original: its method, length, checksum and payloads."""

    method: Method
    raw_len: int
    check: bytes
    segments: list[SegmentEntry] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.segments)

    def pack(self) -> bytes:
        table = _BLOCK.pack(BLOCK_TAG, self.method, self.raw_len, self.check, len(self.segments))
        table += b"".join(_SEGMENT.pack(s.n_tokens, s.payload_len, s.payload_crc) for s in self.segments)
        return table + _CRC.pack(zlib.crc32(table)) + b"".join(self.payloads)

    @classmethod
    def build(cls, method: Method, raw: bytes, payloads: list[bytes], tokens: list[int]) -> "Block":
        entries = [SegmentEntry(n, len(p), zlib.crc32(p)) for n, p in zip(tokens, payloads)]
        return cls(method, len(raw), digest(raw), entries, payloads)


@dataclass(frozen=True)
class End:
    total_len: int
    check: bytes
    n_blocks: int

    def pack(self) -> bytes:
        body = _END.pack(END_TAG, self.total_len, self.check, self.n_blocks)
        return body + _CRC.pack(zlib.crc32(body))


class Reader:
    """Parses an archive from a binary stream, one structure at a time.

    ``limit`` is the number of bytes known to remain (the file size), or None for
    a pipe; declared lengths larger than what remains are rejected before reading.
    """

    def __init__(self, stream: BinaryIO, limit: int | None = None):
        self._s = stream
        self._left = limit
        self.offset = 0

    def _read(self, n: int, what: str) -> bytes:
        if self._left is not None and n > self._left:
            raise TruncatedArchiveError(f"archive truncated in {what} (offset {self.offset})")
        data = self._s.read(n)
        if len(data) != n:
            raise TruncatedArchiveError(f"archive truncated in {what} (offset {self.offset})")
        self.offset += n
        if self._left is not None:
            self._left -= n
        return data

    def header(self) -> Header:
        head = self._s.read(_HEAD.size)
        self.offset += len(head)
        if self._left is not None:
            self._left -= len(head)
        if len(head) < 4 or head[:4] != MAGIC:
            raise NotAnArchiveError("not an lmcodec archive (bad magic bytes)")
        if len(head) < _HEAD.size:
            raise TruncatedArchiveError("archive truncated in header")
        _, version, flags = _HEAD.unpack(head)
        if version != VERSION:
            raise UnsupportedFormatError(
                f"archive format version {version} is not supported (this lmcodec reads {VERSION})")
        name_len = self._read(1, "header")
        name = self._read(name_len[0], "header")
        params = self._read(_PARAMS.size, "header")
        (crc,) = _CRC.unpack(self._read(_CRC.size, "header"))
        if zlib.crc32(head + name_len + name + params) != crc:
            raise CorruptArchiveError("archive header is corrupted (CRC mismatch)")
        (mfp, tfp, pcheck, dev, dt, threads, batch, context, seg, esc, block_size) = _PARAMS.unpack(params)
        devices = {v: k for k, v in DEVICES.items()}
        dtypes = {v: k for k, v in DTYPES.items()}
        if (flags & ~FLAG_PROMPT or dev not in devices or dt not in dtypes or not 1 <= threads <= 256
                or not 1 <= batch or not 4 <= context or not 1 <= seg or not 1 <= esc <= 30
                or not 1 <= block_size <= MAX_BLOCK_SIZE):
            raise CorruptArchiveError("archive header has invalid parameters")
        try:
            model_name = name.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptArchiveError("archive header has an invalid model name") from exc
        return Header(model_name, mfp, tfp, pcheck, bool(flags & FLAG_PROMPT), devices[dev],
                      dtypes[dt], threads, batch, context, seg, esc, block_size)

    def next(self, header: Header) -> Block | End:
        """The next block (payloads CRC-checked) or the end record."""
        tag = self._read(1, "block tag")
        if tag[0] == END_TAG:
            body = tag + self._read(_END.size - 1, "end record")
            (crc,) = _CRC.unpack(self._read(_CRC.size, "end record"))
            if zlib.crc32(body) != crc:
                raise CorruptArchiveError("archive end record is corrupted (CRC mismatch)")
            _, total, check, n_blocks = _END.unpack(body)
            return End(total, check, n_blocks)
        if tag[0] != BLOCK_TAG:
            raise CorruptArchiveError(f"unknown record tag 0x{tag[0]:02x} at offset {self.offset - 1}")
        body = tag + self._read(_BLOCK.size - 1, "block header")
        _, method, raw_len, check, n_seg = _BLOCK.unpack(body)
        # Bound the table by what the data can hold before reading it.
        if n_seg > max(raw_len, 1) or n_seg * _SEGMENT.size > (self._left if self._left is not None else 1 << 40):
            raise CorruptArchiveError("block declares an impossible number of segments")
        table = self._read(n_seg * _SEGMENT.size, "segment table")
        (crc,) = _CRC.unpack(self._read(_CRC.size, "block header"))
        if zlib.crc32(body + table) != crc:
            raise CorruptArchiveError("block header is corrupted (CRC mismatch)")
        if method not in Method.__members__.values() or raw_len > header.block_size:
            raise CorruptArchiveError("block header has invalid fields")
        entries = [SegmentEntry(*_SEGMENT.unpack_from(table, i * _SEGMENT.size)) for i in range(n_seg)]
        if Method(method) != Method.LM and (n_seg != 1 or entries[0].n_tokens):
            raise CorruptArchiveError("stored block must have exactly one segment")
        if sum(e.n_tokens for e in entries) > raw_len:
            raise CorruptArchiveError("block declares more tokens than bytes")
        payloads = []
        for i, e in enumerate(entries):
            p = self._read(e.payload_len, f"payload of segment {i}")
            if zlib.crc32(p) != e.payload_crc:
                raise CorruptArchiveError(f"segment {i} payload is corrupted (CRC mismatch)")
            payloads.append(p)
        return Block(Method(method), raw_len, check, entries, payloads)

    def at_eof(self) -> bool:
        return not self._s.read(1)
