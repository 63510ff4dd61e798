"""Reading an archive: every structure checked before anything is allocated from it.

:class:`Reader` parses the header (any version this lmcodec reads), then the blocks
and the end record of the general form, or the one block of the short form, with
its payload check (docs/FORMAT.md).  A seekable archive is walked whole first, so
damage is refused before the first block is decoded -- before the model runs.
The records it returns and how they are written are :mod:`lmcodec.format.container`.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import BinaryIO

from ..errors import (
    CorruptArchiveError,
    NotAnArchiveError,
    TruncatedArchiveError,
    UnsupportedFormatError,
)
from .container import (
    _CRC,
    BLOCK_TAG,
    CHECK_BYTES,
    END_TAG,
    F5_GENERAL,
    F5_METHOD_SHIFT,
    MAGIC,
    MAGIC5,
    MIN_STREAM_ENTRY,
    OLD_VERSIONS,
    PAYLOAD_CHECK_BYTES,
    READ_CHUNK,
    READ_VERSIONS,
    SHORT_CHECK_BYTES,
    VARINT_MAX_BYTES,
    Block,
    End,
    Header,
    HeaderFields,
    Method,
    StreamEntry,
    content_hasher,
    decode_varint,
    digest,
    has_payload_check,
    lm_payload_limit,
    payload_hasher,
    segment_layout,
    short_hasher,
    stream_count,
    stream_tokens,
    zstd_payload_limit,
)


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
            self.expect_end()
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
        self.expect_end()   # the short form is the whole archive: nothing after its payloads
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

    def expect_end(self) -> None:
        """Refuse bytes after the archive's last structure (reads one byte, if there is one)."""
        if self._s.read(1):
            raise CorruptArchiveError("trailing data after the end of the archive")


_METHODS = frozenset(int(m) for m in Method)

#: A zstd frame header is at most 18 bytes (magic, descriptor, window, dict id, size).
_ZSTD_HEAD = 18


def _seekable(stream: BinaryIO) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False
