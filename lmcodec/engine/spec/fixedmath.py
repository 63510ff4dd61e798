"""The exact engine's constant tables, built by integer-only code.

Every transcendental value the engine uses -- powers of two for the softmaxes,
the logistic function for SiLU, the cosines and sines of RoPE -- comes from a
table made here with Python integers (arbitrary precision fixed point), never
from libm, numpy or torch float functions, whose last bits differ between
platforms and library versions.  The algorithms below are part of the engine's
specification: the same code gives the same table bytes on every machine, and
the tables' digest is part of the model fingerprint (see :mod:`lmcodec.engine.model.quantize`).

Fixed-point convention: an integer ``x`` at ``bits`` fractional bits stands for
``x / 2**bits``; products are rounded back with :func:`_mul`.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

import numpy as np

#: Working precision of the series (fractional bits).  The tables keep at most
#: 30 bits, so the 2^-100 series error never reaches them except at exact ties.
WORK_BITS = 100

#: Fractional bits of the base-2 exponent the softmaxes look up (1024 steps per octave).
EXP2_FRAC_BITS = 10
#: Fractional bits of the values of :func:`exp2_table` (2^30 = 1.0).
EXP2_VALUE_BITS = 30

#: SiLU's logistic table: inputs from -SIGMOID_RANGE to +SIGMOID_RANGE in steps
#: of 2^-SIGMOID_STEP_BITS, values at SIGMOID_VALUE_BITS fractional bits.
SIGMOID_RANGE = 16
SIGMOID_STEP_BITS = 10
SIGMOID_VALUE_BITS = 16

#: Fractional bits of the RoPE cosines and sines.
ROPE_BITS = 16


def _round_shift(x: int, s: int) -> int:
    """``x / 2**s`` rounded half up (floor of x/2^s + 1/2), for Python ints."""
    return (x + (1 << (s - 1))) >> s if s > 0 else x << -s


def _mul(a: int, b: int, bits: int = WORK_BITS) -> int:
    return _round_shift(a * b, bits)


def _div(a: int, b: int, bits: int = WORK_BITS) -> int:
    """``a / b`` at ``bits`` fractional bits, rounded half up (b > 0)."""
    return (2 * (a << bits) + b) // (2 * b)


@lru_cache(maxsize=None)
def ln2(bits: int = WORK_BITS) -> int:
    """ln 2 = 2 atanh(1/3) = 2 * sum 1 / ((2k+1) 3^(2k+1)), at ``bits`` fractional bits."""
    one = 1 << (bits + 8)
    total, k = 0, 0
    while True:
        term = one // ((2 * k + 1) * 3 ** (2 * k + 1))
        if not term:
            break
        total += term
        k += 1
    return _round_shift(2 * total, 8)


@lru_cache(maxsize=None)
def pi(bits: int = WORK_BITS) -> int:
    """pi = 16 atan(1/5) - 4 atan(1/239) (Machin), at ``bits`` fractional bits."""
    def atan_inv(n: int) -> int:
        one = 1 << (bits + 8)
        total, k, power = 0, 0, n
        while True:
            term = one // ((2 * k + 1) * power)
            if not term:
                return total
            total += -term if k % 2 else term
            k += 1
            power *= n * n
    return _round_shift(16 * atan_inv(5) - 4 * atan_inv(239), 8)


def exp_fixed(x: int, bits: int = WORK_BITS) -> int:
    """e^x for a fixed-point ``x`` (any sign), at ``bits`` fractional bits.

    Range reduction x = k ln2 + r with |r| <= ln2/2, then the Taylor series of e^r.
    """
    l2 = ln2(bits)
    k = (2 * x + l2) // (2 * l2)
    r = x - k * l2
    one = 1 << bits
    total, term, n = one, one, 1
    while term:
        term = _mul(term, r, bits) // n
        total += term
        n += 1
    return total << k if k >= 0 else _round_shift(total, -k)


def ln_fixed(x: Fraction, bits: int = WORK_BITS) -> int:
    """ln x for a positive rational ``x``: x = m 2^k, m in [1, 2), ln m = 2 atanh((m-1)/(m+1))."""
    if x <= 0:
        raise ValueError("ln of a non-positive number")
    k = 0
    while x >= 2:
        x /= 2
        k += 1
    while x < 1:
        x *= 2
        k -= 1
    y = Fraction(x - 1, x + 1)
    yy = y * y
    total, power, n = Fraction(0), y, 0
    limit = Fraction(1, 1 << (bits + 8))
    while power > limit:
        total += power / (2 * n + 1)
        power *= yy
        n += 1
    return k * ln2(bits) + _round_shift(int(2 * total * (1 << (bits + 8))), 8)


def cos_sin_fixed(angle: int, bits: int = WORK_BITS) -> tuple[int, int]:
    """cos and sin of a fixed-point angle (radians), reduced modulo 2 pi, by Taylor series."""
    two_pi = 2 * pi(bits)
    a = angle % two_pi
    if a > two_pi // 2:
        a -= two_pi
    one = 1 << bits
    c, s = one, a
    term_c, term_s, n = one, a, 1
    while term_c or term_s:
        term_c = -_mul(_mul(term_c, a, bits), a, bits) // ((2 * n - 1) * (2 * n))
        term_s = -_mul(_mul(term_s, a, bits), a, bits) // ((2 * n) * (2 * n + 1))
        c += term_c
        s += term_s
        n += 1
    return c, s


@lru_cache(maxsize=None)
def exp2_table() -> np.ndarray:
    """``T[f] = round(2^30 * 2^(-f/1024))`` for f in [0, 1024): int64, T[0] = 2^30.

    The softmaxes compute ``2^-u`` for a fixed-point ``u >= 0`` (10 fractional
    bits) as ``T[u mod 1024] >> (u div 1024)``.
    """
    step = 1 << EXP2_FRAC_BITS
    l2 = ln2()
    out = [_round_shift(exp_fixed(-(f * l2) // step), WORK_BITS - EXP2_VALUE_BITS) for f in range(step)]
    return np.array(out, dtype=np.int64)


@lru_cache(maxsize=None)
def log2e(bits: int) -> int:
    """log2(e) = 1 / ln 2 at ``bits`` fractional bits."""
    return _div(1 << WORK_BITS, ln2(), bits)


def log2e_over(divisor: int, bits: int) -> int:
    """round(2^bits * log2(e) / divisor), halves up (an engine constant)."""
    v = log2e(WORK_BITS)
    return ((v << bits) // divisor + (1 << (WORK_BITS - 1))) >> WORK_BITS


def att_log2e(head_dim: int, bits: int = 33) -> int:
    """round(2^bits * log2(e) / (127 * sqrt(head_dim))), halves up: attention scores ->
    base-2 exponent, with the softmax scale 1/sqrt(head_dim) and the keys' 1/127 folded in.
    (head_dim 64: round(2^30 log2(e) / 127).)"""
    w = WORK_BITS
    num = log2e(w) << bits                        # at w fractional bits
    den = 127 * isqrt_int(head_dim << (2 * w))    # 127 sqrt(hd), at w fractional bits
    return (2 * num + den) // (2 * den)


def isqrt_int(n: int) -> int:
    """floor(sqrt(n)) of a Python int (Newton's method, integer-only)."""
    if n < 0:
        raise ValueError("isqrt of a negative number")
    if n < 2:
        return n
    x = 1 << ((n.bit_length() + 1) // 2)
    while True:
        y = (x + n // x) // 2
        if y >= x:
            return x
        x = y


@lru_cache(maxsize=None)
def sigmoid_table() -> np.ndarray:
    """``S[i] = round(2^16 / (1 + e^-x))`` for x = (i - 16384) / 1024, i in [0, 32768]: int64.

    Built from ``e^-(k/1024)`` by repeated multiplication with ``e^-(1/1024)``
    at 100 fractional bits (the product's error stays far below the table's 2^-16).
    """
    n = SIGMOID_RANGE << SIGMOID_STEP_BITS
    one = 1 << WORK_BITS
    step = exp_fixed(-(one >> SIGMOID_STEP_BITS))
    e = one
    pos = []  # round(2^16 / (1 + e^-x)) for x = k/1024, k = 0..n
    for _ in range(n + 1):
        pos.append(_div(1 << SIGMOID_VALUE_BITS, one + e, WORK_BITS))
        e = _mul(e, step)
    full = 1 << SIGMOID_VALUE_BITS
    neg = [full - v for v in reversed(pos[1:])]  # sigmoid(-x) = 1 - sigmoid(x)
    return np.array(neg + pos, dtype=np.int64)


@lru_cache(maxsize=None)
def _rope_base(rope_theta: Fraction, half: int) -> list[int]:
    """Angular frequencies theta_i = base^(-i/half) at WORK_BITS, i in [0, half)."""
    ln_base = ln_fixed(rope_theta)
    return [exp_fixed(-(i * ln_base) // half) for i in range(half)]


ROPE_BLOCK = 64


@lru_cache(maxsize=None)
def rope_offsets(rope_theta: Fraction, head_dim: int) -> np.ndarray:
    """cos and sin of ``b * theta_i`` for b in [0, ROPE_BLOCK) at 30 fractional bits: [2, ROPE_BLOCK, hd/2]."""
    out = np.empty((2, ROPE_BLOCK, head_dim // 2), dtype=np.int64)
    for i, th in enumerate(_rope_base(rope_theta, head_dim // 2)):
        for b in range(ROPE_BLOCK):
            c, s = cos_sin_fixed(b * th)
            out[0, b, i], out[1, b, i] = _round_shift(c, WORK_BITS - 30), _round_shift(s, WORK_BITS - 30)
    return out


@lru_cache(maxsize=16)
def rope_block_starts(rope_theta: Fraction, head_dim: int, first: int, n: int) -> np.ndarray:
    """cos and sin of ``64 a * theta_i`` for blocks a in [first, first + n) at 30 fractional bits:
    [2, n, hd/2] (a position ``64 a + b`` combines its block's row with offset b's)."""
    out = np.empty((2, n, head_dim // 2), dtype=np.int64)
    for i, th in enumerate(_rope_base(rope_theta, head_dim // 2)):
        for a in range(n):
            c, s = cos_sin_fixed((first + a) * ROPE_BLOCK * th)
            out[0, a, i], out[1, a, i] = _round_shift(c, WORK_BITS - 30), _round_shift(s, WORK_BITS - 30)
    return out


def rope_combine(ca, sa, cb, sb):
    """cos/sin of (A + B) from those of A and B at 30 bits, rounded to ROPE_BITS (int64
    numpy arrays or tensors alike: |products| < 2^61)."""
    shift = 60 - ROPE_BITS
    half_ulp = 1 << (shift - 1)
    return (ca * cb - sa * sb + half_ulp) >> shift, (sa * cb + ca * sb + half_ulp) >> shift


@lru_cache(maxsize=8)
def rope_tables(rope_theta: Fraction, head_dim: int, positions: int,
                start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of ``p * theta_i`` at 16 fractional bits for p in [start, start + positions):
    [positions, head_dim/2] int64.

    Exact series give cos/sin of ``b * theta_i`` (b < 64) and of ``64 a * theta_i``
    at 30 fractional bits; a position ``64 a + b`` combines them by the angle-sum
    formula in int64 and rounds to 16 bits.  Integer-only, so every machine
    builds the same table, and a position's row does not depend on ``start``
    (long segments take their table in ranges instead of all from 0; the engine
    combines the two tables on its device, row by row: Engine._rope_tables).
    """
    a0 = start // ROPE_BLOCK
    n_hi = -(-(start + positions) // ROPE_BLOCK) - a0
    lo = rope_offsets(rope_theta, head_dim)
    hi = rope_block_starts(rope_theta, head_dim, a0, n_hi)
    p = np.arange(start, start + positions)
    ca, sa = hi[0, p // ROPE_BLOCK - a0], hi[1, p // ROPE_BLOCK - a0]
    cb, sb = lo[0, p % ROPE_BLOCK], lo[1, p % ROPE_BLOCK]
    return rope_combine(ca, sa, cb, sb)


#: GELU's (tanh form) gate: the same grid and value bits as the logistic table.
GELU_C = Fraction(44715, 1000000)


@lru_cache(maxsize=None)
def gelu_gate_table() -> np.ndarray:
    """``P[i] = round(2^16 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2)`` for x = (i - 16384) / 1024,
    i in [0, 32768]: int64.  GELU (tanh form) is ``x * P(x)``, as SiLU is ``x * sigmoid(x)``.

    ``(1 + tanh u) / 2 = 1 / (1 + e^(-2u))``; u is odd in x, so ``P(-x) = 2^16 - P(x)``.
    sqrt(2/pi) and u at 100 fractional bits (integer square root of ``2^(2w+1) / pi``).
    """
    n = SIGMOID_RANGE << SIGMOID_STEP_BITS
    w = WORK_BITS
    one = 1 << w
    k = isqrt_int((2 << (2 * w)) * one // pi(w))     # sqrt(2/pi) at w fractional bits
    pos = []
    for j in range(n + 1):
        x = Fraction(j, 1 << SIGMOID_STEP_BITS)
        inner = x + GELU_C * x * x * x                  # exact rational
        u2 = 2 * k * inner.numerator // inner.denominator  # 2u at w fractional bits (floor)
        pos.append(_div(1 << SIGMOID_VALUE_BITS, one + exp_fixed(-u2), w))
    full = 1 << SIGMOID_VALUE_BITS
    neg = [full - v for v in reversed(pos[1:])]
    return np.array(neg + pos, dtype=np.int64)
