"""The streams with online models (levels 4-9) in compiled calls: one per stream and decoder pass, one per
stream and chunk of steps encoding.

After the engine's gaps, a stream's step is, per live lane (rows in lane order): the LM's weights after
the adaptive bias and their bucket masses (:func:`~lmcodec.coding.tables_cpu.token_weights`, the output
step's vocabulary pass), the online models' prediction (:func:`~lmcodec.coding.online.predict`: which
components, their weights, the LM's scale, the sparse additions), the mixed row's bucket masses (one more
vocabulary pass, never the mixed row itself), then the coder: every lane's bucket (stage 1), every lane's
place in it (stage 2, from that bucket's mixed weights only), in the format's order.  Then the learning,
in :class:`~lmcodec.coding.mixing.StreamMixer`'s order: the bias (:func:`~lmcodec.coding.bias_cpu.learn_step`),
the mixing weights (:func:`~lmcodec.coding.online.learn`), the counts and the match model
(:func:`~lmcodec.coding.online.append`).

The integers are StreamMixer's and CodingTables' (``tests/test_passes.py`` runs both on the same rows):
a bucket's mixed mass is the sum of its symbols' ``(p_v * scale) >> MASS_BITS``, plus the additions
that fall in it, with each escape raised to the floor after its additions.
"""

from __future__ import annotations

import math

import numpy as np

from ..engine.cpu.jit import JIT, njit
from ..engine.spec.constants import BUCKETS, ESCAPES
from ..engine.spec.fixedmath import exp2_table
from ..errors import CorruptArchiveError
from .bias_cpu import learn_step
from .frequencies import bucket_width
from .lanes import STATUS, RunningLanes, live_lanes, settle_stream
from .mixerconfig import MixerConfig
from .mixing import BIAS_CAP, BIAS_COUNT_CAP, BIAS_FRAC, MASS_BITS, _rate_array
from .online import OnlineModels, append, learn, predict
from .rangecoder import dec_quantile, dec_take, enc_put
from .tables_cpu import bitlen, find, left_of, stage1, stage2, token_weights

# The pending row's columns of online.predict (prow): scale, escape floor, additions.
_SCALE, _FLOOR, _ADDS = 2, 3, 5
_PROW, _PADD_SYM, _PADD_VAL = 18, 23, 24


