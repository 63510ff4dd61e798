"""The exact engine's integer steps as Triton kernels (the CUDA path).

Same functions, same integers as :mod:`lmcodec.engine.ops_torch` (the tensor-operation
spelling of docs/ENGINE.md) and :mod:`lmcodec.engine.cpu.ops` (numba): the engine
calls exactly ``split norm operand residual_add qkv mlp attend gaps`` (and Gemma 3's
``add_normed``) through ``Engine.ops``, and ``engine._backend("cuda")`` returns this module.  Each
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

Attention (``attend``) lives in :mod:`lmcodec.engine.triton.attend`, Gemma 3's
post-norm add and q/k norms in :mod:`lmcodec.engine.triton.gemma`, the shared
constants, integer primitives, tile sizes and shape checks in
:mod:`lmcodec.engine.triton.ints`.  Import these only where the Triton backend is
used: they import triton, which CPU-only installs need not have.  A CUDA graph
must be captured after one warm-up call of each op (Triton compiles a kernel
and the attention table is copied to the device on first use).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..spec import constants as spec
from ..spec import fixedmath
from . import gemma as tg
from . import ints as ti
from .attend import attend  # noqa: F401  (the op set: split norm operand residual_add qkv mlp attend gaps)
from .gemma import add_normed  # noqa: F401  (and Gemma 3's post-norm add)
from .ints import (
    ACT_FRAC,
    ACT_MAX,
    KV_MAX,
    LOG2E_OUT,
    MAX_SHIFT,
    MLP_LIMIT,
    NO_KEY,
    OUT_D_CAP,
    OUT_PRE_LIMIT,
    OUT_U_CAP,
    Q_MAX,
    QKV_LIMIT,
    RESID_FRAC,
    RESID_LIMIT,
    ROPE_BITS,
    ROPE_HALF,
    RSQRT_BITS,
    SIG_BITS,
    SIG_BITS_HALF,
    SIG_SHIFT,
    SIG_SHIFT_HALF,
    SIG_SPAN,
    bitlen,
    check_cache,
    combine,
    expect,
    fit,
    floor_div,
    requant,
    rshift,
)

#: This backend computes Gemma 3's forms of the shared steps: attention over a window with any
#: scale, the MLP with the gate table it is given, qkv with the q/k norms, and add_normed
#: (gemma.steps_for).
GEMMA_STEPS = True


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
    expect(h16, torch.int16, 2)
    h16 = h16.contiguous()
    m, k = h16.shape
    out = torch.empty((2 * m, k), dtype=torch.int8, device=h16.device)
    if m:
        _split_kernel[(m, triton.cdiv(k, ti.BLOCKS.cols))](h16, out, m, k, BLOCK=ti.BLOCKS.cols)
    return out


# -- norm ----------------------------------------------------------------------------------
@triton.jit
def _norm_kernel(x_ptr, gain_ptr, eps_ptr, out_ptr, exp_ptr, n_cols, gain_shift, BLOCK: tl.constexpr):
    """RMSNorm of one residual row (docs/ENGINE.md): four passes over the row, each exact."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * n_cols
    m = ti.row_absmax(base, n_cols, BLOCK)
    s = tl.maximum(bitlen(m) - 15, 0)                       # |x| <= 2^40: s <= 26
    ss = tl.full((), 0, tl.int64)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        xs = rshift(tl.load(base + cols, mask=cols < n_cols, other=0), s)
        ss += tl.sum(xs * xs)                                # |xs| <= 2^15: < 2^30 per entry
    r = ti.rms_root(ss, n_cols, tl.load(eps_ptr + s))
    mt = tl.full((), 0, tl.int64)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        t = rshift(tl.load(base + cols, mask=mask, other=0), s) * tl.load(gain_ptr + cols, mask=mask, other=0) * r
        mt = tl.maximum(mt, tl.max(tl.abs(t)))               # < 2^47
    s2 = fit(mt, ACT_MAX)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        t = rshift(tl.load(base + cols, mask=mask, other=0), s) * tl.load(gain_ptr + cols, mask=mask, other=0) * r
        tl.store(out_ptr + row * n_cols + cols, rshift(t, s2).to(tl.int16), mask=mask)
    tl.store(exp_ptr + row, s2 - RSQRT_BITS - gain_shift)


