"""The LM's symbol weights and the two coding tables as numba functions on one row: the integers of
:class:`~lmcodec.coding.frequencies.CodingTables` and :meth:`~lmcodec.coding.mixing.StreamMixer.lm_weights`,
without a tensor per step.

Why here and not as tensor operations: the decoder codes one token per row per pass, and a
tensor operation per row costs more in dispatch than the arithmetic (472 us for one row's
tables through torch against a few us here).  These functions are called from the compiled
passes (:mod:`lmcodec.coding.passes`), which also drive the range coder, so a pass crosses
from Python into compiled code once.

Every formula is the one docs/ENGINE.md and ``frequencies.py`` write down, in the same order
of floors; ``tests/test_passes.py`` checks the rows equal CodingTables' and the archives equal
the tensor path's.
"""

from __future__ import annotations

import numpy as np

from ..engine.cpu.jit import JIT, njit, prange
from ..engine.spec.constants import BUCKET_FLOOR, BUCKETS, ESCAPES, OUT_U_CAP, TOTAL
from .gather import LANES, weights8, weights8_biased


@njit(inline="always", **JIT)
def weight_of(e, exp2):  # pragma: no cover - compiled
    """A token's weight from its gap ``e`` (>= 0): ``exp2[e & 1023] >> (e >> 10)``."""
    return exp2[e & 1023] >> (e >> 10)


