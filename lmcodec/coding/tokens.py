"""Bytes <-> symbols, exactly, for every input.

The coder's alphabet is the model's vocabulary followed by 256 *escape* symbols,
one per byte value.  Text is tokenized with the model's own tokenizer, but a
token sequence is only accepted when its ids map back through the byte-level
vocabulary to exactly the bytes it came from.  Whatever does not round-trip --
invalid UTF-8, control characters the tokenizer silently drops, bytes the
vocabulary has no token for -- is spelled byte by byte: with the vocabulary's
single-byte token where one exists, else with the escape symbol for that byte.

Decoding never goes through ``str``: every symbol maps to a fixed byte string.
"""

from __future__ import annotations

import hashlib
import re
from functools import cached_property

import numpy as np

from ..engine.spec import ESCAPES


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


class ByteTokenizer:
    """Lossless bytes <-> symbol ids on top of a byte-level BPE ``tokenizers.Tokenizer``."""

    def __init__(self, tokenizer, vocab_size: int):
        self._tok = tokenizer
        self._tok.encode_special_tokens = True  # "<|endoftext|>" in data is just text
        self.vocab_size = vocab_size
        table: list[bytes | None] = [None] * vocab_size
        for token, idx in tokenizer.get_vocab(with_added_tokens=False).items():
            if 0 <= idx < vocab_size:
                try:
                    table[idx] = bytes(_BYTE_OF_CHAR[c] for c in token)
                except KeyError:
                    table[idx] = None  # not a byte-level token: never emitted
        self._table = table
        self._single: dict[int, int] = {}
        for idx, raw in enumerate(table):
            if raw is not None and len(raw) == 1 and raw[0] not in self._single:
                self._single[raw[0]] = idx

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
        """Token every segment's context starts with: the document separator."""
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

    def encode(self, data: bytes) -> np.ndarray:
        """Symbols (int64) whose :meth:`decode` is exactly ``data``."""
        out: list[int] = []
        text = data.decode("utf-8", errors="surrogateescape")
        for piece in _SPLIT.split(text):
            if not piece:
                continue
            raw = piece.encode("utf-8", errors="surrogateescape")
            if _SPLIT.fullmatch(piece):
                out.extend(self._spell(raw))
                continue
            ids = self._tok.encode(piece, add_special_tokens=False).ids
            out.extend(ids if self._bytes_of(ids) == raw else self._spell(raw))
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
