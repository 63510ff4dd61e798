"""Range coding of integer frequency rows with constriction, a batch per call.

A *stream* carries the tokens of several segments (the *lanes* of a coding
group), interleaved in step-major order: step 0's stage-1 symbols of every
active lane, then their stage-2 symbols, then step 1, and so on.  The decoder
reads them back in the same order with one call per stage per step.  A stream
is constriction's ``queue.RangeEncoder`` output (first in, first out): a
sequence of little-endian uint32 words.

Exact frequencies in, exact frequencies used: constriction's
``Categorical(perfect=False)`` gives each of the ``n`` entries of a row one
unit of its 2^24 total and shares the other ``2^24 - n`` in proportion to the
weights it is handed (``floor(cumulative * scale)``).  Handing it ``g - 1`` for
integer frequencies ``g >= 1`` that sum to 2^24 makes the weights sum to
``2^24 - n`` exactly, so ``scale`` is exactly 1, every floor is of an exact
integer, and the coder uses precisely ``g``: no floating-point rounding enters
the code (``tests/test_coder.py`` checks the code lengths bit for bit).

Who calls it: the tensor path (CUDA) and the tests.  On a CPU the compiled coding layer
codes through :mod:`lmcodec.coding.rangecoder`, a word-for-word port of this coder that
other numba code can call, held to these classes byte for byte by ``tests/test_rangecoder.py``.
"""

from __future__ import annotations

import constriction
import numpy as np

from ..errors import CorruptArchiveError

_FAMILY = constriction.stream.model.Categorical(perfect=False)


def _weights(freqs: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(freqs, dtype=np.float64) - 1.0


class StreamEncoder:
    """Accumulates one stream; each call codes one symbol per row of ``freqs``."""

    def __init__(self) -> None:
        self._enc = constriction.stream.queue.RangeEncoder()

    def encode(self, symbols: np.ndarray, freqs: np.ndarray) -> None:
        """Code ``symbols[i]`` under integer row ``freqs[i]`` (rows sum to 2^24, entries >= 1)."""
        if len(symbols):
            self._enc.encode(np.ascontiguousarray(symbols, dtype=np.int32), _FAMILY, _weights(freqs))

    def finish(self) -> bytes:
        return self._enc.get_compressed().astype("<u4").tobytes()


class StreamDecoder:
    """Reads back a stream, given the same rows in the same order."""

    def __init__(self, payload: bytes) -> None:
        if len(payload) % 4:
            raise CorruptArchiveError("stream payload is not a whole number of 32-bit words")
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        self._dec = constriction.stream.queue.RangeDecoder(words)

    def decode(self, freqs: np.ndarray) -> np.ndarray:
        """One symbol per row of ``freqs``."""
        if not len(freqs):
            return np.zeros(0, dtype=np.int64)
        try:
            return np.asarray(self._dec.decode(_FAMILY, _weights(freqs)), dtype=np.int64)
        except Exception as exc:  # constriction raises on data that cannot be a valid stream
            raise CorruptArchiveError(f"range decoder failed: {exc}") from exc