def norm(x: torch.Tensor, gain: torch.Tensor, gain_shift: int, eps: torch.Tensor):
    """RMSNorm of residual rows -> (int16 operand rows, exponent per row [M, 1])."""
    expect(x, torch.int64, 2)
    expect(gain, torch.int64, 1, x.shape[1])
    expect(eps, torch.int64, 1, 64)    # EPS[s] for s in [0, 64); s <= 26 here
    x = x.contiguous()
    m, k = x.shape
    out = torch.empty((m, k), dtype=torch.int16, device=x.device)
    exp = torch.empty((m, 1), dtype=torch.int64, device=x.device)
    if m:
        _norm_kernel[(m,)](x, gain.contiguous(), eps.contiguous(), out, exp, k, gain_shift, BLOCK=ti.BLOCKS.cols)
    return out, exp


# -- operand -------------------------------------------------------------------------------
@triton.jit
def _operand_kernel(x_ptr, out_ptr, shift_ptr, n_cols, limit, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * n_cols
    m = ti.row_absmax(base, n_cols, BLOCK)
    s = fit(m, limit)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        tl.store(out_ptr + row * n_cols + cols, rshift(tl.load(base + cols, mask=mask, other=0), s).to(tl.int16),
                 mask=mask)
    tl.store(shift_ptr + row, s)


def operand(x: torch.Tensor, limit: int = spec.ACT_MAX):
    """int64 rows (|v| < 2^62) -> (int16 rows, shift [..., 1]): the least power-of-two shift that fits ``limit``."""
    expect(x, torch.int64)
    if not (1 << 14) <= limit <= spec.Q_MAX:
        raise ValueError(f"operand limit {limit} outside [2^14, {spec.Q_MAX}]")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    m, k = x2.shape
    out = torch.empty((m, k), dtype=torch.int16, device=x.device)
    shift = torch.empty((m, 1), dtype=torch.int64, device=x.device)
    if m:
        _operand_kernel[(m,)](x2, out, shift, k, limit, BLOCK=ti.BLOCKS.cols)
    return out.view(shape), shift.view(*shape[:-1], 1)


# -- residual_add ----------------------------------------------------------------------------
@triton.jit
def _residual_add_kernel(x_ptr, y_ptr, mult_ptr, exp_ptr, n_rows, n_cols, shift, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    c = shift - tl.load(exp_ptr + row) - RESID_FRAC
    v = requant(combine(y_ptr, n_rows, n_cols, row, cols, mask), tl.load(mult_ptr + cols, mask=mask, other=0), c)
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0)
    tl.store(x_ptr + row * n_cols + cols, tl.minimum(tl.maximum(x + v, -RESID_LIMIT), RESID_LIMIT), mask=mask)


def residual_add(x: torch.Tensor, y: torch.Tensor, mult: torch.Tensor, shift: int, exp: torch.Tensor) -> None:
    """x += the product y (int32 [hi rows; lo rows]) at 16 fractional bits, clamped to +-2^40 (in place)."""
    expect(x, torch.int64, 2)
    m, n = x.shape
    expect(y, torch.int32, 2, 2 * m, n)
    expect(mult, torch.int64, 1, n)
    expect(exp, torch.int64, 2, m, 1)
    if not x.is_contiguous():
        raise ValueError("residual_add updates x in place: x must be contiguous")
    if m:
        _residual_add_kernel[(m, triton.cdiv(n, ti.BLOCKS.cols))](x, y.contiguous(), mult.contiguous(),
                                                               exp.contiguous(), m, n, shift, BLOCK=ti.BLOCKS.cols)


# -- qkv -----------------------------------------------------------------------------------
@triton.jit
def _qkv_kernel(y_ptr, mult_ptr, bias_ptr, exp_ptr, cos_ptr, sin_ptr, slots_ptr, kt_ptr, kmax_ptr, vc_ptr,
                vmax_ptr, q_ptr, qe_ptr, qg_ptr, kg_ptr, eps_ptr, n_rows, n_t, shift, nh, nkv, hd, c_q, c_k,
                skt_r, skt_h, skt_d, skm_r, skm_h, svc_r, svc_h, svc_s, svm_r, svm_h,
                HAS_BIAS: tl.constexpr, QK_NORM: tl.constexpr, POS_PER_ROW: tl.constexpr,
                SLOT_PER_ROW: tl.constexpr, HEADS: tl.constexpr, HALF: tl.constexpr):
    """Every head vector of one row, a head per tile row (first halves | second halves):
    requantize, bias, clamp; Gemma's q/k norms (QK_NORM); RoPE (q, k); the int16 queries and
    the int8 cache write."""
    row = tl.program_id(0).to(tl.int64)
    hh = tl.arange(0, HEADS)[:, None]                        # q heads, then k heads, then v heads
    d = tl.arange(0, HALF)[None, :]
    half = hd // 2
    n_cols = (nh + 2 * nkv) * hd
    mask = (hh < nh + 2 * nkv) & (d < half)
    c = shift - tl.load(exp_ptr + row) - ACT_FRAC
    col1 = hh * hd + d
    col2 = col1 + half
    x1 = requant(combine(y_ptr, n_rows, n_cols, row, col1, mask), tl.load(mult_ptr + col1, mask=mask, other=0), c)
    x2 = requant(combine(y_ptr, n_rows, n_cols, row, col2, mask), tl.load(mult_ptr + col2, mask=mask, other=0), c)
    if HAS_BIAS:
        x1 += tl.load(bias_ptr + col1, mask=mask, other=0)
        x2 += tl.load(bias_ptr + col2, mask=mask, other=0)
    x1 = tl.minimum(tl.maximum(x1, -QKV_LIMIT), QKV_LIMIT)
    x2 = tl.minimum(tl.maximum(x2, -QKV_LIMIT), QKV_LIMIT)
    if QK_NORM:
        x1, x2 = tg.qk_norm(x1, x2, hh, d, mask, nh, nkv, hd, qg_ptr, kg_ptr, eps_ptr, c_q, c_k)
    t = row % n_t
    b = row // n_t
    at = row if POS_PER_ROW else t                          # the row's position (a table row)
    cs = tl.load(cos_ptr + at * half + d, mask=d < half, other=0)
    sn = tl.load(sin_ptr + at * half + d, mask=d < half, other=0)
    roped = hh < nh + nkv                                    # RoPE on q and k heads at the row's position
    r1 = tl.where(roped, tl.minimum(tl.maximum((x1 * cs - x2 * sn + ROPE_HALF) >> ROPE_BITS, -QKV_LIMIT),
                                    QKV_LIMIT), x1)
    r2 = tl.where(roped, tl.minimum(tl.maximum((x2 * cs + x1 * sn + ROPE_HALF) >> ROPE_BITS, -QKV_LIMIT),
                                    QKV_LIMIT), x2)
    mx = tl.maximum(tl.max(tl.abs(r1), axis=1), tl.max(tl.abs(r2), axis=1))[:, None]
    # Queries: int16 with an exponent per head.
    s = fit(mx, Q_MAX)
    is_q = hh < nh
    q_at = q_ptr + (row * nh + hh) * hd + d
    tl.store(q_at, rshift(r1, s).to(tl.int16), mask=mask & is_q)
    tl.store(q_at + half, rshift(r2, s).to(tl.int16), mask=mask & is_q)
    tl.store(qe_ptr + row * nh + hh, s, mask=is_q)
    # Keys and values: int8 = floor((254 v + M) / 2M) with M = max(max|v|, 1), and max|v|.
    safe = tl.maximum(mx, 1)
    v1 = floor_div(r1 * (2 * KV_MAX) + safe, 2 * safe).to(tl.int8)
    v2 = floor_div(r2 * (2 * KV_MAX) + safe, 2 * safe).to(tl.int8)
    slot = tl.load(slots_ptr + (row if SLOT_PER_ROW else t))
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


def qkv(y, mult, shift, bias, exp, cos, sin, B, T, nh, nkv, hd, kt, kmax, vc, vmax, slots, qk_norm=None):
    """q/k/v from the qkv product: RoPE, the int8 cache write at ``slots``, the int16 queries.

    Row ``i = b T + t`` takes its RoPE rows from ``cos``/``sin`` and its cache slot
    from ``slots`` either per position (``[T]`` rows, shared by the B rows: ops_torch's
    contract) or per row (``[B T]``: every row its own position and slot); with
    B = 1 the two are the same.  ``qk_norm`` (Gemma 3): ``(q gain, shift, k gain, shift,
    eps)``, the per-head norm16 of q and k before RoPE (ops_torch.qkv).
    """
    m, n = B * T, (nh + 2 * nkv) * hd
    expect(y, torch.int32, 2, 2 * m, n)
    expect(mult, torch.int64, 1, n)
    if bias is not None:
        expect(bias, torch.int64, 1, n)
    expect(exp, torch.int64, 2, m, 1)
    pos_per_row, slot_per_row = cos.shape[0] == m != T, slots.shape[0] == m != T
    expect(cos, torch.int64, 2, m if pos_per_row else T, hd // 2)
    expect(sin, torch.int64, 2, cos.shape[0], hd // 2)
    expect(slots, torch.int64, 1, m if slot_per_row else T)
    check_cache(kt, kmax, vc, vmax, nkv, hd)
    if kt.shape[0] < B or nh % nkv or hd % 2 or hd > spec.MAX_HEAD_DIM:
        raise ValueError(f"qkv: {B} rows into a cache of {kt.shape[0]}, {nh} heads over {nkv}, head dim {hd}")
    if qk_norm is not None:
        qg, qs, kg, ks, eps = qk_norm
        expect(qg, torch.int64, 1, hd)
        expect(kg, torch.int64, 1, hd)
        expect(eps, torch.int64, 1, 64)
        qg, kg, eps = qg.contiguous(), kg.contiguous(), eps.contiguous()
        c_q, c_k = (spec.RSQRT_BITS + s - spec.RESID_FRAC for s in (qs, ks))
    else:
        qg = kg = eps = mult                                 # not read (QK_NORM off)
        c_q = c_k = 0
    q16 = torch.empty((m, nh, hd), dtype=torch.int16, device=y.device)
    qe = torch.empty((m, nh), dtype=torch.int64, device=y.device)
    if m:
        _qkv_kernel[(m,)](
            y.contiguous(), mult.contiguous(), mult if bias is None else bias.contiguous(), exp.contiguous(),
            cos.contiguous(), sin.contiguous(), slots.contiguous(), kt, kmax, vc, vmax, q16, qe, qg, kg, eps, m, T,
            shift, nh, nkv, hd, c_q, c_k, kt.stride(0), kt.stride(1), kt.stride(2), kmax.stride(0), kmax.stride(1),
            vc.stride(0), vc.stride(1), vc.stride(2), vmax.stride(0), vmax.stride(1),
            HAS_BIAS=bias is not None, QK_NORM=qk_norm is not None, POS_PER_ROW=pos_per_row, SLOT_PER_ROW=slot_per_row,
            HEADS=triton.next_power_of_2(nh + 2 * nkv),     # SmolLM2: 9 + 3 + 3 head vectors -> 16 tile rows
            HALF=triton.next_power_of_2(hd // 2))            # a RoPE half (32 of 64) per tile column
    return q16, qe


# -- mlp -----------------------------------------------------------------------------------
@triton.jit
def _swiglu(y_ptr, mult_ptr, sig_ptr, n_rows, inter, row, cols, mask, c):
    """SiLU(gate) * up at 32 fractional bits (< 2^52) for ``cols`` of one row."""
    g = requant(combine(y_ptr, n_rows, 2 * inter, row, cols, mask), tl.load(mult_ptr + cols, mask=mask, other=0), c)
    u = requant(combine(y_ptr, n_rows, 2 * inter, row, inter + cols, mask),
                 tl.load(mult_ptr + inter + cols, mask=mask, other=0), c)
    g = tl.minimum(tl.maximum(g, -MLP_LIMIT), MLP_LIMIT)
    u = tl.minimum(tl.maximum(u, -MLP_LIMIT), MLP_LIMIT)
    idx = tl.minimum(tl.maximum((g + SIG_SHIFT_HALF) >> SIG_SHIFT, -SIG_SPAN), SIG_SPAN)
    silu = (g * tl.load(sig_ptr + idx + SIG_SPAN, mask=mask, other=0) + SIG_BITS_HALF) >> SIG_BITS
    return silu * u


@triton.jit
def _mlp_kernel(y_ptr, mult_ptr, exp_ptr, sig_ptr, out_ptr, shift_ptr, n_rows, inter, shift, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = shift - tl.load(exp_ptr + row) - ACT_FRAC
    m = tl.full((), 0, tl.int64)
    for c0 in range(0, inter, BLOCK):                        # pass 1: the row's max |a|
        cols = c0 + tl.arange(0, BLOCK)
        a = _swiglu(y_ptr, mult_ptr, sig_ptr, n_rows, inter, row, cols, cols < inter, c)
        m = tl.maximum(m, tl.max(tl.abs(a)))
    s = fit(m, ACT_MAX)
    for c0 in range(0, inter, BLOCK):                        # pass 2: recompute (cheaper than a buffer), write
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < inter
        a = _swiglu(y_ptr, mult_ptr, sig_ptr, n_rows, inter, row, cols, mask, c)
        tl.store(out_ptr + row * inter + cols, rshift(a, s).to(tl.int16), mask=mask)
    tl.store(shift_ptr + row, s)


def mlp(y, mult, shift, exp, sigmoid):
    """gate/up product -> SiLU(gate) * up as an int16 operand (exponent at 32 fractional bits)."""
    expect(exp, torch.int64, 2)
    m = exp.shape[0]
    expect(y, torch.int32, 2, 2 * m)
    inter = y.shape[1] // 2
    expect(mult, torch.int64, 1, 2 * inter)
    expect(sigmoid, torch.int64, 1, 2 * (fixedmath.SIGMOID_RANGE << fixedmath.SIGMOID_STEP_BITS) + 1)
    out = torch.empty((m, inter), dtype=torch.int16, device=y.device)
    oshift = torch.empty((m, 1), dtype=torch.int64, device=y.device)
    if m:
        _mlp_kernel[(m,)](y.contiguous(), mult.contiguous(), exp.contiguous(), sigmoid.contiguous(), out, oshift,
                          m, inter, shift, BLOCK=ti.BLOCKS.cols)
    return out, oshift


# -- gaps ----------------------------------------------------------------------------------
@triton.jit
def _gaps_kernel(y_ptr, mult_ptr, exp_ptr, out_ptr, n_rows, vocab, BLOCK: tl.constexpr):
    """One row's gaps below its best logit (docs/ENGINE.md, Frequencies): max pass, then the gaps."""
    row = tl.program_id(0).to(tl.int64)
    top = tl.full((), NO_KEY, tl.int64)
    for c0 in range(0, vocab, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < vocab
        lam = combine(y_ptr, n_rows, vocab, row, cols, mask) * tl.load(mult_ptr + cols, mask=mask, other=0)
        top = tl.maximum(top, tl.max(tl.where(mask, lam, NO_KEY)))
    s = 20 - tl.load(exp_ptr + row)
    pre = tl.maximum(s - OUT_PRE_LIMIT, 0)
    rest = tl.maximum(s - pre, 0)                            # <= 36
    pre = tl.minimum(pre, MAX_SHIFT)                        # 0 <= top - lam < 2^62: >> 62 gives 0, as any larger
    for c0 in range(0, vocab, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < vocab
        lam = combine(y_ptr, n_rows, vocab, row, cols, mask) * tl.load(mult_ptr + cols, mask=mask, other=0)
        u = tl.minimum((tl.minimum((top - lam) >> pre, OUT_D_CAP) * LOG2E_OUT) >> rest, OUT_U_CAP)
        tl.store(out_ptr + row * vocab + cols, u, mask=mask)


def gaps(y: torch.Tensor, mult: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """Output head product -> each token's gap below the best logit, [N, V] int64 (ops_torch.gaps)."""
    expect(exp, torch.int64, 2)
    n = exp.shape[0]
    expect(y, torch.int32, 2, 2 * n)
    vocab = y.shape[1]
    expect(mult, torch.int64, 1, vocab)
    out = torch.empty((n, vocab), dtype=torch.int64, device=y.device)
    if n:
        _gaps_kernel[(n,)](y.contiguous(), mult.contiguous(), exp.contiguous(), out, n, vocab, BLOCK=ti.BLOCKS.cols)
    return out
