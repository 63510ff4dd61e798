"""Entropy coding of one segment's symbols with constriction's range coder.

Each segment is an independent stream (``stream.queue.RangeEncoder``: first in,
first out), so segments can be decoded side by side in any grouping the
archive's layout allows.  A stream is a sequence of little-endian uint32 words.
"""

from __future__ import annotations

import constriction
import numpy as np

from .errors import CorruptArchiveError

_FAMILY = constriction.stream.model.Categorical(perfect=False)


class SegmentEncoder:
    """Accumulates one segment's symbols, each under its own probability row."""

    def __init__(self) -> None:
        self._enc = constriction.stream.queue.RangeEncoder()

    def encode(self, symbol: int, row: np.ndarray) -> None:
        self._enc.encode(np.array([symbol], dtype=np.int32), _FAMILY, row[None, :])

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
        try:
            return int(self._dec.decode(_FAMILY, row[None, :])[0])
        except Exception as exc:  # constriction raises on data that cannot be a valid stream
            raise CorruptArchiveError(f"range decoder failed: {exc}") from exc