@njit(inline="always", **JIT)
def _mixed_masses(state, r, p, vocab, width, mm, esc):  # pragma: no cover - compiled
    """mm [256] <- the bucket masses of pending row ``r``'s mixed weights of LM weights ``p``
    (``esc`` [256]: zeros on entry and on return)."""
    prow = state[_PROW]
    scale = prow[r, _SCALE]
    for b in range(BUCKETS):
        m = np.int64(0)
        for v in range(b * width, (b + 1) * width):
            m += (p[v] * scale) >> MASS_BITS
        mm[b] = m
    sym = state[_PADD_SYM]
    val = state[_PADD_VAL]
    for j in range(prow[r, _ADDS]):
        s = sym[r, j]
        if s < vocab:
            mm[s // width] += val[r, j]
        else:
            esc[s - vocab] += val[r, j]
    floor = prow[r, _FLOOR]
    for e in range(ESCAPES):
        v = vocab + e
        base = (p[v] * scale) >> MASS_BITS
        mm[v // width] += max(base + esc[e], floor) - base
        esc[e] = 0


@njit(inline="always", **JIT)
def _mixed_bucket(state, r, p, b, vocab, width, out):  # pragma: no cover - compiled
    """out [width] <- pending row ``r``'s mixed weights of bucket ``b``."""
    prow = state[_PROW]
    scale = prow[r, _SCALE]
    lo = b * width
    for j in range(width):
        out[j] = (p[lo + j] * scale) >> MASS_BITS
    sym = state[_PADD_SYM]
    val = state[_PADD_VAL]
    for j in range(prow[r, _ADDS]):
        s = sym[r, j]
        if lo <= s < lo + width:
            out[s - lo] += val[r, j]
    floor = prow[r, _FLOOR]
    for v in range(max(lo, vocab), min(lo + width, vocab + ESCAPES)):
        out[v - lo] = max(out[v - lo], floor)


@njit(inline="always", **JIT)
def _stage2(online, mixing, r, p, b, vocab, width, mm, esc, g2):  # pragma: no cover - compiled
    """g2 <- stage 2's frequencies of row ``r``'s bucket ``b``: of its mixed weights (made in ``esc``, left
    zero again) with online models, else of the LM's own."""
    if mixing:
        _mixed_bucket(online, r, p[r], b, vocab, width, esc[:width])
        stage2(esc, 0, width, mm[r, b], g2)
        esc[:width] = 0
    else:
        stage2(p[r], b * width, width, mm[r, b], g2)


@njit(inline="always", **JIT)
def _predict_rows(u, at, lanes, n, online, mixing, has_bias, bias, frac, exp2, width, p, mass, totals, mm, esc
                  ):  # pragma: no cover - compiled
    """The LM's weights of ``n`` rows (row r: gaps ``u[at[r]]``) after the bias, and the online models'
    prediction and mixed masses (into ``mm``; without online models the LM's masses are copied there)."""
    vocab = u.shape[1]
    for r in range(n):
        totals[r] = token_weights(u[at[r]], bias, has_bias, frac, exp2, width, p[r], mass[r])
        if mixing:
            full = np.int64(0)
            for b in range(BUCKETS):
                full += mass[r, b]
            predict(online, r, lanes[r], full)
            _mixed_masses(online, r, p[r], vocab, width, mm[r], esc)
        else:
            for b in range(BUCKETS):
                mm[r, b] = mass[r, b]


@njit(inline="always", **JIT)
def _learn_rows(lanes, ys, n, online, mixing, has_bias, bias, coded, rates, rate_now, count_cap, bias_cap, p,
                totals):  # pragma: no cover - compiled
    """StreamMixer.update's order: the bias, then each row's mixing weights, then each row's counts."""
    if has_bias:
        learn_step(p, totals, ys, n, coded, rates, rate_now, bias, count_cap, bias_cap)
    if mixing:
        for r in range(n):
            learn(online, r, ys[r], np.int64(p[r, ys[r]]))
        for r in range(n):
            append(online, lanes[r], ys[r])


@njit(**JIT)
def decode_mixed(u, at, lanes, online, mixing, has_bias, bias, coded, rates, rate_now, frac, count_cap, bias_cap, exp2,
                 p, mass, totals, mm, esc, g1, g2, state, slot, words, symbols):  # pragma: no cover - compiled
    """Decode one symbol for each row r of gaps ``u[at[r]]`` (``u`` [*, V]; lane ``lanes[r]`` of one stream,
    whose coder is ``state[slot]``) into ``symbols``, and learn them.  False where the payload cannot be valid."""
    n = at.shape[0]
    width = g2.shape[0]
    vocab = u.shape[1]
    wbits = bitlen(width)
    _predict_rows(u, at, lanes, n, online, mixing, has_bias, bias, frac, exp2, width, p, mass, totals, mm, esc)
    for r in range(n):
        q = dec_quantile(state, slot)
        if q < 0:
            return False
        stage1(mm[r], wbits, g1)
        b, left = find(g1, BUCKETS, q)
        if not dec_take(state, slot, words, left, g1[b]):
            return False
        symbols[r] = b
    for r in range(n):
        b = symbols[r]
        q = dec_quantile(state, slot)
        if q < 0:
            return False
        _stage2(online, mixing, r, p, b, vocab, width, mm, esc, g2)
        j, left = find(g2, width, q)
        if not dec_take(state, slot, words, left, g2[j]):
            return False
        symbols[r] = b * width + j
    _learn_rows(lanes, symbols, n, online, mixing, has_bias, bias, coded, rates, rate_now, count_cap, bias_cap, p,
                totals)
    return True


@njit(**JIT)
def decode_stream_pass(u, where, k, rows, lengths, segs, step, online, mixing, has_bias, bias, coded, rates, rate_now,
                       frac, count_cap, bias_cap, exp2, p, mass, totals, mm, esc, g1, g2, state, slot, words, flat,
                       base, feed, widths, decoded, alphabet, vocab, placeholder, ended, log, out
                       ):  # pragma: no cover - compiled
    """Stream ``k``'s part of a decoder pass (:class:`~lmcodec.coding.lanes.RunningLanes`' arrays): each
    column its guesses allow, :func:`decode_mixed` of its live lanes' outputs (gaps row ``where[row, j]``)
    then :func:`~lmcodec.coding.lanes.settle_stream`.  Streams are independent, so a stream may run its
    columns before the next stream runs any.  A payload that cannot be valid sets ``out[STATUS]``."""
    L = rows.shape[1]
    at = np.empty(L, np.int64)
    lane = np.empty(L, np.int64)
    syms = np.empty(L, np.int64)
    j = 0
    while True:
        n = live_lanes(k, j, rows, lengths, step, where, at, lane)
        if not decode_mixed(u, at[:n], lane[:n], online, mixing, has_bias, bias, coded, rates, rate_now, frac,
                            count_cap, bias_cap, exp2, p, mass, totals, mm, esc, g1, g2, state, slot, words, syms[:n]):
            out[STATUS] = slot
            return
        g = settle_stream(k, syms[:n], lane[:n], j, rows, segs, lengths, step, flat, base, feed, widths, decoded,
                          alphabet, vocab, placeholder, ended, log, out)
        if g < 0:
            out[STATUS] = slot
            return
        if g == 0:
            return
        j += 1


@njit(**JIT)
def encode_mixed(u, spans, lanes, ys, online, mixing, has_bias, bias, coded, rates, rate_now, frac, count_cap, bias_cap,
                 exp2, p, mass, totals, mm, esc, g1, g2, state, slot, out, n):  # pragma: no cover - compiled
    """Code the symbols ``ys`` of a chunk of steps into stream ``state[slot]``: step t's rows are
    ``spans[t]:spans[t + 1]`` of ``u`` / ``lanes`` / ``ys``, each step predicted, coded (stage 1 of every
    row, then stage 2) and learned before the next.  Appends words to ``out`` from ``n``; returns (the new
    count, the exact code length in bits)."""
    width = g2.shape[0]
    vocab = u.shape[1]
    wbits = bitlen(width)
    bits = 0.0
    for t in range(len(spans) - 1):
        a, z = spans[t], spans[t + 1]
        m = z - a
        _predict_rows(u, np.arange(a, z), lanes[a:z], m, online, mixing, has_bias, bias, frac, exp2, width, p, mass,
                      totals, mm, esc)
        for r in range(m):
            b = ys[a + r] // width
            stage1(mm[r], wbits, g1)
            n = enc_put(state, slot, out, n, left_of(g1, b), g1[b])
            bits += 24.0 - math.log2(g1[b])
        for r in range(m):
            b = ys[a + r] // width
            j = ys[a + r] - b * width
            _stage2(online, mixing, r, p, b, vocab, width, mm, esc, g2)
            n = enc_put(state, slot, out, n, left_of(g2, j), g2[j])
            bits += 24.0 - math.log2(g2[j])
        _learn_rows(lanes[a:z], ys[a:z], m, online, mixing, has_bias, bias, coded, rates, rate_now, count_cap,
                    bias_cap, p, totals)
    return n, bits


class MixedStream:
    """One stream's online models and adaptive bias, with the scratch rows its compiled steps reuse.

    ``lane_lengths``: the symbols each lane will hold (the decoder and the encoder both know them), which
    sizes the online models' tables once (:class:`~lmcodec.coding.online.OnlineModels`).  Its steps run in
    the calling thread: one stream's step is too short to share between threads."""

    def __init__(self, config: MixerConfig, lane_lengths: list[int], alphabet: int):
        self.width = bucket_width(alphabet)
        self.vocab = alphabet - ESCAPES
        lanes = len(lane_lengths)
        self.mixing = bool(config.orders) or config.match
        self.has_bias = config.bias
        models = config if self.mixing else MixerConfig()
        self.online = OnlineModels(models, lanes, max(1, sum(lane_lengths)) if self.mixing else 1, alphabet,
                                   list(lane_lengths) if self.mixing else None).state
        # int32: the bias stays within +-BIAS_CAP = 2^24 (a step's rows move it by at most a rate, 2^20, each
        # before the clamp), counts stop at BIAS_COUNT_CAP and rates are at most 2^20.  Half the bytes of
        # int64 for the three vocabulary-long arrays every step reads, which a model pass evicts.
        self.bias = np.zeros(self.vocab if self.has_bias else 1, np.int32)
        self.coded = np.zeros_like(self.bias)
        self.rates = _rate_array()
        self.rate_now = np.full_like(self.bias, self.rates[0])     # rates[coded], kept by learn_step
        self.exp2 = exp2_table()
        # The LM's weights are at most 2^30 (an escape's, 2^-24 of their sum, far less): int32 halves the
        # rows that the step's vocabulary passes read.
        self.p = np.empty((lanes, BUCKETS * self.width), np.int32)
        self.mass = np.empty((lanes, BUCKETS), np.int64)
        self.totals = np.empty(lanes, np.int64)
        self.mm = np.empty((lanes, BUCKETS), np.int64)
        self.esc = np.zeros(max(ESCAPES, self.width), np.int64)
        self.g1 = np.empty(BUCKETS, np.int64)
        self.g2 = np.empty(self.width, np.int64)

    def decode_pass(self, u: np.ndarray, lanes: RunningLanes, k: int, where: np.ndarray, bank,
                    symbols: tuple[np.ndarray, np.ndarray], feed: np.ndarray, widths: np.ndarray, decoded: np.ndarray,
                    vocab: int, placeholder: int, log: np.ndarray, out: np.ndarray) -> None:
        """This stream's part of a decoder pass (it is stream ``k`` of ``lanes``; its coder a row of ``bank``, a
        passes.DecoderBank): :func:`decode_stream_pass`.  Raises CorruptArchiveError for a payload that
        cannot be valid."""
        slot = int(lanes.stream[k])
        flat, base = symbols
        decode_stream_pass(u, where, k, lanes.rows, lanes.lengths, lanes.segs, lanes.step, self.online, self.mixing,
                           self.has_bias, self.bias, self.coded, self.rates, self.rate_now, BIAS_FRAC,
                           BIAS_COUNT_CAP, BIAS_CAP, self.exp2, self.p, self.mass, self.totals, self.mm, self.esc,
                           self.g1, self.g2, bank.state, slot, bank.words, flat, base, feed, widths, decoded,
                           self.vocab + ESCAPES, vocab, placeholder, lanes.ended, log, out)
        if out[STATUS] >= 0:
            raise CorruptArchiveError(f"range decoder failed: stream {slot} cannot be a valid stream")

    def encode(self, u: np.ndarray, spans: np.ndarray, lanes: np.ndarray, ys: np.ndarray, coder) -> float:
        """Code a chunk of steps (see :func:`encode_mixed`) into ``coder`` (a passes.EncoderBuffer);
        returns the exact code length in bits."""
        coder.room(2 * len(ys))
        coder.n, bits = encode_mixed(np.ascontiguousarray(u), spans, lanes, ys, self.online, self.mixing,
                                     self.has_bias, self.bias, self.coded, self.rates, self.rate_now, BIAS_FRAC,
                                     BIAS_COUNT_CAP, BIAS_CAP, self.exp2, self.p, self.mass, self.totals, self.mm,
                                     self.esc, self.g1, self.g2, coder.state, 0, coder.out, coder.n)
        return bits
