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
VERSION = 3
#: Format versions this lmcodec cannot read, and the release that reads them.
OLD_VERSIONS = {1: "lmcodec 0.1.x (before format v2)", 2: "lmcodec 0.1.x (the float engine)"}
MAX_BLOCK_SIZE = 64 << 20
MIN_BLOCK_SIZE = 4096
MAX_NAME = 255
MIN_CONTEXT = 16
MAX_CONTEXT = 8192          # the exact engine's bounds hold up to 8192 keys (docs/ENGINE.md)
MAX_SEGMENT_TOKENS = 1 << 30
MAX_LANES = 4096
#: Streams of unknown length (pipes) are read in pieces of this size, so memory
#: grows with the bytes that actually arrive, never with a declared length.
READ_CHUNK = 1 << 20

_HEAD = struct.Struct("<4sBB")                  # magic, version, flags
_PARAMS = struct.Struct("<16s16s8sIIHI")        # fingerprints, prompt check, context, segment, lanes, block
_BLOCK = struct.Struct("<BBI8sII")              # tag, method, raw_len, check, n_segments, n_streams
_TOKENS = struct.Struct("<I")                   # tokens of one segment
_STREAM = struct.Struct("<II")                  # payload_len, payload_crc
_END = struct.Struct("<BQ8sI")                  # tag, total_len, check, n_blocks
_CRC = struct.Struct("<I")

FLAG_PROMPT = 1
BLOCK_TAG = 0x42  # 'B'
END_TAG = 0x45    # 'E'


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
    """What a decoder needs before the first block: model, prompt and coding layout.

    Nothing about the encoder's machine is recorded (device, threads, batch
    size): the exact engine computes the same bits everywhere, so the decoder
    chooses what suits its own machine.
    """

    model_name: str
    model_fingerprint: bytes
    tokenizer_fingerprint: bytes
    prompt_check: bytes
    has_prompt: bool
    context: int
    segment_tokens: int
    lanes: int
    block_size: int

    def pack(self) -> bytes:
        name = self.model_name.encode("utf-8")[:MAX_NAME]
        body = _HEAD.pack(MAGIC, VERSION, FLAG_PROMPT if self.has_prompt else 0)
        body += bytes([len(name)]) + name + _PARAMS.pack(
            self.model_fingerprint, self.tokenizer_fingerprint, self.prompt_check,
            self.context, self.segment_tokens, self.lanes, self.block_size)
        return body + _CRC.pack(zlib.crc32(body))


@dataclass(frozen=True)
class StreamEntry:
    payload_len: int
    payload_crc: int


@dataclass
class Block:
    """One block of the original: its method, length, checksum, segments and streams.

    An LM block lists the token count of each segment and one coded stream
    per group of ``lanes`` consecutive segments; a stored block has no
    segments and one stream (the raw or zstd bytes).
    """

    method: Method
    raw_len: int
    check: bytes
    tokens: list[int] = field(default_factory=list)
    streams: list[StreamEntry] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(self.tokens)

    def pack(self) -> bytes:
        table = _BLOCK.pack(BLOCK_TAG, self.method, self.raw_len, self.check, len(self.tokens), len(self.streams))
        table += b"".join(_TOKENS.pack(n) for n in self.tokens)
        table += b"".join(_STREAM.pack(e.payload_len, e.payload_crc) for e in self.streams)
        return table + _CRC.pack(zlib.crc32(table)) + b"".join(self.payloads)

    @classmethod
    def build(cls, method: Method, raw: bytes, payloads: list[bytes], tokens: list[int]) -> "Block":
        entries = [StreamEntry(len(p), zlib.crc32(p)) for p in payloads]
        return cls(method, len(raw), digest(raw), list(tokens), entries, payloads)


@dataclass(frozen=True)
class End:
    total_len: int
    check: bytes
    n_blocks: int

    def pack(self) -> bytes:
        body = _END.pack(END_TAG, self.total_len, self.check, self.n_blocks)
        return body + _CRC.pack(zlib.crc32(body))


def lm_payload_limit(n_tokens: int) -> int:
    """The largest stream an honest encoder can write for ``n_tokens`` tokens.

    Stage 1 gives every bucket at least 256 of 2^24 (at most 16 bits), stage 2
    every symbol at least 1 of 2^24 (at most 24 bits): a token costs under 40
    bits (5 bytes); sealing the range coder adds at most a few words.
    """
    return 5 * n_tokens + 16


def stream_groups(n_segments: int, lanes: int) -> list[range]:
    """The segments each stream of a block carries: ``lanes`` consecutive ones."""
    return [range(i, min(i + lanes, n_segments)) for i in range(0, n_segments, lanes)]


def zstd_payload_limit(raw_len: int) -> int:
    """A generous bound on one zstd frame holding ``raw_len`` bytes (cf. ZSTD_COMPRESSBOUND)."""
    return raw_len + (raw_len >> 7) + 1024


def segment_layout(n_tokens: int, segment_tokens: int) -> list[int]:
    """Token count of each segment of a block: full segments, then the remainder."""
    full, rest = divmod(n_tokens, segment_tokens)
    return [segment_tokens] * full + ([rest] if rest else [])


