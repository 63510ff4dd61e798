"""The exact engine's integer steps as Triton kernels (the CUDA path).

Same functions, same integers as :mod:`lmcodec.ops_torch` (the tensor-operation
spelling of docs/ENGINE.md) and :mod:`lmcodec.ops_cpu` (numba): the engine
calls exactly ``split norm operand residual_add qkv mlp attend gaps`` through
``Engine.ops``, and ``engine._backend("cuda")`` returns this module.  Each
``@triton.jit`` kernel sits directly above its launcher; a launcher checks
shapes and spec limits, allocates its outputs and launches, nothing more.

Why the results are exact: every value is an int64 (or an int32 that provably
stays below 2^31); ``>>`` on a signed integer is the arithmetic shift the spec
means; shift counts are kept in [0, 62] where a larger count would give the
same value (the GPU's shifts are undefined past the width); the one division
with a negative numerator is floored explicitly (Triton's ``//`` truncates);
products are ``tl.dot`` on int8 with int32 sums, which are exact; and a tile
size only changes the order of exact sums and maxima, never their value
(``tests/test_ops_triton.py`` runs two tile configurations against ops_torch).

Import this module only where the Triton backend is used: it imports triton,
which CPU-only installs need not have.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import fixedmath
from .spec import (ACT_FRAC, ACT_MAX, ATT_D_CAP, ATT_P_SHIFT, ATT_PRESHIFT, ATT_SHIFT, ATT_U_CAP, KV_MAX,
                   LOG2E_OUT, MAX_HEAD_DIM, MAX_KEYS, MLP_LIMIT, OUT_D_CAP, OUT_PRE_LIMIT, OUT_U_CAP, Q_MAX,
                   QKV_LIMIT, RESID_FRAC, RESID_LIMIT, RSQRT_BITS)


@dataclass(frozen=True)
class Blocks:
    """Tile sizes (speed only: no integer result depends on them; the tests swap in a second set).

    ``cols``: elements of a row one step of a row kernel handles (norm, operand,
    residual_add, mlp, gaps, split); 1,024 int64 = 8 KB per tile, and a 576-wide
    residual row (SmolLM2) is one tile.  ``keys``: cache slots per attention
    tile; 64 keys x 64 dims of int8 = 4 KB of K and of V per tile, and it is the
    PV product's reduction dimension, which NVIDIA's int8 MMA needs >= 32.
    """

    cols: int = 1024
    keys: int = 64


BLOCKS = Blocks()

#: Query heads per attention program, padded: NVIDIA's MMA needs M >= 16 rows
#: (SmolLM2 fills 3 of them: 9 query heads over 3 KV heads).
MIN_DOT = 16
#: Smallest int8 dot reduction the NVIDIA compiler accepts (the interpreter takes less).
MIN_DOT_K = 32

# Spec constants as constexprs (a jit function reads only constexpr globals).
_ACT_FRAC = tl.constexpr(ACT_FRAC)
_ACT_MAX = tl.constexpr(ACT_MAX)
_Q_MAX = tl.constexpr(Q_MAX)
_QKV_LIMIT = tl.constexpr(QKV_LIMIT)
_MLP_LIMIT = tl.constexpr(MLP_LIMIT)
_RESID_FRAC = tl.constexpr(RESID_FRAC)
_RESID_LIMIT = tl.constexpr(RESID_LIMIT)
_RSQRT_BITS = tl.constexpr(RSQRT_BITS)
_KV_MAX = tl.constexpr(KV_MAX)
_ATT_PRESHIFT = tl.constexpr(ATT_PRESHIFT)
_ATT_SHIFT = tl.constexpr(ATT_SHIFT)
_ATT_D_CAP = tl.constexpr(ATT_D_CAP)
_ATT_U_CAP = tl.constexpr(ATT_U_CAP)
_ATT_P_SHIFT = tl.constexpr(ATT_P_SHIFT)
_LOG2E_OUT = tl.constexpr(LOG2E_OUT)
_OUT_D_CAP = tl.constexpr(OUT_D_CAP)
_OUT_U_CAP = tl.constexpr(OUT_U_CAP)
_OUT_PRE_LIMIT = tl.constexpr(OUT_PRE_LIMIT)
_ROPE_BITS = tl.constexpr(fixedmath.ROPE_BITS)
_ROPE_HALF = tl.constexpr(1 << (fixedmath.ROPE_BITS - 1))       # rshift's rounding term at a constant shift
_SIG_SPAN = tl.constexpr(fixedmath.SIGMOID_RANGE << fixedmath.SIGMOID_STEP_BITS)
_SIG_SHIFT = tl.constexpr(ACT_FRAC - fixedmath.SIGMOID_STEP_BITS)
_SIG_SHIFT_HALF = tl.constexpr(1 << (ACT_FRAC - fixedmath.SIGMOID_STEP_BITS - 1))
_SIG_BITS = tl.constexpr(fixedmath.SIGMOID_VALUE_BITS)
_SIG_BITS_HALF = tl.constexpr(1 << (fixedmath.SIGMOID_VALUE_BITS - 1))
#: The largest shift count a kernel uses: every |value| shifted right is below 2^62,
#: so any larger count gives the same result, and 63+ is undefined on a GPU.
_MAX_SHIFT = tl.constexpr(62)
#: Below every score z (|z| < 2^55): the maximum over an empty set of keys.
_NO_KEY = tl.constexpr(-(1 << 62))
#: w = sum_k 256^k (byte_k - 128) + _W_OFFSET for 0 <= w < 2^40 (five bytes).
_W_OFFSET = tl.constexpr(128 * ((1 << 40) - 1) // 255)


# -- integer helpers (docs/ENGINE.md, Notation) ------------------------------------------------
@triton.jit
def _rshift(x, s):
    """x / 2^s rounded half up, for int64 x and 0 <= s <= 62."""
    return (x + ((1 << s) >> 1)) >> s


@triton.jit
def _bitlen(m):
    """Bits of int64 m in [0, 2^63) (0 for 0): a binary search, six constant shifts."""
    n = m * 0
    for k in tl.static_range(5, -1, -1):
        t = m >> (1 << k)
        big = t != 0
        m = tl.where(big, t, m)
        n += tl.where(big, 1 << k, 0)
    return n + (m != 0).to(tl.int64)


@triton.jit
def _fit(m, limit):
    """Least s >= 0 with rshift(m, s) <= limit, for 0 <= m < 2^62 and limit >= 2^14."""
    s = tl.maximum(_bitlen(m) - 15, 0)
    return s + (_rshift(m, s) > limit).to(tl.int64)


@triton.jit
def _floor_div(n, d):
    """floor(n / d) for d > 0 (Triton's // truncates toward zero)."""
    return tl.where(n >= 0, n // d, -((d - 1 - n) // d))   # both numerators >= 0


@triton.jit
def _requant(y, mult, c):
    """rshift(y * mult, c) for c >= 0, else clamp(y * mult, +-2^40) << min(-c, 20) (|y * mult| < 2^58)."""
    p = y * mult
    right = _rshift(p, tl.minimum(tl.maximum(c, 0), _MAX_SHIFT))
    left = tl.minimum(tl.maximum(p, -(1 << 40)), 1 << 40) << tl.minimum(tl.maximum(-c, 0), 20)
    return tl.where(c >= 0, right, left)


@triton.jit
def _combine(y_ptr, n_rows, n_cols, row, cols, mask):
    """256 * y[row] + y[n_rows + row] at ``cols`` as int64 (int_mm's [hi rows; lo rows])."""
    hi = tl.load(y_ptr + row * n_cols + cols, mask=mask, other=0).to(tl.int64)
    lo = tl.load(y_ptr + (n_rows + row) * n_cols + cols, mask=mask, other=0).to(tl.int64)
    return (hi << 8) + lo


# -- split ---------------------------------------------------------------------------------
@triton.jit
def _split_kernel(h_ptr, out_ptr, n_rows, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    v = tl.load(h_ptr + row * n_cols + cols, mask=mask, other=0).to(tl.int32)
    hi = (v + 128) >> 8
    tl.store(out_ptr + row * n_cols + cols, hi.to(tl.int8), mask=mask)
    tl.store(out_ptr + (n_rows + row) * n_cols + cols, (v - (hi << 8)).to(tl.int8), mask=mask)


def split(h16: torch.Tensor) -> torch.Tensor:
    """int16 operand rows (|v| <= 32639) -> [hi rows; lo rows] int8 with v = 256 hi + lo."""
    _expect(h16, torch.int16, 2)
    h16 = h16.contiguous()
    m, k = h16.shape
    out = torch.empty((2 * m, k), dtype=torch.int8, device=h16.device)
    if m:
        _split_kernel[(m, triton.cdiv(k, BLOCKS.cols))](h16, out, m, k, BLOCK=BLOCKS.cols)
    return out


# -- norm ----------------------------------------------------------------------------------
@triton.jit
def _norm_kernel(x_ptr, gain_ptr, eps_ptr, out_ptr, exp_ptr, n_cols, gain_shift, BLOCK: tl.constexpr):
    """RMSNorm of one residual row (docs/ENGINE.md): four passes over the row, each exact."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * n_cols
    m = tl.full((), 0, tl.int64)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.max(tl.abs(tl.load(base + cols, mask=cols < n_cols, other=0))))
    s = tl.maximum(_bitlen(m) - 15, 0)                       # |x| <= 2^40: s <= 26
    ss = tl.full((), 0, tl.int64)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        xs = _rshift(tl.load(base + cols, mask=cols < n_cols, other=0), s)
        ss += tl.sum(xs * xs)                                # |xs| <= 2^15: < 2^30 per entry
    d = tl.maximum(ss + n_cols * tl.load(eps_ptr + s), 1)
    n = (n_cols.to(tl.int64) << (2 * _RSQRT_BITS)) // d     # both positive: // is the floor
    # isqrt(n), n < 2^60: an IEEE float64 square root (within 1 of the root), one integer
    # Newton step (in case the device's root were less precise), then exact corrections.
    r = tl.sqrt(n.to(tl.float64)).to(tl.int64)
    r = tl.maximum(r, 1)
    r = (r + n // r) >> 1
    for _ in tl.static_range(2):
        r = tl.where(r * r > n, r - 1, r)
        r = tl.where((r + 1) * (r + 1) <= n, r + 1, r)
    mt = tl.full((), 0, tl.int64)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        t = _rshift(tl.load(base + cols, mask=mask, other=0), s) * tl.load(gain_ptr + cols, mask=mask, other=0) * r
        mt = tl.maximum(mt, tl.max(tl.abs(t)))               # < 2^47
    s2 = _fit(mt, _ACT_MAX)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        t = _rshift(tl.load(base + cols, mask=mask, other=0), s) * tl.load(gain_ptr + cols, mask=mask, other=0) * r
        tl.store(out_ptr + row * n_cols + cols, _rshift(t, s2).to(tl.int16), mask=mask)
    tl.store(exp_ptr + row, s2 - _RSQRT_BITS - gain_shift)


def norm(x: torch.Tensor, gain: torch.Tensor, gain_shift: int, eps: torch.Tensor):
    """RMSNorm of residual rows -> (int16 operand rows, exponent per row [M, 1])."""
    _expect(x, torch.int64, 2)
    _expect(gain, torch.int64, 1, x.shape[1])
    _expect(eps, torch.int64, 1, 64)    # EPS[s] for s in [0, 64); s <= 26 here
    x = x.contiguous()
    m, k = x.shape
    out = torch.empty((m, k), dtype=torch.int16, device=x.device)
    exp = torch.empty((m, 1), dtype=torch.int64, device=x.device)
    if m:
        _norm_kernel[(m,)](x, gain.contiguous(), eps.contiguous(), out, exp, k, gain_shift, BLOCK=BLOCKS.cols)
    return out, exp


# -- operand -------------------------------------------------------------------------------
@triton.jit
def _operand_kernel(x_ptr, out_ptr, shift_ptr, n_cols, limit, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * n_cols
    m = tl.full((), 0, tl.int64)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.max(tl.abs(tl.load(base + cols, mask=cols < n_cols, other=0))))
    s = _fit(m, limit)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        tl.store(out_ptr + row * n_cols + cols, _rshift(tl.load(base + cols, mask=mask, other=0), s).to(tl.int16),
                 mask=mask)
    tl.store(shift_ptr + row, s)


def operand(x: torch.Tensor, limit: int = ACT_MAX):
    """int64 rows (|v| < 2^62) -> (int16 rows, shift [..., 1]): the least power-of-two shift that fits ``limit``."""
    _expect(x, torch.int64)
    if not (1 << 14) <= limit <= Q_MAX:
        raise ValueError(f"operand limit {limit} outside [2^14, {Q_MAX}]")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    m, k = x2.shape
    out = torch.empty((m, k), dtype=torch.int16, device=x.device)
    shift = torch.empty((m, 1), dtype=torch.int64, device=x.device)
    if m:
        _operand_kernel[(m,)](x2, out, shift, k, limit, BLOCK=BLOCKS.cols)
    return out.view(shape), shift.view(*shape[:-1], 1)


# -- residual_add ----------------------------------------------------------------------------
@triton.jit
def _residual_add_kernel(x_ptr, y_ptr, mult_ptr, exp_ptr, n_rows, n_cols, shift, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    c = shift - tl.load(exp_ptr + row) - _RESID_FRAC
    v = _requant(_combine(y_ptr, n_rows, n_cols, row, cols, mask), tl.load(mult_ptr + cols, mask=mask, other=0), c)
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0)
    tl.store(x_ptr + row * n_cols + cols, tl.minimum(tl.maximum(x + v, -_RESID_LIMIT), _RESID_LIMIT), mask=mask)


def residual_add(x: torch.Tensor, y: torch.Tensor, mult: torch.Tensor, shift: int, exp: torch.Tensor) -> None:
    """x += the product y (int32 [hi rows; lo rows]) at 16 fractional bits, clamped to +-2^40 (in place)."""
    _expect(x, torch.int64, 2)
    m, n = x.shape
    _expect(y, torch.int32, 2, 2 * m, n)
    _expect(mult, torch.int64, 1, n)
    _expect(exp, torch.int64, 2, m, 1)
    if not x.is_contiguous():
        raise ValueError("residual_add updates x in place: x must be contiguous")
    if m:
        _residual_add_kernel[(m, triton.cdiv(n, BLOCKS.cols))](x, y.contiguous(), mult.contiguous(),
                                                               exp.contiguous(), m, n, shift, BLOCK=BLOCKS.cols)


# -- qkv -----------------------------------------------------------------------------------
@triton.jit
def _qkv_kernel(y_ptr, mult_ptr, bias_ptr, exp_ptr, cos_ptr, sin_ptr, slots_ptr, kt_ptr, kmax_ptr, vc_ptr,
                vmax_ptr, q_ptr, qe_ptr, n_rows, n_t, shift, nh, nkv, hd,
                skt_r, skt_h, skt_d, skm_r, skm_h, svc_r, svc_h, svc_s, svm_r, svm_h,
                HAS_BIAS: tl.constexpr, HEADS: tl.constexpr, HALF: tl.constexpr):
    """Every head vector of one row, a head per tile row (first halves | second halves):
    requantize, bias, clamp; RoPE (q, k); the int16 queries and the int8 cache write."""
    row = tl.program_id(0).to(tl.int64)
    hh = tl.arange(0, HEADS)[:, None]                        # q heads, then k heads, then v heads
    d = tl.arange(0, HALF)[None, :]
    half = hd // 2
    n_cols = (nh + 2 * nkv) * hd
    mask = (hh < nh + 2 * nkv) & (d < half)
    c = shift - tl.load(exp_ptr + row) - _ACT_FRAC
    col1 = hh * hd + d
    col2 = col1 + half
    x1 = _requant(_combine(y_ptr, n_rows, n_cols, row, col1, mask), tl.load(mult_ptr + col1, mask=mask, other=0), c)
    x2 = _requant(_combine(y_ptr, n_rows, n_cols, row, col2, mask), tl.load(mult_ptr + col2, mask=mask, other=0), c)
    if HAS_BIAS:
        x1 += tl.load(bias_ptr + col1, mask=mask, other=0)
        x2 += tl.load(bias_ptr + col2, mask=mask, other=0)
    x1 = tl.minimum(tl.maximum(x1, -_QKV_LIMIT), _QKV_LIMIT)
    x2 = tl.minimum(tl.maximum(x2, -_QKV_LIMIT), _QKV_LIMIT)
    t = row % n_t
    b = row // n_t
    cs = tl.load(cos_ptr + t * half + d, mask=d < half, other=0)
    sn = tl.load(sin_ptr + t * half + d, mask=d < half, other=0)
    roped = hh < nh + nkv                                    # RoPE on q and k heads at the row's position
    r1 = tl.where(roped, tl.minimum(tl.maximum((x1 * cs - x2 * sn + _ROPE_HALF) >> _ROPE_BITS, -_QKV_LIMIT),
                                    _QKV_LIMIT), x1)
    r2 = tl.where(roped, tl.minimum(tl.maximum((x2 * cs + x1 * sn + _ROPE_HALF) >> _ROPE_BITS, -_QKV_LIMIT),
                                    _QKV_LIMIT), x2)
    mx = tl.maximum(tl.max(tl.abs(r1), axis=1), tl.max(tl.abs(r2), axis=1))[:, None]
    # Queries: int16 with an exponent per head.
    s = _fit(mx, _Q_MAX)
    is_q = hh < nh
    q_at = q_ptr + (row * nh + hh) * hd + d
    tl.store(q_at, _rshift(r1, s).to(tl.int16), mask=mask & is_q)
    tl.store(q_at + half, _rshift(r2, s).to(tl.int16), mask=mask & is_q)
    tl.store(qe_ptr + row * nh + hh, s, mask=is_q)
    # Keys and values: int8 = floor((254 v + M) / 2M) with M = max(max|v|, 1), and max|v|.
    safe = tl.maximum(mx, 1)
    v1 = _floor_div(r1 * (2 * _KV_MAX) + safe, 2 * safe).to(tl.int8)
    v2 = _floor_div(r2 * (2 * _KV_MAX) + safe, 2 * safe).to(tl.int8)
    slot = tl.load(slots_ptr + t)
    is_k = (hh >= nh) & roped
    k_at = kt_ptr + b * skt_r + (hh - nh) * skt_h + slot
    tl.store(k_at + d * skt_d, v1, mask=mask & is_k)
    tl.store(k_at + (half + d) * skt_d, v2, mask=mask & is_k)
    tl.store(kmax_ptr + b * skm_r + (hh - nh) * skm_h + slot, mx.to(tl.int32), mask=is_k)
    is_v = (hh >= nh + nkv) & (hh < nh + 2 * nkv)
    v_at = vc_ptr + b * svc_r + (hh - nh - nkv) * svc_h + slot * svc_s + d
    tl.store(v_at, v1, mask=mask & is_v)
    tl.store(v_at + half, v2, mask=mask & is_v)
    tl.store(vmax_ptr + b * svm_r + (hh - nh - nkv) * svm_h + slot, mx.to(tl.int32), mask=is_v)


def qkv(y, mult, shift, bias, exp, cos, sin, B, T, nh, nkv, hd, kt, kmax, vc, vmax, slots):
    """q/k/v from the qkv product: RoPE, the int8 cache write at ``slots`` [T], the int16 queries."""
    m, n = B * T, (nh + 2 * nkv) * hd
    _expect(y, torch.int32, 2, 2 * m, n)
    _expect(mult, torch.int64, 1, n)
    if bias is not None:
        _expect(bias, torch.int64, 1, n)
    _expect(exp, torch.int64, 2, m, 1)
    _expect(cos, torch.int64, 2, T, hd // 2)
    _expect(sin, torch.int64, 2, T, hd // 2)
    _expect(slots, torch.int64, 1, T)
    _check_cache(kt, kmax, vc, vmax, nkv, hd)
    if kt.shape[0] < B or nh % nkv or hd % 2 or hd > MAX_HEAD_DIM:
        raise ValueError(f"qkv: {B} rows into a cache of {kt.shape[0]}, {nh} heads over {nkv}, head dim {hd}")
    q16 = torch.empty((m, nh, hd), dtype=torch.int16, device=y.device)
    qe = torch.empty((m, nh), dtype=torch.int64, device=y.device)
    if m:
        _qkv_kernel[(m,)](
            y.contiguous(), mult.contiguous(), mult if bias is None else bias.contiguous(), exp.contiguous(),
            cos.contiguous(), sin.contiguous(), slots.contiguous(), kt, kmax, vc, vmax, q16, qe, m, T, shift,
            nh, nkv, hd, kt.stride(0), kt.stride(1), kt.stride(2), kmax.stride(0), kmax.stride(1),
            vc.stride(0), vc.stride(1), vc.stride(2), vmax.stride(0), vmax.stride(1),
            HAS_BIAS=bias is not None, HEADS=triton.next_power_of_2(nh + 2 * nkv), HALF=triton.next_power_of_2(hd // 2))
    return q16, qe


# -- mlp -----------------------------------------------------------------------------------
@triton.jit
def _swiglu(y_ptr, mult_ptr, sig_ptr, n_rows, inter, row, cols, mask, c):
    """SiLU(gate) * up at 32 fractional bits (< 2^52) for ``cols`` of one row."""
    g = _requant(_combine(y_ptr, n_rows, 2 * inter, row, cols, mask), tl.load(mult_ptr + cols, mask=mask, other=0), c)
    u = _requant(_combine(y_ptr, n_rows, 2 * inter, row, inter + cols, mask),
                 tl.load(mult_ptr + inter + cols, mask=mask, other=0), c)
    g = tl.minimum(tl.maximum(g, -_MLP_LIMIT), _MLP_LIMIT)
    u = tl.minimum(tl.maximum(u, -_MLP_LIMIT), _MLP_LIMIT)
    idx = tl.minimum(tl.maximum((g + _SIG_SHIFT_HALF) >> _SIG_SHIFT, -_SIG_SPAN), _SIG_SPAN)
    silu = (g * tl.load(sig_ptr + idx + _SIG_SPAN, mask=mask, other=0) + _SIG_BITS_HALF) >> _SIG_BITS
    return silu * u


@triton.jit
def _mlp_kernel(y_ptr, mult_ptr, exp_ptr, sig_ptr, out_ptr, shift_ptr, n_rows, inter, shift, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = shift - tl.load(exp_ptr + row) - _ACT_FRAC
    m = tl.full((), 0, tl.int64)
    for c0 in range(0, inter, BLOCK):                        # pass 1: the row's max |a|
        cols = c0 + tl.arange(0, BLOCK)
        a = _swiglu(y_ptr, mult_ptr, sig_ptr, n_rows, inter, row, cols, cols < inter, c)
        m = tl.maximum(m, tl.max(tl.abs(a)))
    s = _fit(m, _ACT_MAX)
    for c0 in range(0, inter, BLOCK):                        # pass 2: recompute (cheaper than a buffer), write
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < inter
        a = _swiglu(y_ptr, mult_ptr, sig_ptr, n_rows, inter, row, cols, mask, c)
        tl.store(out_ptr + row * inter + cols, _rshift(a, s).to(tl.int16), mask=mask)
    tl.store(shift_ptr + row, s)


def mlp(y, mult, shift, exp, sigmoid):
    """gate/up product -> SiLU(gate) * up as an int16 operand (exponent at 32 fractional bits)."""
    _expect(exp, torch.int64, 2)
    m = exp.shape[0]
    _expect(y, torch.int32, 2, 2 * m)
    inter = y.shape[1] // 2
    _expect(mult, torch.int64, 1, 2 * inter)
    _expect(sigmoid, torch.int64, 1, 2 * (fixedmath.SIGMOID_RANGE << fixedmath.SIGMOID_STEP_BITS) + 1)
    out = torch.empty((m, inter), dtype=torch.int16, device=y.device)
    oshift = torch.empty((m, 1), dtype=torch.int64, device=y.device)
    if m:
        _mlp_kernel[(m,)](y.contiguous(), mult.contiguous(), exp.contiguous(), sigmoid.contiguous(), out, oshift,
                          m, inter, shift, BLOCK=BLOCKS.cols)
    return out, oshift


# -- attend --------------------------------------------------------------------------------
@triton.jit
def _scores(q_hi, q_lo, k_base, km_base, skd, j0, lo, hi, hd, HD_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """z = (q16 . k8) * kmax for the keys j0 .. j0 + BLOCK_S of [lo, hi): [heads, keys] int64.

    q16 = 256 hi + lo + 128 with hi = q16 >> 8 and lo = (q16 & 255) - 128, both in
    [-128, 127] for every int16, so s = 256 (hi . k) + (lo . k) + 128 sum(k): two
    int8 MMAs with exact int32 sums (|hi . k| <= 256 * 128 * 127 < 2^22) and
    |s| < 2^31 (docs/ENGINE.md).
    """
    j = j0 + tl.arange(0, BLOCK_S)
    valid = (j >= lo) & (j < hi)
    d = tl.arange(0, HD_PAD)
    k = tl.load(k_base + d[:, None] * skd + j[None, :], mask=(d[:, None] < hd) & valid[None, :], other=0)
    ksum = tl.sum(k.to(tl.int32), axis=0)
    s = (tl.dot(q_hi, k, out_dtype=tl.int32) << 8) + tl.dot(q_lo, k, out_dtype=tl.int32) + (ksum << 7)[None, :]
    z = s.to(tl.int64) * tl.load(km_base + j, mask=valid, other=0).to(tl.int64)[None, :]
    return z, j, valid


@triton.jit
def _max_score(zmax, q_hi, q_lo, k_base, km_base, skd, lo, hi, hd, HD_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """Pass 1 over the keys [lo, hi): the running max of z per head."""
    for j0 in range(lo, hi, BLOCK_S):
        z, j, valid = _scores(q_hi, q_lo, k_base, km_base, skd, j0, lo, hi, hd, HD_PAD, BLOCK_S)
        zmax = tl.maximum(zmax, tl.max(tl.where(valid[None, :], z, _NO_KEY), axis=1))
    return zmax


@triton.jit
def _value_sums(tot, acc, zmax, sh, q_hi, q_lo, k_base, km_base, skd, v_base, vm_base, svs, exp2_ptr, lc,
                lo, hi, hd, HD_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """Pass 2 over the keys [lo, hi): p per key (the fixed-point softmax), tot += sum p, acc += sum p vmax v8.

    w = p * vmax is in [0, 2^40) (p <= 2^16, vmax < 2^24), so w = sum_k 256^k (byte_k - 128)
    + _W_OFFSET over its five bytes: five int8 MMAs (int32 sums below 128 * 127 * BLOCK_S)
    and one column sum of v give sum_j w_j v_jd exactly; int64 sums wrap modulo 2^64,
    so every partial is exact and the total (< 2^61, docs/ENGINE.md) is the true one.
    """
    dv = tl.arange(0, HD_PAD)
    for j0 in range(lo, hi, BLOCK_S):
        z, j, valid = _scores(q_hi, q_lo, k_base, km_base, skd, j0, lo, hi, hd, HD_PAD, BLOCK_S)
        # zmax >= z on every valid key; the clamp at 0 only touches masked lanes (no negative shifts).
        dd = tl.minimum(tl.maximum((zmax[:, None] - z) >> sh[:, None], 0), _ATT_D_CAP)
        u = tl.minimum((dd * lc) >> _ATT_SHIFT, _ATT_U_CAP)
        p = tl.load(exp2_ptr + (u & 1023)) >> ((u >> 10) + _ATT_P_SHIFT)
        p = tl.where(valid[None, :] & (u < _ATT_U_CAP), p, 0)
        tot += tl.sum(p, axis=1)
        w = p * tl.load(vm_base + j, mask=valid, other=0).to(tl.int64)[None, :]
        v = tl.load(v_base + j[:, None] * svs + dv[None, :], mask=valid[:, None] & (dv[None, :] < hd), other=0)
        acc += tl.sum(v.to(tl.int64), axis=0)[None, :] * _W_OFFSET
        for k in tl.static_range(5):
            digit = (((w >> (8 * k)) & 255) - 128).to(tl.int8)
            acc += tl.dot(digit, v, out_dtype=tl.int32).to(tl.int64) << (8 * k)
    return tot, acc


@triton.jit
def _attend_kernel(q_ptr, qe_ptr, kt_ptr, kmax_ptr, vc_ptr, vmax_ptr, crow_ptr, a_ptr, b_ptr, c_ptr, exp2_ptr,
                   out_ptr, nh, hd, group, lc, skt_r, skt_h, skt_d, skm_r, skm_h, svc_r, svc_h, svc_s,
                   svm_r, svm_h, BLOCK_H: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """One query's heads of one KV head over its key set [0, a) + [max(a, b), c) of cache row crow.

    Two passes, because p depends on the maximum over the whole set through floors
    and a table (no exact rescaling as in flash attention): pass 1 reads K for the
    max score, pass 2 reads K again (mostly from L2) and V.
    """
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    r = tl.load(crow_ptr + n)
    a = tl.load(a_ptr + n)
    b = tl.maximum(tl.load(b_ptr + n), a)                   # the two ranges never overlap
    c = tl.load(c_ptr + n)
    g = tl.arange(0, BLOCK_H)
    dq = tl.arange(0, HD_PAD)
    rows = n * nh + h * group + g
    q = tl.load(q_ptr + rows[:, None] * hd + dq[None, :], mask=(g[:, None] < group) & (dq[None, :] < hd),
                other=0).to(tl.int32)
    q_hi = (q >> 8).to(tl.int8)
    q_lo = ((q & 255) - 128).to(tl.int8)
    sh = tl.minimum(tl.maximum(-tl.load(qe_ptr + rows, mask=g < group, other=0) + _ATT_PRESHIFT, 0), _MAX_SHIFT)
    k_base = kt_ptr + r * skt_r + h * skt_h
    km_base = kmax_ptr + r * skm_r + h * skm_h
    v_base = vc_ptr + r * svc_r + h * svc_h
    vm_base = vmax_ptr + r * svm_r + h * svm_h
    zmax = tl.full([BLOCK_H], _NO_KEY, tl.int64)
    zmax = _max_score(zmax, q_hi, q_lo, k_base, km_base, skt_d, 0, a, hd, HD_PAD, BLOCK_S)
    zmax = _max_score(zmax, q_hi, q_lo, k_base, km_base, skt_d, b, c, hd, HD_PAD, BLOCK_S)
    tot = tl.zeros([BLOCK_H], tl.int64)
    acc = tl.zeros([BLOCK_H, HD_PAD], tl.int64)
    tot, acc = _value_sums(tot, acc, zmax, sh, q_hi, q_lo, k_base, km_base, skt_d, v_base, vm_base, svc_s,
                           exp2_ptr, lc, 0, a, hd, HD_PAD, BLOCK_S)
    tot, acc = _value_sums(tot, acc, zmax, sh, q_hi, q_lo, k_base, km_base, skt_d, v_base, vm_base, svc_s,
                           exp2_ptr, lc, b, c, hd, HD_PAD, BLOCK_S)
    den = 127 * tot                                          # the best key has p = 2^16: den > 0
    out = _floor_div(2 * acc + den[:, None], 2 * tl.maximum(den, 1)[:, None])
    tl.store(out_ptr + rows[:, None] * hd + dq[None, :], out, mask=(g[:, None] < group) & (dq[None, :] < hd))


def attend(q16, qe, kt, kmax, vc, vmax, crow, a, b, c) -> torch.Tensor:
    """Exact attention (docs/ENGINE.md): query n over slots [0, a[n]) + [b[n], c[n]) of cache row crow[n]."""
    _expect(q16, torch.int16, 3)
    n_q, nh, hd = q16.shape
    nkv = kt.shape[1]
    _expect(qe, torch.int64, 2, n_q, nh)
    _check_cache(kt, kmax, vc, vmax, nkv, hd)
    for t in (crow, a, b, c):
        _expect(t, torch.int64, 1, n_q)
    if nh % nkv or hd % 2 or hd > MAX_HEAD_DIM or kt.shape[3] > MAX_KEYS:
        raise ValueError(f"attend: {nh} heads over {nkv}, head dim {hd} (<= {MAX_HEAD_DIM}), "
                         f"{kt.shape[3]} slots (<= {MAX_KEYS})")
    block_h = max(MIN_DOT, triton.next_power_of_2(nh // nkv))
    hd_pad = max(MIN_DOT_K, triton.next_power_of_2(hd))      # zero dims pad the QK reduction to >= 32
    assert BLOCKS.keys >= MIN_DOT_K, "the PV product reduces over BLOCKS.keys keys: int8 MMA needs >= 32"
    out = torch.empty((n_q, nh, hd), dtype=torch.int64, device=q16.device)
    if n_q:
        _attend_kernel[(n_q, nkv)](
            q16.contiguous(), qe.contiguous(), kt, kmax, vc, vmax, crow.contiguous(), a.contiguous(),
            b.contiguous(), c.contiguous(), _exp2(q16.device), out, nh, hd, nh // nkv, fixedmath.att_log2e(hd),
            kt.stride(0), kt.stride(1), kt.stride(2), kmax.stride(0), kmax.stride(1),
            vc.stride(0), vc.stride(1), vc.stride(2), vmax.stride(0), vmax.stride(1),
            BLOCK_H=block_h, HD_PAD=hd_pad, BLOCK_S=BLOCKS.keys)
    return out


# -- gaps ----------------------------------------------------------------------------------
@triton.jit
def _gaps_kernel(y_ptr, mult_ptr, exp_ptr, out_ptr, n_rows, vocab, BLOCK: tl.constexpr):
    """One row's gaps below its best logit (docs/ENGINE.md, Frequencies): max pass, then the gaps."""
    row = tl.program_id(0).to(tl.int64)
    top = tl.full((), _NO_KEY, tl.int64)
    for c0 in range(0, vocab, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < vocab
        lam = _combine(y_ptr, n_rows, vocab, row, cols, mask) * tl.load(mult_ptr + cols, mask=mask, other=0)
        top = tl.maximum(top, tl.max(tl.where(mask, lam, _NO_KEY)))
    s = 20 - tl.load(exp_ptr + row)
    pre = tl.maximum(s - _OUT_PRE_LIMIT, 0)
    rest = tl.maximum(s - pre, 0)                            # <= 36
    pre = tl.minimum(pre, _MAX_SHIFT)                        # 0 <= top - lam < 2^62: >> 62 gives 0, as any larger
    for c0 in range(0, vocab, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < vocab
        lam = _combine(y_ptr, n_rows, vocab, row, cols, mask) * tl.load(mult_ptr + cols, mask=mask, other=0)
        u = tl.minimum((tl.minimum((top - lam) >> pre, _OUT_D_CAP) * _LOG2E_OUT) >> rest, _OUT_U_CAP)
        tl.store(out_ptr + row * vocab + cols, u, mask=mask)


def gaps(y: torch.Tensor, mult: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """Output head product -> each token's gap below the best logit, [N, V] int64 (ops_torch.gaps)."""
    _expect(exp, torch.int64, 2)
    n = exp.shape[0]
    _expect(y, torch.int32, 2, 2 * n)
    vocab = y.shape[1]
    _expect(mult, torch.int64, 1, vocab)
    out = torch.empty((n, vocab), dtype=torch.int64, device=y.device)
    if n:
        _gaps_kernel[(n,)](y.contiguous(), mult.contiguous(), exp.contiguous(), out, n, vocab, BLOCK=BLOCKS.cols)
    return out


# -- launcher helpers ----------------------------------------------------------------------
def _expect(t: torch.Tensor, dtype: torch.dtype, ndim: int | None = None, *sizes: int) -> None:
    """A launcher's shape check: dtype, rank, and the leading sizes given."""
    if t.dtype != dtype or (ndim is not None and t.dim() != ndim) or tuple(t.shape[:len(sizes)]) != sizes:
        raise ValueError(f"expected {dtype} of rank {ndim} starting {sizes}, got {t.dtype} {tuple(t.shape)}")


def _check_cache(kt, kmax, vc, vmax, nkv: int, hd: int) -> None:
    """The KVCache layout (engine.KVCache): slots contiguous in keys, head dims contiguous in values."""
    rows, slots = kt.shape[0], kt.shape[-1]
    _expect(kt, torch.int8, 4, rows, nkv, hd, slots)
    _expect(vc, torch.int8, 4, rows, nkv, slots, hd)
    _expect(kmax, torch.int32, 3, rows, nkv, slots)
    _expect(vmax, torch.int32, 3, rows, nkv, slots)
    if kt.stride(3) != 1 or vc.stride(3) != 1 or kmax.stride(2) != 1 or vmax.stride(2) != 1:
        raise ValueError("cache tensors need their last dimension contiguous")


@functools.cache
def _exp2_cached(device: str) -> torch.Tensor:
    return torch.as_tensor(fixedmath.exp2_table(), dtype=torch.int64, device=device)


def _exp2(device: torch.device) -> torch.Tensor:
    """EXP2 (1,024 int64) on ``device``, made once per device."""
    return _exp2_cached(str(device))
