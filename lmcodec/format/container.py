"""The archive format: a header, then one block in the short form, or blocks and an end record.

See docs/FORMAT.md.  Format v5 has two layouts.  The *short form* holds at most
one block (every file up to the block size, 4 MiB by default): header fields,
the block's lengths, one 32-bit check and the payloads -- 15 bytes of framing
for a 1.4 KB text with the default model.  Its check is BLAKE2b-32 of the
header's bytes and the original (:func:`short_hasher`), so it covers the
model id, the dictionary id, the prompt check and the level as well as the
content; it is verified after decoding.  The *general form* (two blocks or
more) is v4's: a header CRC, blocks that carry their own CRC32s and BLAKE2b-64
digests, and an end record with the digest of the whole content.

Every length is checked against the bytes actually present *before* anything
is allocated from it, so a damaged or hostile archive fails with a named
:class:`ArchiveError`, early and cheaply.

The header (its fields, the levels, the model ids, varints) is
:mod:`lmcodec.format.header`; its names are re-exported here.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import BinaryIO

from ..errors import CorruptArchiveError, NotAnArchiveError, TruncatedArchiveError, UnsupportedFormatError

# The header's names, re-exported: importers of lmcodec.format.container get the whole format.
from .header import (  # noqa: F401
    _CRC,
    CHECK_BYTES,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_LANES,
    DICT_ID_BYTES,
    F5_GENERAL,
    F5_METHOD_SHIFT,
    LEVELS,
    MAGIC,
    MAGIC5,
    MAX_BLOCK_SIZE,
    MAX_CONTEXT,
    MAX_LANES,
    MAX_SEGMENT_TOKENS,
    MIN_BLOCK_SIZE,
    MIN_CONTEXT,
    MODEL_CHECK_BYTES,
    MODEL_FINGERPRINTS,
    MODEL_IDS,
    OLD_VERSIONS,
    PROMPT_CHECK_BYTES,
    READ_VERSIONS,
    VARINT_MAX,
    VARINT_MAX_BYTES,
    VERSION,
    WHOLE_BLOCK,
    Header,
    HeaderFields,
    Level,
    decode_varint,
    encode_varint,
    prompt_check,
)

#: Streams of unknown length (pipes) are read in pieces of this size, so memory
#: grows with the bytes that actually arrive, never with a declared length.
READ_CHUNK = 1 << 20
#: The short form's one check (>= 32 bits, the issue's floor): a wrong decode or
#: damaged archive passes it with chance 2^-32.
SHORT_CHECK_BYTES = 4
#: Format v6: a short-form LM block of at least this many tokens carries a payload check, so
#: damage to its payloads or lengths is refused before the model runs.  Below it the whole
#: decode is about two seconds of one-row model steps on 2 CPU cores (docs/FORMAT.md, "Payload
#: check"): records that small keep v5's framing and are checked after decoding.
PAYLOAD_CHECK_TOKENS = 64
PAYLOAD_CHECK_BYTES = 4
#: The smallest stream-table entry: a one-byte payload-length varint and the payload's CRC32.
MIN_STREAM_ENTRY = 1 + _CRC.size
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


def short_hasher(header_bytes: bytes) -> "hashlib.blake2b":
    """The v5 short form's check, before the content: BLAKE2b-32 of the header's bytes, then the original.

    Hashing the header's bytes first keys the check by everything a decoder depends
    on besides the payload: the model (its id, which determines its fingerprint, or
    its stored fingerprint), the dictionary id, the prompt check, the level and
    settings; so a damaged header is caught with the content, and the header needs
    no CRC of its own.  The block's lengths are not hashed: a wrong raw length fails
    the decoded length, a wrong token count decodes a different length, and wrong
    payload lengths move the end of the archive or the streams' bytes.
    """
    h = hashlib.blake2b(digest_size=SHORT_CHECK_BYTES, person=b"lmcodec-v5")
    h.update(header_bytes)
    return h


def has_payload_check(version: int, method: int, n_tokens: int) -> bool:
    """Whether a short-form archive carries a payload check: from format v6, an LM block of
    :data:`PAYLOAD_CHECK_TOKENS` tokens or more (decoding it would take more than a moment)."""
    return version >= 6 and method == Method.LM and n_tokens >= PAYLOAD_CHECK_TOKENS


def payload_hasher() -> "hashlib.blake2b":
    """The v6 short form's payload check: BLAKE2b-32 personalised ``lmcodec-v6-pay`` over every
    byte of the archive before it (the header, the block's lengths, the content check), then
    the payloads -- everything but itself, so any damage is refused before the model runs."""
    return hashlib.blake2b(digest_size=PAYLOAD_CHECK_BYTES, person=b"lmcodec-v6-pay")


@dataclass(frozen=True)
class StreamEntry:
    payload_len: int
    payload_crc: int


@dataclass
class Block:
    """One block of the original: its method, length, checksum, segments and streams.

    An LM block has one coded stream per group of ``lanes`` consecutive
    segments; ``tokens`` lists the token count of each segment.  The archive
    stores only their total: the segments are always
    ``segment_layout(total, segment_tokens)``.  A stored block has no segments
    and one stream (the raw or zstd bytes).
    """

    method: Method
    raw_len: int
    check: bytes
    tokens: list[int] = field(default_factory=list)
    streams: list[StreamEntry] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    #: The v5 short form's header bytes: ``check`` is then :func:`short_hasher` of them and the
    #: original, not ``B2(original)`` (b"": a general-form, v4 or v3 block).
    check_key: bytes = field(default=b"", compare=False, repr=False)
    #: Whether the v6 short form's payload check covered this block's payloads and lengths
    #: (damage refused before decoding, so a wrong decode afterwards is the engine's).
    payload_checked: bool = field(default=False, compare=False, repr=False)

    @property
    def n_tokens(self) -> int:
        return sum(self.tokens)

    def verify(self, raw: bytes) -> bool:
        """Whether ``raw`` is this block's original: its length and its check."""
        if len(raw) != self.raw_len:
            return False
        if self.check_key:
            h = short_hasher(self.check_key)
            h.update(raw)
            return h.digest() == self.check
        return digest(raw) == self.check

    def pack(self) -> bytes:
        """The block table and its CRC, then the payloads.

        A stored block the format cannot express (segments, other than one
        stream, a raw payload of another length than the block) is a ValueError.
        """
        table = bytearray([BLOCK_TAG, self.method]) + encode_varint(self.raw_len) + self.check
        if self.method == Method.LM:
            table += encode_varint(sum(self.tokens))
            for e in self.streams:
                table += encode_varint(e.payload_len) + _CRC.pack(e.payload_crc)
        else:
            if self.tokens or len(self.streams) != 1:
                raise ValueError("a stored block has no segments and exactly one stream")
            e = self.streams[0]
            if self.method == Method.RAW:
                if e.payload_len != self.raw_len:
                    raise ValueError("a raw block's payload is its raw bytes")
            else:
                table += encode_varint(e.payload_len)
            table += _CRC.pack(e.payload_crc)
        return bytes(table) + _CRC.pack(zlib.crc32(table)) + b"".join(self.payloads)

    @classmethod
    def build(cls, method: Method, raw: bytes, payloads: list[bytes], tokens: list[int]) -> "Block":
        entries = [StreamEntry(len(p), zlib.crc32(p)) for p in payloads]
        return cls(method, len(raw), digest(raw), list(tokens), entries, payloads)


def pack_short(header: Header, block: Block | None, raw: bytes) -> bytes:
    """The whole v5 short-form archive of ``raw``: at most one block (None: an empty input).

    Header fields (the block's method in the flags), the raw length, an LM block's
    token count and stream lengths in 32-bit words, or a zstd block's payload length,
    the check over the header's bytes and ``raw`` (:func:`short_hasher`), for a block of
    :data:`PAYLOAD_CHECK_TOKENS` tokens or more the payload check (:func:`payload_hasher`),
    the payloads.
    """
    if block is None:
        if raw:
            raise ValueError("a non-empty input needs its block")
        block = Block(Method.RAW, 0, b"", [], [StreamEntry(0, 0)], [b""])
    if block.raw_len != len(raw):
        raise ValueError("the block is not of these bytes")
    head = header.fields(block.method)
    body = bytearray(encode_varint(block.raw_len))
    if block.method == Method.LM:
        if not block.tokens:
            raise ValueError("an LM block has tokens")
        body += encode_varint(sum(block.tokens))
        for p in block.payloads:
            if len(p) % 4 or not p:
                raise ValueError("an LM payload is whole 32-bit words")
            body += encode_varint(len(p) // 4)
    else:
        if block.tokens or len(block.payloads) != 1:
            raise ValueError("a stored block has no segments and exactly one stream")
        if block.method == Method.RAW and block.payloads[0] != raw:
            raise ValueError("a raw block's payload is its raw bytes")
        if block.method == Method.ZSTD:
            if not raw:
                raise ValueError("an empty input is an empty raw block")
            body += encode_varint(len(block.payloads[0]))
    check = short_hasher(head)
    check.update(raw)
    framing = head + bytes(body) + check.digest()
    if has_payload_check(VERSION, block.method, sum(block.tokens)):
        payload_check = payload_hasher()
        for part in (framing, *block.payloads):
            payload_check.update(part)
        framing += payload_check.digest()
    return framing + b"".join(block.payloads)


@dataclass(frozen=True)
class End:
    """The end record.  ``check`` is ``B2`` of the whole original.

    It is stored only when the archive has two blocks or more: with one block it
    is that block's check, with none ``B2(b"")``, so storing it would repeat
    8 bytes every small archive pays for (the reader fills it in).
    """

    total_len: int
    check: bytes
    n_blocks: int

    def pack(self) -> bytes:
        body = bytes([END_TAG]) + encode_varint(self.total_len) + encode_varint(self.n_blocks)
        if self.n_blocks >= 2:
            body += self.check
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


def stream_count(n_tokens: int, segment_tokens: int, lanes: int) -> int:
    """How many streams an LM block of ``n_tokens`` tokens has: ``len(stream_groups(...))``."""
    return -(-(-(-n_tokens // segment_tokens)) // lanes)


def stream_tokens(i: int, n_tokens: int, segment_tokens: int, lanes: int) -> int:
    """Tokens carried by stream ``i`` of such a block (its segments' total), without listing them."""
    per_stream = segment_tokens * lanes
    return max(0, min(n_tokens, (i + 1) * per_stream) - i * per_stream)


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


class Reader(HeaderFields):
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
        self._last_check = b""
        #: v5 short form: the header's bytes (what its check is keyed by) and the block's method.
        self._short_key = b""
        self._short_method = 0
        self._short_version = 0
        self._short_done = False

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

    def _payloads(self, entries: list[StreamEntry], keep: bool,
                  hasher: "hashlib.blake2b | None" = None) -> tuple[list[bytes], list[int], bytes]:
        """Read (``keep``) or skim the streams' payloads: (payloads, their CRC-32s, the first one's head).

        ``hasher``: also fed every payload byte (the v6 short form's payload check).
        """
        payloads, crcs, first = [], [], b""
        for i, e in enumerate(entries):
            what = f"payload of stream {i}"
            if keep:
                p = self._read(e.payload_len, what)
                crc, first = zlib.crc32(p), first or p
                payloads.append(p)
                if hasher is not None:
                    hasher.update(p)
            else:
                crc, head = self._skim(e.payload_len, what, keep=_ZSTD_HEAD, hasher=hasher)
                first = first or head
            crcs.append(crc)
        return payloads, crcs, first

    def _skim(self, n: int, what: str, keep: int, hasher: "hashlib.blake2b | None" = None) -> tuple[int, bytes]:
        """CRC32 of the next ``n`` bytes, read in pieces; also return the first ``keep`` bytes."""
        crc, head, done = 0, b"", 0
        while done < n:
            part = self._read(min(READ_CHUNK, n - done), what)
            if done < keep:
                head += part[:keep - done]
            crc = zlib.crc32(part, crc)
            if hasher is not None:
                hasher.update(part)
            done += len(part)
        return crc, head

    def _varint(self, body: bytearray, where: str, what: str) -> int:
        """Read one varint byte by byte (appending its bytes to ``body``), at most 10 bytes."""
        start = len(body)
        while True:
            b = self._read(1, where)
            body += b
            if not b[0] & 0x80 or len(body) - start == VARINT_MAX_BYTES:
                break
        return decode_varint(body, start, what=what)[0]

    def header(self) -> Header:
        head = self._s.read(len(MAGIC5) + 1) or b""
        self.offset += len(head)
        if self._left is not None:
            self._left -= len(head)
        if not head:
            raise NotAnArchiveError("not an lmcodec archive (empty input)")
        if head[:2] != MAGIC5[:len(head[:2])]:
            raise NotAnArchiveError("not an lmcodec archive (bad magic bytes)")
        if len(head) < len(MAGIC5) + 1:
            raise TruncatedArchiveError("archive truncated in header")
        body = bytearray(head)
        if head[2] == MAGIC[2]:  # versions 1..4: the 4-byte magic, then the version
            body += self._read(1, "header")
            if body[3] != MAGIC[3]:
                raise NotAnArchiveError("not an lmcodec archive (bad magic bytes)")
            body += self._read(1, "header")
        version = body[-1]
        reads = ", ".join(map(str, READ_VERSIONS))
        if version not in READ_VERSIONS:
            if version in OLD_VERSIONS:
                raise UnsupportedFormatError(
                    f"archive format version {version} is not supported by this lmcodec (it reads {reads}); "
                    f"decode it with {OLD_VERSIONS[version]}")
            raise UnsupportedFormatError(
                f"archive format version {version} is not supported (this lmcodec reads {reads})")
        body += self._read(1, "header")
        flags = body[-1]
        if version >= 5:
            fields = self._fields_v5(body, flags)
        else:
            fields = self._fields_v3(body, flags) if version == 3 else self._fields_v4(body, flags)
        if version < 5 or flags & F5_GENERAL:
            (crc,) = _CRC.unpack(self._read(_CRC.size, "header"))
            if zlib.crc32(body) != crc:
                raise CorruptArchiveError("archive header is corrupted (CRC mismatch)")
        header = self._checked(version, flags, **fields)
        if version >= 5 and not flags & F5_GENERAL:
            self._short_key = bytes(body)
            self._short_method = flags >> F5_METHOD_SHIFT
            self._short_version = version
        if self._prescan and self._left is not None and _seekable(self._s):
            self._scan(header)
        return header

    @property
    def short_form(self) -> bool:
        """Whether the archive (after :meth:`header`) is in v5's short form (at most one block)."""
        return bool(self._short_key)

    def content_hasher(self) -> "hashlib.blake2b":
        """The hasher whose digest over the whole original the end record's check must equal.

        After :meth:`header`: the short form's :func:`short_hasher` (keyed by the header's
        bytes), or :func:`content_hasher` (BLAKE2b-64) for the general form and v3/v4.
        """
        return short_hasher(self._short_key) if self._short_key else content_hasher()

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
            self._last_check = b""
            self._short_done = False
            self._s.seek(pos)

    def next(self, header: Header) -> Block | End:
        """The next block (structure checked, payloads CRC-checked) or the end record."""
        return self._record(header, keep=True)

    def _record(self, header: Header, keep: bool) -> Block | End:
        if self._short_key:
            return self._short_record(header, keep)
        tag = self._read(1, "block tag")
        start = self.offset - 1
        body = bytearray(tag)
        if tag[0] == END_TAG:
            total = self._varint(body, "end record", "archive end record total length")
            n_blocks = self._varint(body, "end record", "archive end record block count")
            if n_blocks >= 2:
                check = self._read(CHECK_BYTES, "end record")
                body += check
            (crc,) = _CRC.unpack(self._read(_CRC.size, "end record"))
            if zlib.crc32(body) != crc:
                raise CorruptArchiveError("archive end record is corrupted (CRC mismatch)")
            if (n_blocks, total) != (self._blocks, self._total):
                raise CorruptArchiveError(
                    f"archive end record (offset {start}) does not match its blocks: it declares "
                    f"{n_blocks} blocks / {total} bytes, the archive has {self._blocks} / {self._total} "
                    "(blocks missing or spliced)")
            if n_blocks < 2:     # not stored: the one block's check, or that of no bytes
                check = self._last_check if n_blocks else digest(b"")
            return End(total, check, n_blocks)
        if tag[0] != BLOCK_TAG:
            raise CorruptArchiveError(f"unknown record tag 0x{tag[0]:02x} at offset {start}")
        # The table's shape follows from the method, the lengths and the header, so each is
        # checked before the next is read: nothing is allocated from an unchecked count.
        method = self._read(1, "block header")
        body += method
        if method[0] not in _METHODS:
            raise CorruptArchiveError(f"block at offset {start} has invalid fields (method {method[0]})")
        method = Method(method[0])
        raw_len = self._varint(body, "block header", f"block at offset {start}: raw length")
        if raw_len > header.block_size:
            raise CorruptArchiveError(f"block at offset {start} has invalid fields "
                                      f"(raw length {raw_len} over the block size {header.block_size})")
        check = self._read(CHECK_BYTES, "block header")
        body += check
        n_tokens = 0
        if method == Method.LM:
            n_tokens = self._varint(body, "block header", f"block at offset {start}: token count")
            if not 1 <= n_tokens <= raw_len:  # every token codes at least one byte
                raise CorruptArchiveError(f"block at offset {start} declares an impossible number of tokens "
                                          f"({n_tokens} for {raw_len} bytes; more tokens than bytes or none)")
            n_streams = stream_count(n_tokens, header.segment_tokens, header.lanes)
            # Bound the table by what the block and the data can hold before reading it.
            if (n_streams > min(raw_len, header.block_size)
                    or (self._left is not None and n_streams * MIN_STREAM_ENTRY + _CRC.size > self._left)):
                raise CorruptArchiveError(f"block at offset {start} declares an impossible number of "
                                          f"streams ({n_streams})")
            entries = []
            for i in range(n_streams):
                length = self._varint(body, "stream table", f"block at offset {start}: stream {i} length")
                crc = self._read(_CRC.size, "stream table")
                body += crc
                entries.append(StreamEntry(length, _CRC.unpack(crc)[0]))
        else:
            length = raw_len
            if method == Method.ZSTD:
                length = self._varint(body, "block header", f"block at offset {start}: payload length")
            crc = self._read(_CRC.size, "block header")
            body += crc
            entries = [StreamEntry(length, _CRC.unpack(crc)[0])]
        (crc,) = _CRC.unpack(self._read(_CRC.size, "block header"))
        if zlib.crc32(body) != crc:
            raise CorruptArchiveError(f"block header at offset {start} is corrupted (CRC mismatch)")
        self._check_layout(method, raw_len, n_tokens, entries, header, start)
        payloads, crcs, first = self._payloads(entries, keep)
        for i, (e, crc) in enumerate(zip(entries, crcs)):
            if crc != e.payload_crc:
                raise CorruptArchiveError(f"stream {i} payload is corrupted (CRC mismatch)")
        if method == Method.ZSTD and _zstd_content_size(first[:_ZSTD_HEAD]) != raw_len:
            # The decompressor allocates what the frame declares: never trust it.
            raise CorruptArchiveError(f"zstd block at offset {start} does not declare its length")
        self._blocks += 1
        self._total += raw_len
        self._last_check = check
        # The segments are derived, not stored; the pre-scan (keep=False) never lists them.
        tokens = segment_layout(n_tokens, header.segment_tokens) if keep and method == Method.LM else []
        return Block(method, raw_len, check, tokens, entries, payloads)

    def _short_record(self, header: Header, keep: bool) -> Block | End:
        """The short form's one block (lengths, check, payloads), then its implied end record.

        An empty input (raw length 0, raw method) has no block: its end record comes at once.
        """
        if self._short_done:
            return End(self._total, self._last_check, self._blocks)
        self._short_done = True
        start, body = self.offset, bytearray()
        method = Method(self._short_method)
        raw_len = self._varint(body, "block header", "block raw length")
        if raw_len > header.block_size:
            raise CorruptArchiveError(f"block has invalid fields (raw length {raw_len} over the block size "
                                      f"{header.block_size})")
        if not raw_len and method != Method.RAW:
            raise CorruptArchiveError("an empty block that is not stored raw")
        n_tokens = 0
        if method == Method.LM:
            n_tokens = self._varint(body, "block header", "block token count")
            if not 1 <= n_tokens <= raw_len:  # every token codes at least one byte
                raise CorruptArchiveError(f"block declares an impossible number of tokens "
                                          f"({n_tokens} for {raw_len} bytes; more tokens than bytes or none)")
            n_streams = stream_count(n_tokens, header.segment_tokens, header.lanes)
            # Every stream takes at least a one-byte length and one 4-byte word: bound the
            # table by the block and the bytes that remain before reading it.
            if (n_streams > raw_len
                    or (self._left is not None and n_streams * 5 + SHORT_CHECK_BYTES > self._left)):
                raise CorruptArchiveError(f"block declares an impossible number of streams ({n_streams})")
            entries = []
            for i in range(n_streams):
                limit = lm_payload_limit(stream_tokens(i, n_tokens, header.segment_tokens, header.lanes)) // 4
                words = self._varint(body, "stream table", f"stream {i} length")
                if not 1 <= words <= limit:
                    raise CorruptArchiveError(f"stream {i} has an impossible payload length ({words} words)")
                entries.append(StreamEntry(4 * words, 0))
        elif method == Method.ZSTD:
            length = self._varint(body, "block header", "block payload length")
            if not 1 <= length <= zstd_payload_limit(raw_len):
                raise CorruptArchiveError("stored payload length does not match the block length")
            entries = [StreamEntry(length, 0)]
        else:
            entries = [StreamEntry(raw_len, 0)]
        check = self._read(SHORT_CHECK_BYTES, "block check")
        payload_check = None
        if has_payload_check(self._short_version, method, n_tokens):
            stored = self._read(PAYLOAD_CHECK_BYTES, "payload check")
            payload_check = payload_hasher()
            for part in (self._short_key, body, check):
                payload_check.update(part)
        payloads, crcs, first = self._payloads(entries, keep, payload_check)
        if payload_check is not None and payload_check.digest() != stored:
            raise CorruptArchiveError("archive is damaged: its payload check does not match (the header, the "
                                      "block's lengths or its payloads changed); refused before decoding")
        if not self.at_eof():   # the short form is the whole archive
            raise CorruptArchiveError("trailing data after the end of the archive")
        entries = [StreamEntry(e.payload_len, crc) for e, crc in zip(entries, crcs)]   # computed, not stored
        if method == Method.ZSTD and _zstd_content_size(first[:_ZSTD_HEAD]) != raw_len:
            raise CorruptArchiveError(f"zstd block at offset {start} does not declare its length")
        self._last_check = check
        if not raw_len:
            return End(0, check, 0)
        self._blocks, self._total = 1, raw_len
        tokens = segment_layout(n_tokens, header.segment_tokens) if keep and method == Method.LM else []
        return Block(method, raw_len, check, tokens, entries, payloads, self._short_key, payload_check is not None)

    @staticmethod
    def _check_layout(method: Method, raw_len: int, n_tokens: int, entries: list[StreamEntry],
                      header: Header, start: int) -> None:
        """Reject a block table that no encoder writes (before reading payloads)."""
        def bad(why: str) -> CorruptArchiveError:
            return CorruptArchiveError(f"block at offset {start}: {why}")

        if method != Method.LM:
            if method == Method.ZSTD and entries[0].payload_len > zstd_payload_limit(raw_len):
                raise bad("stored payload length does not match the block length")
            return
        for i, e in enumerate(entries):
            n = stream_tokens(i, n_tokens, header.segment_tokens, header.lanes)
            if e.payload_len % 4 or not 4 <= e.payload_len <= lm_payload_limit(n):
                raise bad(f"stream {i} has an impossible payload length {e.payload_len}")

    def at_eof(self) -> bool:
        return not self._s.read(1)


_METHODS = frozenset(int(m) for m in Method)

#: A zstd frame header is at most 18 bytes (magic, descriptor, window, dict id, size).
_ZSTD_HEAD = 18


def _seekable(stream: BinaryIO) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False
