"""The archive format: a header, then one block in the short form, or blocks and an end record.

See docs/FORMAT.md.  Format v6 (as v5) has two layouts.  The *short form* holds
at most one block (every file up to the block size, 4 MiB by default): header
fields, the block's lengths, one 32-bit check and the payloads -- 15 bytes of
framing for a 1.4 KB text with the default model.  Its check is BLAKE2b-32 of
the header's bytes and the original (:func:`short_hasher`), so it covers the
model id, the dictionary id, the prompt check and the level as well as the
content; it is verified after decoding.  From v6 an LM block of
:data:`PAYLOAD_CHECK_TOKENS` tokens or more also carries a payload check over
every other byte (:func:`payload_hasher`), verified before decoding.  The
*general form* (two blocks or more) is v4's: a header CRC, blocks that carry their own CRC32s and BLAKE2b-64
digests, and an end record with the digest of the whole content.

Every length is checked against the bytes actually present *before* anything
is allocated from it, so a damaged or hostile archive fails with a named
:class:`ArchiveError`, early and cheaply.

The header (its fields, the levels, the model ids, varints) is
:mod:`lmcodec.format.header`; its names are re-exported here.  Reading and
checking an archive is :mod:`lmcodec.format.reader`.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from enum import IntEnum

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
