"""One compiled call per pass: the coding tables and the range coder for every row of a step.

Today's data flow after the engine's output step, per row: the LM's symbol weights and bucket
masses (:func:`~lmcodec.coding.tables_cpu.token_weights`, a vocabulary-sized pass made where the
weights are made), then -- the coding work proper, a few hundred integers a row -- stage 1's
frequencies from the 256 masses, the bucket's symbol, stage 2's frequencies from that bucket's
``width`` weights, the symbol's place.  The functions here do that for all the streams of a step
in one call: the coders' states are rows of one array (:mod:`lmcodec.coding.rangecoder`), a
stream's lanes are contiguous rows, and each stream meets its symbols in the format's order
(every live lane's stage-1 symbol, then their stage-2 symbols).

This module covers the streams without online models (levels 1-3); streams with them go through
:mod:`lmcodec.coding.mixedpass`, whose functions take the online models' arrays as well.
"""

from __future__ import annotations

import math

import numpy as np

from ..engine.cpu.jit import JIT, njit, sync_threads
from ..engine.spec.constants import BUCKETS
from ..engine.spec.fixedmath import exp2_table
from ..errors import CorruptArchiveError
from .frequencies import bucket_width
from .rangecoder import (
    dec_init,
    dec_quantile,
    dec_take,
    enc_finish,
    enc_init,
    enc_pending,
    enc_put,
    new_state,
)
from .tables_cpu import bitlen, find, left_of, stage1, stage2, weights_rows


@njit(**JIT)
def decode_plain(p, mass, spans, slots, state, words, width, symbols):  # pragma: no cover - compiled
    """Decode one symbol for each row of ``p`` [n, 256 width] / ``mass`` [n, 256]: stream k's rows are
    ``spans[k]:spans[k + 1]`` and its coder is ``state[slots[k]]``.  Writes ``symbols`` [n]; returns the
    index of the first stream whose payload is invalid, or -1."""
    wbits = bitlen(width)
    g1 = np.empty(BUCKETS, np.int64)
    g2 = np.empty(width, np.int64)
    for k in range(len(slots)):
        s = slots[k]
        for r in range(spans[k], spans[k + 1]):
            q = dec_quantile(state, s)
            if q < 0:
                return k
            stage1(mass[r], wbits, g1)
            b, left = find(g1, BUCKETS, q)
            if not dec_take(state, s, words, left, g1[b]):
                return k
            symbols[r] = b
        for r in range(spans[k], spans[k + 1]):
            b = symbols[r]
            q = dec_quantile(state, s)
            if q < 0:
                return k
            stage2(p[r], b * width, width, mass[r, b], g2)
            j, left = find(g2, width, q)
            if not dec_take(state, s, words, left, g2[j]):
                return k
            symbols[r] = b * width + j
    return -1


@njit(**JIT)
def encode_plain(p, mass, spans, symbols, state, slot, out, n, width):  # pragma: no cover - compiled
    """Code ``symbols`` [rows] under rows ``p`` / ``mass`` into stream ``state[slot]``: step t's rows are
    ``spans[t]:spans[t + 1]`` (its live lanes in order), each step's stage-1 symbols then its stage-2 ones.
    Appends the words to ``out`` from ``n``; returns (the new count, the exact code length in bits)."""
    wbits = bitlen(width)
    g1 = np.empty(BUCKETS, np.int64)
    g2 = np.empty(width, np.int64)
    bits = 0.0
    for t in range(len(spans) - 1):
        for r in range(spans[t], spans[t + 1]):
            b = symbols[r] // width
            stage1(mass[r], wbits, g1)
            n = enc_put(state, slot, out, n, left_of(g1, b), g1[b])
            bits += 24.0 - math.log2(g1[b])
        for r in range(spans[t], spans[t + 1]):
            b = symbols[r] // width
            j = symbols[r] - b * width
            stage2(p[r], b * width, width, mass[r, b], g2)
            n = enc_put(state, slot, out, n, left_of(g2, j), g2[j])
            bits += 24.0 - math.log2(g2[j])
    return n, bits