def _zstd_content_size(payload: bytes) -> int | None:
    """The content size a zstd frame declares in its header (None: absent or unreadable)."""
    import zstandard

    try:
        size = zstandard.get_frame_parameters(payload).content_size
    except zstandard.ZstdError:
        return None
    return None if size == zstandard.CONTENTSIZE_UNKNOWN else size


class Reader:
    """Parses an archive from a binary stream, one structure at a time.

    ``limit`` is the number of bytes known to remain (the file size), or None for
    a pipe; declared lengths larger than what remains are rejected before reading.
    Without a limit, large structures are read in :data:`READ_CHUNK` pieces, so a
    hostile length costs memory only for the bytes that really arrive.

    Every structural field is checked against what an encoder can write: a block
    that passes :meth:`next` has a method, length, segment layout and payload sizes
    that are mutually consistent and consistent with the header, and the end
    record must agree with the blocks before it (their number and total length).

    ``prescan``: when the stream is seekable and its size known (a file, a
    buffer), :meth:`header` first walks the whole archive -- every structure,
    every CRC, the end record, no trailing bytes -- and then seeks back, so a
    damaged archive is refused before the first block is decoded (before the
    model runs).  A pipe is checked block by block as it streams.
    """

    def __init__(self, stream: BinaryIO, limit: int | None = None, *, prescan: bool = True):
        self._s = stream
        self._left = limit
        self._prescan = prescan
        self.offset = 0
        self._blocks = 0
        self._total = 0

    def _read(self, n: int, what: str) -> bytes:
        if n < 0 or (self._left is not None and n > self._left):
            raise TruncatedArchiveError(f"archive truncated in {what} (offset {self.offset})")
        if n <= READ_CHUNK:
            data = self._s.read(n)
        else:
            parts, got = [], 0
            while got < n:
                part = self._s.read(min(READ_CHUNK, n - got))
                if not part:
                    break
                parts.append(part)
                got += len(part)
            data = b"".join(parts)
        if data is None or len(data) != n:
            raise TruncatedArchiveError(f"archive truncated in {what} (offset {self.offset})")
        self.offset += n
        if self._left is not None:
            self._left -= n
        return data

    def _skim(self, n: int, what: str, keep: int) -> tuple[int, bytes]:
        """CRC32 of the next ``n`` bytes, read in pieces; also return the first ``keep`` bytes."""
        crc, head, done = 0, b"", 0
        while done < n:
            part = self._read(min(READ_CHUNK, n - done), what)
            if done < keep:
                head += part[:keep - done]
            crc = zlib.crc32(part, crc)
            done += len(part)
        return crc, head

    def header(self) -> Header:
        head = self._s.read(_HEAD.size) or b""
        self.offset += len(head)
        if self._left is not None:
            self._left -= len(head)
        if not head:
            raise NotAnArchiveError("not an lmcodec archive (empty input)")
        if head[:4] != MAGIC[:len(head[:4])]:
            raise NotAnArchiveError("not an lmcodec archive (bad magic bytes)")
        if len(head) < _HEAD.size:
            raise TruncatedArchiveError("archive truncated in header")
        _, version, flags = _HEAD.unpack(head)
        if version != VERSION:
            if version in OLD_VERSIONS:
                raise UnsupportedFormatError(
                    f"archive format version {version} is not supported by this lmcodec (it reads {VERSION}); "
                    f"decode it with {OLD_VERSIONS[version]}")
            raise UnsupportedFormatError(
                f"archive format version {version} is not supported (this lmcodec reads {VERSION})")
        name_len = self._read(1, "header")
        name = self._read(name_len[0], "header")
        params = self._read(_PARAMS.size, "header")
        (crc,) = _CRC.unpack(self._read(_CRC.size, "header"))
        if zlib.crc32(head + name_len + name + params) != crc:
            raise CorruptArchiveError("archive header is corrupted (CRC mismatch)")
        (mfp, tfp, pcheck, context, seg, lanes, block_size) = _PARAMS.unpack(params)
        # The ranges an encoder can write (see Settings.resolved in codec.py).
        if (flags & ~FLAG_PROMPT or not MIN_CONTEXT <= context <= MAX_CONTEXT
                or not 1 <= seg <= MAX_SEGMENT_TOKENS or not 1 <= lanes <= MAX_LANES
                or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE):
            raise CorruptArchiveError("archive header has invalid parameters")
        try:
            model_name = name.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptArchiveError("archive header has an invalid model name") from exc
        header = Header(model_name, mfp, tfp, pcheck, bool(flags & FLAG_PROMPT), context, seg, lanes, block_size)
        if self._prescan and self._left is not None and _seekable(self._s):
            self._scan(header)
        return header

    def _scan(self, header: Header) -> None:
        """Check every structure up to the end of the archive, then rewind to the first block."""
        state = (self._s.tell(), self._left, self.offset)
        try:
            while not isinstance(self._record(header, keep=False), End):
                pass
            if not self.at_eof():
                raise CorruptArchiveError("trailing data after the end of the archive")
        finally:
            pos, self._left, self.offset = state
            self._blocks = self._total = 0
            self._s.seek(pos)

    def next(self, header: Header) -> Block | End:
        """The next block (structure checked, payloads CRC-checked) or the end record."""
        return self._record(header, keep=True)

    def _record(self, header: Header, keep: bool) -> Block | End:
        tag = self._read(1, "block tag")
        start = self.offset - 1
        if tag[0] == END_TAG:
            body = tag + self._read(_END.size - 1, "end record")
            (crc,) = _CRC.unpack(self._read(_CRC.size, "end record"))
            if zlib.crc32(body) != crc:
                raise CorruptArchiveError("archive end record is corrupted (CRC mismatch)")
            _, total, check, n_blocks = _END.unpack(body)
            if (n_blocks, total) != (self._blocks, self._total):
                raise CorruptArchiveError(
                    f"archive end record (offset {start}) does not match its blocks: it declares "
                    f"{n_blocks} blocks / {total} bytes, the archive has {self._blocks} / {self._total} "
                    "(blocks missing or spliced)")
            return End(total, check, n_blocks)
        if tag[0] != BLOCK_TAG:
            raise CorruptArchiveError(f"unknown record tag 0x{tag[0]:02x} at offset {start}")
        body = tag + self._read(_BLOCK.size - 1, "block header")
        _, method, raw_len, check, n_seg, n_str = _BLOCK.unpack(body)
        # Bound the tables by what the block and the data can hold before reading them:
        # every segment codes at least one byte, and the tables must fit in what remains.
        table_len = n_seg * _TOKENS.size + n_str * _STREAM.size
        if (n_seg > min(raw_len, header.block_size) or not 1 <= n_str <= max(1, n_seg)
                or (self._left is not None and table_len > self._left)):
            raise CorruptArchiveError(f"block at offset {start} declares an impossible number of segments")
        table = self._read(table_len, "segment table")
        (crc,) = _CRC.unpack(self._read(_CRC.size, "block header"))
        if zlib.crc32(body + table) != crc:
            raise CorruptArchiveError(f"block header at offset {start} is corrupted (CRC mismatch)")
        if method not in set(Method) or raw_len > header.block_size:
            raise CorruptArchiveError(f"block at offset {start} has invalid fields")
        method = Method(method)
        tokens = [_TOKENS.unpack_from(table, i * _TOKENS.size)[0] for i in range(n_seg)]
        at = n_seg * _TOKENS.size
        entries = [StreamEntry(*_STREAM.unpack_from(table, at + i * _STREAM.size)) for i in range(n_str)]
        self._check_layout(method, raw_len, tokens, entries, header, start)
        payloads, first = [], b""
        for i, e in enumerate(entries):
            what = f"payload of stream {i}"
            if keep:
                p = self._read(e.payload_len, what)
                crc, first = zlib.crc32(p), first or p
                payloads.append(p)
            else:
                crc, head = self._skim(e.payload_len, what, keep=_ZSTD_HEAD)
                first = first or head
            if crc != e.payload_crc:
                raise CorruptArchiveError(f"stream {i} payload is corrupted (CRC mismatch)")
        if method == Method.ZSTD and _zstd_content_size(first[:_ZSTD_HEAD]) != raw_len:
            # The decompressor allocates what the frame declares: never trust it.
            raise CorruptArchiveError(f"zstd block at offset {start} does not declare its length")
        self._blocks += 1
        self._total += raw_len
        return Block(method, raw_len, check, tokens, entries, payloads)

    @staticmethod
    def _check_layout(method: Method, raw_len: int, tokens: list[int], entries: list[StreamEntry],
                      header: Header, start: int) -> None:
        """Reject a block table that no encoder writes (before reading payloads)."""
        def bad(why: str) -> CorruptArchiveError:
            return CorruptArchiveError(f"block at offset {start}: {why}")

        if method != Method.LM:
            if tokens or len(entries) != 1:
                raise bad("a stored block must have no segments and exactly one stream")
            size = entries[0].payload_len
            if (size != raw_len) if method == Method.RAW else (size > zstd_payload_limit(raw_len)):
                raise bad("stored payload length does not match the block length")
            return
        total = sum(tokens)
        if total > raw_len:
            raise bad("more tokens than bytes")
        if not tokens or tokens != segment_layout(total, header.segment_tokens):
            raise bad("segment token counts do not match the header's segment size")
        groups = stream_groups(len(tokens), header.lanes)
        if len(entries) != len(groups):
            raise bad("stream count does not match the header's lanes")
        for i, (e, g) in enumerate(zip(entries, groups)):
            n = sum(tokens[j] for j in g)
            if e.payload_len % 4 or not 4 <= e.payload_len <= lm_payload_limit(n):
                raise bad(f"stream {i} has an impossible payload length {e.payload_len}")

    def at_eof(self) -> bool:
        return not self._s.read(1)


#: A zstd frame header is at most 18 bytes (magic, descriptor, window, dict id, size).
_ZSTD_HEAD = 18


def _seekable(stream: BinaryIO) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False
