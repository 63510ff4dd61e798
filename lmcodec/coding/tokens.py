"""Bytes <-> symbols, exactly, for every input.

The coder's alphabet is the model's vocabulary followed by 256 *escape* symbols,
one per byte value.  Text is tokenized with the model's own tokenizer, but a
token sequence is only accepted when its ids map back through the vocabulary's
byte table to exactly the bytes it came from.  Two kinds of vocabulary have a
byte table, chosen from the tokenizer itself: *byte-level* BPE (GPT-2's
alphabet of 256 printable stand-ins, SmolLM2) and *byte-fallback*
SentencePiece-style vocabularies (Gemma: ``▁`` for a space, ``<0xNN>`` for
the byte NN, special and control tokens never emitted).  Whatever does not round-trip --
invalid UTF-8, control characters the tokenizer silently drops, bytes the
vocabulary has no token for -- is spelled byte by byte: with the vocabulary's
single-byte token where one exists, else with the escape symbol for that byte.

Decoding never goes through ``str``: every symbol maps to a fixed byte string.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property

import numpy as np

from ..engine.spec.constants import ESCAPES


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: each byte is shown as one printable char."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}
# Characters of valid UTF-8 text that split the tokenizer's input: lone surrogates
# (invalid bytes, via surrogateescape) and C0 controls other than \t \n \r.
_SPLIT = re.compile(r"([\udc80-\udcff]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f])")
# Byte-fallback vocabularies split at a literal "▁" too: the tokenizer reads it as a
# space's stand-in, so it never round-trips and is spelled as its three bytes.
_SPLIT_SP = re.compile(r"([\udc80-\udcff]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\u2581)")
_SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def is_byte_fallback(tokenizer) -> bool:
    """Whether a ``tokenizers.Tokenizer`` is SentencePiece-style with byte fallback.

    Decided by the tokenizer's own model flag (BPE and Unigram carry it), so the
    table of a byte-level vocabulary such as SmolLM2's is built exactly as before.
    """
    return bool(getattr(tokenizer.model, "byte_fallback", False))


def _byte_level_table(tokenizer, vocab_size: int) -> list[bytes | None]:
    """id -> bytes through GPT-2's byte alphabet; a token outside it is never emitted."""
    table: list[bytes | None] = [None] * vocab_size
    for token, idx in tokenizer.get_vocab(with_added_tokens=False).items():
        if 0 <= idx < vocab_size:
            try:
                table[idx] = bytes(_BYTE_OF_CHAR[c] for c in token)
            except KeyError:
                table[idx] = None  # not a byte-level token: never emitted
    return table


def _piece_bytes(token: str) -> bytes | None:
    """A SentencePiece token's bytes: ``<0xNN>`` is byte NN, ``▁`` a space, the rest UTF-8."""
    m = _BYTE_TOKEN.fullmatch(token)
    if m:
        return bytes((int(m.group(1), 16),))
    try:
        raw = token.replace(_SPACE, " ").encode("utf-8")
    except UnicodeEncodeError:
        return None
    return raw or None  # an empty token would spell nothing: never emitted


def _byte_fallback_table(tokenizer, vocab_size: int) -> list[bytes | None]:
    """id -> bytes of a byte-fallback vocabulary; special (control) tokens are never emitted."""
    special = {i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special}
    table: list[bytes | None] = [None] * vocab_size
    for token, idx in tokenizer.get_vocab(with_added_tokens=True).items():
        if 0 <= idx < vocab_size and idx not in special:
            table[idx] = _piece_bytes(token)
    return table


def _drop_space_prefix(doc: dict | None) -> bool:
    """Remove a "▁" prefix from a normalizer or pre-tokenizer description (in place); whether one was there."""
    if not doc:
        return False
    kind = doc.get("type")
    if kind == "Metaspace" and doc.get("prepend_scheme", "always") != "never":
        doc["prepend_scheme"], doc["add_prefix_space"] = "never", False
        return True
    if kind != "Sequence":
        return False
    key = "normalizers" if "normalizers" in doc else "pretokenizers"
    items = doc.get(key) or []
    doc[key] = [d for d in items if d.get("type") != "Prepend"]
    nested = [_drop_space_prefix(d) for d in doc[key]]
    return len(doc[key]) < len(items) or any(nested)


def without_space_prefix(tokenizer):
    """The tokenizer without the space it would put before its input (SentencePiece's add_space_prefix).

    lmcodec tokenizes pieces of a text, and a token's bytes must be exactly the text's:
    a "▁" added in front of every piece would never round-trip.  Only rebuilt when
    the tokenizer does add one (one short probe; rebuilding a 262k vocabulary takes a second).
    """
    probe = tokenizer.encode("a", add_special_tokens=False).tokens
    if not probe or not probe[0].startswith(_SPACE):
        return tokenizer
    from tokenizers import Tokenizer

    doc = json.loads(tokenizer.to_str())
    normalizer = doc.get("normalizer")
    if normalizer and normalizer.get("type") == "Prepend":
        doc["normalizer"] = None
    elif not (_drop_space_prefix(normalizer) | _drop_space_prefix(doc.get("pre_tokenizer"))):
        return tokenizer
    return Tokenizer.from_str(json.dumps(doc))


def _byte_token_ids(tokenizer) -> set[int]:
    """Ids of a byte-fallback vocabulary's ``<0xNN>`` tokens."""
    return {idx for token, idx in tokenizer.get_vocab(with_added_tokens=False).items() if _BYTE_TOKEN.fullmatch(token)}