class OutputRows:
    """The output step's rows on a CPU, reused from pass to pass: the LM's symbol weights ``p``
    [n, 256 width], bucket masses [n, 256] and token totals [n] of n rows of gaps
    (:func:`~lmcodec.coding.tables_cpu.weights_rows`; 25 MB for 64 rows of SmolLM2's alphabet)."""

    def __init__(self, alphabet: int):
        self.width = bucket_width(alphabet)
        self.exp2 = exp2_table()
        self._p = np.zeros((0, BUCKETS * self.width), np.int64)
        self._mass = np.zeros((0, BUCKETS), np.int64)
        self._totals = np.zeros(0, np.int64)

    def __call__(self, u: np.ndarray, at: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p, mass, totals) of the rows ``at`` (default: all) of gaps ``u`` [*, V] int64 (no adaptive bias:
        streams with online models make their own rows, :mod:`lmcodec.coding.mixedpass`)."""
        u = np.ascontiguousarray(u)
        at = np.arange(u.shape[0]) if at is None else np.asarray(at, np.int64)
        n = at.shape[0]
        if n > self._p.shape[0]:
            self._p = np.empty((n, BUCKETS * self.width), np.int64)
            self._mass = np.empty((n, BUCKETS), np.int64)
            self._totals = np.empty(n, np.int64)
        p, mass, totals = self._p[:n], self._mass[:n], self._totals[:n]
        if n:
            sync_threads()      # weights_rows runs rows side by side on numba's threads: as many as torch's
            weights_rows(u, at, self.exp2, self.width, p, mass, totals)
        return p, mass, totals


class DecoderBank:
    """The range decoders of every stream of a decode, as rows of one state array over one array of words
    (stream k reads its payload's words; :func:`open` starts it)."""

    def __init__(self, payloads: list[bytes]):
        for k, payload in enumerate(payloads):
            if len(payload) % 4:
                raise CorruptArchiveError(f"stream {k}'s payload is not a whole number of 32-bit words")
        self.words = np.frombuffer(b"".join(payloads), dtype="<u4").astype(np.uint32)
        self.at = np.concatenate([[0], np.cumsum([len(p) // 4 for p in payloads])]).astype(np.int64)
        self.state = new_state(max(1, len(payloads)))

    def open(self, k: int) -> None:
        dec_init(self.state, k, self.words, int(self.at[k]), int(self.at[k + 1]))


def decode_rows_plain(bank: DecoderBank, p: np.ndarray, mass: np.ndarray, spans: np.ndarray, slots: np.ndarray
                      ) -> np.ndarray:
    """One symbol per row of the output step's ``p`` / ``mass`` (streams without online models;
    see :func:`decode_plain`)."""
    symbols = np.empty(p.shape[0], np.int64)
    width = p.shape[1] // BUCKETS
    bad = decode_plain(p, mass, spans, slots, bank.state, bank.words, width, symbols)
    if bad >= 0:
        raise CorruptArchiveError(f"range decoder failed: stream {int(slots[bad])} cannot be a valid stream")
    return symbols


class EncoderBuffer:
    """One stream's range encoder and the words it has written (grown as needed)."""

    def __init__(self) -> None:
        self.state = new_state(1)
        enc_init(self.state, 0)
        self.out = np.empty(1 << 12, np.uint32)
        self.n = 0

    def room(self, puts: int) -> None:
        """Make room for ``puts`` more symbols and the seal."""
        need = self.n + enc_pending(self.state, 0) + puts + 2
        if need > len(self.out):
            grown = np.empty(max(need, 2 * len(self.out)), np.uint32)
            grown[:self.n] = self.out[:self.n]
            self.out = grown

    def finish(self) -> bytes:
        self.room(0)
        n = enc_finish(self.state, 0, self.out, self.n)
        return self.out[:n].astype("<u4").tobytes()


@njit(**JIT)
def settle(sym, rows, segs, step, j, flat, base, feed, width, decoded, alphabet, vocab, placeholder
           ):  # pragma: no cover - compiled
    """Record one stream's decoded symbols ``sym`` (its live lanes' rows ``rows``, segments ``segs``, all at
    ``step``) from output ``j`` of their rows: each segment's symbol, the token fed next, the rows' counts, and
    whether the guess fed after output j held.  Returns (guesses tried, guesses held, every lane's held), or
    (-1, 0, False) for a symbol outside the alphabet (a corrupt stream)."""
    tried = 0
    held = 0
    every = True
    for i in range(sym.shape[0]):
        x = sym[i]
        if x < 0 or x >= alphabet:
            return -1, 0, False
        row = rows[i]
        flat[base[segs[i]] + step] = x
        fed = x if x < vocab else placeholder
        feed[row, 0] = fed
        decoded[row] += 1
        if j + 1 < width[row]:
            tried += 1
            if feed[row, j + 1] == fed:
                held += 1
            else:
                every = False
        else:
            every = False
    return tried, held, every
