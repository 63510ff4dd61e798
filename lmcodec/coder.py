"""Entropy coding of one segment's symbols with constriction's range coder.

Each segment is an independent stream (``stream.queue.RangeEncoder``: first in,
first out), so segments can be decoded side by side in any grouping the
archive's layout allows.  A stream is a sequence of little-endian uint32 words.

A token is coded in one or two steps (see :class:`~lmcodec.frequencies.StepTables`):
its stage-1 index, then -- only if that is *other* -- the symbol itself under
the stage-2 row.
"""

from __future__ import annotations

import math

import constriction
import numpy as np

from .errors import CorruptArchiveError
from .frequencies import StepTables

_FAMILY = constriction.stream.model.Categorical(perfect=False)


#: The least share of a row the quantizer gives any entry (frequency 1 of 2^24).
_LEAST = 2.0 ** -24


def _bits(row: np.ndarray, symbol: int) -> float:
    """-log2 of ``symbol``'s share of ``row``.  A share that underflowed to 0 in
    float32 is still coded at the quantizer's floor, so it is counted there."""
    total = row.sum()
    return -math.log2(max(row[symbol] / total, _LEAST))


class SegmentEncoder:
    """Accumulates one segment's symbols, each under its own probability row."""

    def __init__(self) -> None:
        self._enc = constriction.stream.queue.RangeEncoder()

    def encode(self, symbol: int, row: np.ndarray) -> None:
        """Code ``symbol`` under one row of (unnormalized) float64 weights."""
        self._enc.encode(np.array([symbol], dtype=np.int32), _FAMILY, row[None, :])

    def encode_token(self, tables: StepTables, row: int, symbol: int) -> float:
        """Code ``symbol`` under row ``row`` of ``tables``; return its ideal bits."""
        j = tables.index(row, symbol)
        head = tables.head[row]
        self.encode(j, head)
        bits = _bits(head, j)
        if j == tables.other:
            tail = tables.tail(row)
            self.encode(symbol, tail)
            bits += _bits(tail, symbol)
        return bits

    def finish(self) -> bytes:
        return self._enc.get_compressed().astype("<u4").tobytes()


class SegmentDecoder:
    """Reads back the symbols of one segment, given the same rows in the same order."""

    def __init__(self, payload: bytes) -> None:
        if len(payload) % 4:
            raise CorruptArchiveError("segment payload is not a whole number of 32-bit words")
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        self._dec = constriction.stream.queue.RangeDecoder(words)

    def decode(self, row: np.ndarray) -> int:
        """The next symbol under one row of float64 weights."""
        try:
            return int(self._dec.decode(_FAMILY, row[None, :])[0])
        except Exception as exc:  # constriction raises on data that cannot be a valid stream
            raise CorruptArchiveError(f"range decoder failed: {exc}") from exc

    def decode_token(self, tables: StepTables, row: int) -> int:
        """The next symbol under row ``row`` of ``tables`` (the inverse of ``encode_token``)."""
        j = self.decode(tables.head[row])
        if j < tables.other:
            return int(tables.top_ids[row, j])
        return self.decode(tables.tail(row))