@njit(inline="always", **JIT)
def token_weights(u, bias, has_bias, frac, exp2, width, p, mass):  # pragma: no cover - compiled
    """One row's symbol weights ``p`` [256 width] and bucket masses ``mass`` [256] from its gaps ``u`` [V];
    returns the tokens' total (what the escapes, the mixer and the bias read).

    Tokens: ``exp2[e & 1023] >> (e >> 10)`` of the gap e (with the bias: ``u - (bias >> frac)``, shifted
    so the best token has 0, capped at OUT_U_CAP); the 256 escapes: ``max(1, total >> 24)``; padding 0.
    A bucket's mass is the sum of its symbols' weights, summed where they are made.
    """
    vocab = u.shape[0]
    whole = vocab - vocab % LANES
    # The weights 8 at a time (gather.py: a loop here reads the table one token at a time), then the
    # bucket sums as loops of one fixed length (a bound that depends on the vocabulary is not vectorised).
    if has_bias:
        low = np.int64(1) << 62
        for v in range(vocab):
            g = u[v] - (bias[v] >> frac)
            if g < low:
                low = g
        for v in range(0, whole, LANES):
            weights8_biased(u, bias, frac, low, exp2, p, v)
        for v in range(whole, vocab):
            p[v] = weight_of(min(u[v] - (bias[v] >> frac) - low, OUT_U_CAP), exp2)
    else:
        for v in range(0, whole, LANES):
            weights8(u, bias, frac, 0, exp2, p, v)
        for v in range(whole, vocab):
            p[v] = weight_of(u[v], exp2)
    for v in range(vocab, p.shape[0]):
        p[v] = 0
    total = bucket_sums(p, width, mass)
    esc = max(total >> 24, np.int64(1))
    for v in range(vocab, vocab + ESCAPES):
        p[v] = esc
        mass[v // width] += esc
    return total


@njit(inline="always", **JIT)
def bucket_sums(p, width, mass):  # pragma: no cover - compiled
    """mass [256] <- the sums of ``p`` [256 width]'s buckets; returns their total."""
    total = np.int64(0)
    for b in range(BUCKETS):
        lo = b * width
        m = np.int64(0)
        for j in range(width):
            m += p[lo + j]
        mass[b] = m
        total += m
    return total


@njit(parallel=True, **JIT)
def weights_rows(u, at, exp2, width, p, mass, totals):  # pragma: no cover - compiled
    """:func:`token_weights` of rows ``u[at]`` (``u`` [*, V]; no bias), rows side by side."""
    no_bias = np.zeros(1, np.int64)
    for i in prange(at.shape[0]):
        totals[i] = token_weights(u[at[i]], no_bias, False, 0, exp2, width, p[i], mass[i])


@njit(parallel=True, **JIT)
def masses_rows(u, exp2, width, mass, totals):  # pragma: no cover - compiled
    """The bucket masses ``mass`` [n, 256] and token totals ``totals`` [n] of every row of ``u`` [n, V] (no
    bias), rows side by side, without keeping the weights: :func:`token_weights`' sums, and stage 2
    remakes the one bucket it needs (:func:`bucket_weights`)."""
    vocab = u.shape[1]
    for i in prange(u.shape[0]):
        row = u[i]
        total = np.int64(0)
        # Whole buckets as loops of one fixed length (vectorised, the table read by gathers: 24 us a
        # row of SmolLM2's alphabet against 66 us with the vocabulary in the bound); then the rest.
        for b in range(BUCKETS):
            lo = b * width
            m = np.int64(0)
            if lo + width <= vocab:
                for j in range(width):
                    m += weight_of(row[lo + j], exp2)
            else:
                for v in range(lo, min(lo + width, vocab)):
                    m += weight_of(row[v], exp2)
            mass[i, b] = m
            total += m
        esc = max(total >> 24, np.int64(1))
        for v in range(vocab, vocab + ESCAPES):
            mass[i, v // width] += esc
        totals[i] = total


@njit(inline="always", **JIT)
def bucket_weights(u, b, width, total, exp2, out):  # pragma: no cover - compiled
    """Bucket ``b``'s ``width`` symbol weights into ``out``, :func:`token_weights`' entries
    ``p[b width:(b + 1) width]`` (no bias) remade from the row's gaps ``u`` [V] and token ``total``."""
    vocab = u.shape[0]
    esc = max(total >> 24, np.int64(1))
    for j in range(width):
        v = b * width + j
        if v < vocab:
            out[j] = weight_of(u[v], exp2)
        elif v < vocab + ESCAPES:
            out[j] = esc
        else:
            out[j] = 0


@njit(inline="always", **JIT)
def bitlen(n):  # pragma: no cover - compiled
    """``n.bit_length()`` of an int64 n >= 0 (stage 1's shift reads the width's)."""
    b = np.int64(0)
    while n:
        b += 1
        n >>= 1
    return b


@njit(inline="always", **JIT)
def stage1(mass, width_bits, g):  # pragma: no cover - compiled
    """Bucket frequencies ``g`` [256] from bucket masses (CodingTables' stage 1):
    m' = m >> max(0, bitlen(width) - 8); g = 256 + floor(m' (2^24 - 2^16) / sum m'), the rest to
    the largest m' (the first on ties)."""
    pre = max(0, width_bits - 8)
    s = np.int64(0)
    top = 0
    best = np.int64(-1)
    for b in range(BUCKETS):
        m = mass[b] >> pre
        s += m
        if m > best:
            best = m
            top = b
    s = max(s, np.int64(1))
    free = TOTAL - BUCKETS * BUCKET_FLOOR
    used = np.int64(0)
    for b in range(BUCKETS):
        x = BUCKET_FLOOR + (mass[b] >> pre) * free // s
        g[b] = x
        used += x
    g[top] += TOTAL - used


@njit(inline="always", **JIT)
def stage2(p, lo, width, m_b, g):  # pragma: no cover - compiled
    """Within-bucket frequencies ``g`` [width] of the bucket whose symbols are ``p[lo:lo + width]`` and whose
    mass is ``m_b`` (CodingTables' stage 2): 1 + floor(p_j (2^24 - width) / m_b), the rest to the largest
    p_j (the first on ties)."""
    m = max(m_b, np.int64(1))
    free = TOTAL - width
    used = np.int64(0)
    top = 0
    best = np.int64(-1)
    for j in range(width):
        x = p[lo + j]
        if x > best:
            best = x
            top = j
        y = 1 + x * free // m
        g[j] = y
        used += y
    g[top] += TOTAL - used


@njit(inline="always", **JIT)
def find(g, k, q):  # pragma: no cover - compiled
    """The symbol i of frequencies ``g[:k]`` whose range [left, left + g_i) holds ``q``, and its left."""
    left = np.int64(0)
    for i in range(k - 1):
        if q < left + g[i]:
            return i, left
        left += g[i]
    return k - 1, left


@njit(inline="always", **JIT)
def left_of(g, i):  # pragma: no cover - compiled
    """The cumulative frequency below symbol ``i``."""
    left = np.int64(0)
    for j in range(i):
        left += g[j]
    return left