def _single_bytes(table: list[bytes | None], later: set[int]) -> dict[int, int]:
    """Byte value -> the token that spells it alone: the lowest id outside ``later``, else the
    lowest in it (a byte-fallback vocabulary spells ``\t`` with its text piece, as its tokenizer
    does, and a byte without one with ``<0xNN>``; a byte-level one passes no ``later``)."""
    single: dict[int, int] = {}
    for second in (False, True):
        for idx, raw in enumerate(table):
            if raw is not None and len(raw) == 1 and raw[0] not in single and (idx in later) == second:
                single[raw[0]] = idx
    return single


class ByteTokenizer:
    """Lossless bytes <-> symbol ids on top of a ``tokenizers.Tokenizer``: byte-level BPE or byte fallback."""

    def __init__(self, tokenizer, vocab_size: int):
        self.byte_fallback = is_byte_fallback(tokenizer)
        self._tok = without_space_prefix(tokenizer) if self.byte_fallback else tokenizer
        self._tok.encode_special_tokens = True  # "<|endoftext|>" in data is just text
        self.vocab_size = vocab_size
        if self.byte_fallback:
            self._table = _byte_fallback_table(tokenizer, vocab_size)
        else:
            self._table = _byte_level_table(tokenizer, vocab_size)
        self._single = _single_bytes(self._table, _byte_token_ids(tokenizer) if self.byte_fallback else set())

    @property
    def alphabet_size(self) -> int:
        """Vocabulary plus one escape symbol per byte value."""
        return self.vocab_size + ESCAPES

    @cached_property
    def fingerprint(self) -> bytes:
        """Hash of the symbol -> bytes table: exactly what decoding depends on."""
        h = hashlib.blake2b(digest_size=16)
        for raw in self._table:
            h.update(b"\xff" if raw is None else len(raw).to_bytes(2, "little") + raw)
        return h.digest()

    @cached_property
    def start_token(self) -> int:
        """Token every segment's context starts with: the document separator.

        A byte-fallback vocabulary's is its special begin-of-sequence token: Gemma also
        has ``<s>`` as a plain text piece, which must not start a context.
        """
        if self.byte_fallback:
            special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
            for name in ("<bos>", "<s>", "<|begin_of_text|>", "<|endoftext|>"):
                if special.get(name, self.vocab_size) < self.vocab_size:
                    return special[name]
            return 0
        for name in ("<|endoftext|>", "<s>", "<bos>", "<|begin_of_text|>"):
            idx = self._tok.token_to_id(name)
            if idx is not None and idx < self.vocab_size:
                return idx
        return 0

    @cached_property
    def placeholder(self) -> int:
        """Token fed to the model in place of an escaped byte ('?' or id 0)."""
        return self._single.get(ord("?"), 0)

    @cached_property
    def missing_bytes(self) -> list[int]:
        """Byte values the vocabulary cannot express on their own (need escapes)."""
        return [b for b in range(256) if b not in self._single]

    def _spell(self, raw: bytes) -> list[int]:
        return [self._single.get(b, self.vocab_size + b) for b in raw]

    def _bytes_of(self, ids: list[int]) -> bytes | None:
        parts = []
        for i in ids:
            raw = self._table[i] if 0 <= i < self.vocab_size else None
            if raw is None:
                return None
            parts.append(raw)
        return b"".join(parts)

    def _piece(self, piece: str) -> list[int]:
        """One piece's ids: the tokenizer's where they spell it exactly, else byte by byte.

        A byte-fallback tokenizer has no pre-tokenizer to cut its input (a piece can
        be a whole block), so a piece that fails is first retried line by line: one
        odd spot then costs its line, not the block.
        """
        raw = piece.encode("utf-8", errors="surrogateescape")
        ids = self._tok.encode(piece, add_special_tokens=False).ids
        if self._bytes_of(ids) == raw:
            return ids
        if self.byte_fallback:
            lines = piece.splitlines(keepends=True)
            if len(lines) > 1:
                return [i for line in lines for i in self._piece(line)]
        return self._spell(raw)

    def encode(self, data: bytes) -> np.ndarray:
        """Symbols (int64) whose :meth:`decode` is exactly ``data``."""
        out: list[int] = []
        split = _SPLIT_SP if self.byte_fallback else _SPLIT
        text = data.decode("utf-8", errors="surrogateescape")
        for piece in split.split(text):
            if not piece:
                continue
            if split.fullmatch(piece):
                out.extend(self._spell(piece.encode("utf-8", errors="surrogateescape")))
                continue
            out.extend(self._piece(piece))
        return np.asarray(out, dtype=np.int64)

    def decode(self, symbols) -> bytes:
        """The bytes of a symbol sequence; raises ValueError on an impossible symbol."""
        parts = []
        v = self.vocab_size
        for s in np.asarray(symbols, dtype=np.int64).tolist():
            if s >= v:
                if s >= v + ESCAPES:
                    raise ValueError(f"symbol {s} outside the alphabet")
                parts.append(bytes((s - v,)))
                continue
            raw = self._table[s] if s >= 0 else None
            if raw is None:
                raise ValueError(f"symbol {s} has no byte form")
            parts.append(raw)
        return b"".join(parts)

    def model_inputs(self, symbols: np.ndarray) -> np.ndarray:
        """Token ids the model sees: escapes become :attr:`placeholder`."""
        return np.where(symbols >= self.vocab_size, self.placeholder, symbols)
