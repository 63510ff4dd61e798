"""The coding tables and the range coder for every row of a pass, in compiled calls.

The data flow after the engine's output step, per row: the LM's symbol weights and bucket masses
(:func:`~lmcodec.coding.tables_cpu.token_weights`, a vocabulary-sized pass made where the weights are
made), then -- the coding work proper, a few hundred integers a row -- stage 1's frequencies from the
256 masses, the bucket's symbol, stage 2's frequencies from that bucket's ``width`` weights, the
symbol's place.  The coders' states are rows of one array (:mod:`lmcodec.coding.rangecoder`), and
each stream meets its symbols in the format's order (every live lane's stage-1 symbol, then their
stage-2 symbols).

The decoder (:class:`PlainPasses`): the output step keeps only every gaps row's bucket masses and
total (:func:`~lmcodec.coding.tables_cpu.masses_rows`), then :func:`decode_pass` decodes the whole
pass -- every column its guesses allow, every stream, recording each symbol with
:func:`~lmcodec.coding.lanes.record` -- in one call, remaking the chosen bucket's weights from the
gaps.  The encoder (:func:`encode_plain`): a chunk of one stream's steps per call over the full rows
(:class:`OutputRows`).

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
from .lanes import STATUS, RunningLanes, live_lanes, settle_stream
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
from .tables_cpu import bitlen, bucket_weights, find, left_of, masses_rows, stage1, stage2, weights_rows


@njit(inline="always", **JIT)
def take_bucket(mass, wbits, state, s, words, g1):  # pragma: no cover - compiled
    """Stage 1 of one row: the bucket stream ``s`` decodes under the row's bucket masses (-1: the payload
    cannot be valid)."""
    q = dec_quantile(state, s)
    if q < 0:
        return -1
    stage1(mass, wbits, g1)
    b, left = find(g1, BUCKETS, q)
    return b if dec_take(state, s, words, left, g1[b]) else -1


@njit(inline="always", **JIT)
def take_place(weights, m_b, state, s, words, g2):  # pragma: no cover - compiled
    """Stage 2 of one row: the place within its bucket (``weights`` [width], mass ``m_b``) that stream ``s``
    decodes (-1: the payload cannot be valid)."""
    q = dec_quantile(state, s)
    if q < 0:
        return -1
    width = g2.shape[0]
    stage2(weights, 0, width, m_b, g2)
    c, left = find(g2, width, q)
    return c if dec_take(state, s, words, left, g2[c]) else -1


@njit(**JIT)
def decode_buckets(mass, at, spans, streams, state, words, width, buckets):  # pragma: no cover - compiled
    """Stage 1 of one column (stream ``streams[k]``'s rows ``at[spans[k]:spans[k + 1]]`` of ``mass``): each
    row's bucket into ``buckets``.  Returns -1, or the first stream whose payload cannot be valid."""
    wbits = bitlen(width)
    g1 = np.empty(BUCKETS, np.int64)
    for k in range(streams.shape[0]):
        for m in range(spans[k], spans[k + 1]):
            b = take_bucket(mass[at[m]], wbits, state, streams[k], words, g1)
            if b < 0:
                return streams[k]
            buckets[m] = b
    return -1


@njit(**JIT)
def decode_places(weights, mass, at, buckets, spans, streams, state, words, symbols):  # pragma: no cover - compiled
    """Stage 2 of one column after :func:`decode_buckets`: row m's bucket weights are ``weights[m]`` [width];
    its symbol into ``symbols``.  Returns -1, or the first stream whose payload cannot be valid."""
    width = weights.shape[1]
    g2 = np.empty(width, np.int64)
    for k in range(streams.shape[0]):
        for m in range(spans[k], spans[k + 1]):
            b = buckets[m]
            c = take_place(weights[m], mass[at[m], b], state, streams[k], words, g2)
            if c < 0:
                return streams[k]
            symbols[m] = b * width + c
    return -1


@njit(**JIT)
def decode_pass(u, mass, totals, exp2, width, where, rows, lengths, segs, step, streams, state, words, flat, base,
                feed, widths, decoded, alphabet, vocab, placeholder, ended, log, out):  # pragma: no cover - compiled
    """Decode a whole pass of the streams without online models, every column its guesses allow.

    The running streams are :class:`~lmcodec.coding.lanes.RunningLanes`' arrays (``rows``, ``lengths``,
    ``segs``, ``step``, ``streams``: stream k's coder is ``state[streams[k]]``); output ``j`` of row ``r`` is
    row ``where[r, j]`` of the gaps ``u`` and of their bucket masses and totals
    (:func:`~lmcodec.coding.tables_cpu.masses_rows`).  Column 0 decodes every stream; column j + 1 the
    streams whose every live lane's guess after output j held (:func:`~lmcodec.coding.lanes.record`).
    Each stream meets its symbols in the format's order: its live lanes' stage-1 symbols (the bucket,
    from the 256 masses), then their stage-2 symbols (within the bucket, whose weights are remade from
    the gaps, :func:`~lmcodec.coding.tables_cpu.bucket_weights`).  Each decoded (row, symbol) goes to
    ``log`` [2, m] in order (the drafts' push).

    ``out`` adds up :func:`~lmcodec.coding.lanes.settle_stream`'s counts (guesses tried, held, symbols
    logged, status, lanes ended): status stays -1 while every stream is valid, else it is the index of a
    stream whose payload failed (its range decoder, or a symbol outside the alphabet); ``ended[k]`` is set
    where a lane of stream k ended.
    """
    n, L = rows.shape
    wbits = bitlen(width)
    g1 = np.empty(BUCKETS, np.int64)
    g2 = np.empty(width, np.int64)
    pw = np.empty(width, np.int64)
    at = np.empty(L, np.int64)
    lane = np.empty(L, np.int64)
    syms = np.empty(L, np.int64)
    active = np.arange(n)
    na = n
    j = 0
    while na:
        nn = 0
        for a in range(na):
            k = active[a]
            s = streams[k]
            m = live_lanes(k, j, rows, lengths, step, where, at, lane)
            for i in range(m):
                b = take_bucket(mass[at[i]], wbits, state, s, words, g1)
                if b < 0:
                    out[STATUS] = s
                    return
                syms[i] = b
            for i in range(m):
                x, b = at[i], syms[i]
                bucket_weights(u[x], b, width, totals[x], exp2, pw)
                c = take_place(pw, mass[x, b], state, s, words, g2)
                if c < 0:
                    out[STATUS] = s
                    return
                syms[i] = b * width + c
            g = settle_stream(k, syms[:m], lane[:m], j, rows, segs, lengths, step, flat, base, feed, widths, decoded,
                              alphabet, vocab, placeholder, ended, log, out)
            if g < 0:
                out[STATUS] = s
                return
            if g:
                active[nn] = k       # nn <= a: a slot already read
                nn += 1
        na = nn
        j += 1


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
    [n, 256 width] (int32: a weight is at most 2^30), bucket masses [n, 256] and token totals [n] of n rows
    of gaps (:func:`~lmcodec.coding.tables_cpu.weights_rows`; 13 MB for 64 rows of SmolLM2's alphabet)."""

    def __init__(self, alphabet: int):
        self.width = bucket_width(alphabet)
        self.exp2 = exp2_table()
        self._p = np.zeros((0, BUCKETS * self.width), np.int32)     # weights are at most 2^30
        self._mass = np.zeros((0, BUCKETS), np.int64)
        self._totals = np.zeros(0, np.int64)

    def __call__(self, u: np.ndarray, at: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p, mass, totals) of the rows ``at`` (default: all) of gaps ``u`` [*, V] int64 (no adaptive bias:
        streams with online models make their own rows, :mod:`lmcodec.coding.mixedpass`)."""
        u = np.ascontiguousarray(u)
        at = np.arange(u.shape[0]) if at is None else np.asarray(at, np.int64)
        n = at.shape[0]
        if n > self._p.shape[0]:
            self._p = np.empty((n, BUCKETS * self.width), np.int32)
            self._mass = np.empty((n, BUCKETS), np.int64)
            self._totals = np.empty(n, np.int64)
        p, mass, totals = self._p[:n], self._mass[:n], self._totals[:n]
        if n:
            sync_threads()      # weights_rows runs rows side by side on numba's threads: as many as torch's
            weights_rows(u, at, self.exp2, self.width, p, mass, totals)
        return p, mass, totals


class PlainPasses:
    """The decoder's streams without online models (levels 1-3) on a CPU: the output step's bucket masses of
    every row of a pass's gaps (:func:`~lmcodec.coding.tables_cpu.masses_rows`, the model's time), then the
    whole pass's decoding in one call (:func:`decode_pass`).  Buffers are reused from pass to pass."""

    def __init__(self, alphabet: int, bank: DecoderBank):
        self.width = bucket_width(alphabet)
        self.alphabet = alphabet
        self.exp2 = exp2_table()
        self.bank = bank
        self._mass = np.zeros((0, BUCKETS), np.int64)
        self._totals = np.zeros(0, np.int64)

    def masses(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bucket masses [n, 256] and token totals [n] of every row of the gaps ``u`` [n, V]."""
        n = u.shape[0]
        if n > self._mass.shape[0]:
            self._mass = np.empty((n, BUCKETS), np.int64)
            self._totals = np.empty(n, np.int64)
        mass, totals = self._mass[:n], self._totals[:n]
        if n:
            sync_threads()      # masses_rows runs rows side by side on numba's threads: as many as torch's
            masses_rows(u, self.exp2, self.width, mass, totals)
        return mass, totals

    def decode(self, u: np.ndarray, lanes: RunningLanes, where: np.ndarray, symbols: tuple[np.ndarray, np.ndarray],
               feed: np.ndarray, widths: np.ndarray, decoded: np.ndarray, vocab: int, placeholder: int,
               log: np.ndarray, out: np.ndarray) -> None:
        """:func:`decode_pass` over ``u`` and the masses :meth:`masses` made of it last (``log``, ``out``: its
        record of the pass, :func:`~lmcodec.coding.lanes.settle`'s).  Raises CorruptArchiveError for a
        stream that cannot be valid."""
        n = u.shape[0]
        flat, base = symbols
        decode_pass(u, self._mass[:n], self._totals[:n], self.exp2, self.width, where, lanes.rows, lanes.lengths,
                    lanes.segs, lanes.step, lanes.stream, self.bank.state, self.bank.words, flat, base, feed,
                    widths, decoded, self.alphabet, vocab, placeholder, lanes.ended, log, out)
        if out[3] >= 0:
            raise CorruptArchiveError(f"range decoder failed: stream {int(out[3])} cannot be a valid stream")


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
