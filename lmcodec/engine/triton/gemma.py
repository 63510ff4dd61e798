"""Gemma 3's own Triton steps (docs/ENGINE.md, "Gemma 3"): the post-norm residual add and the per-head
q/k norms that :mod:`lmcodec.engine.triton.ops`'s qkv kernel calls (``QK_NORM``).

norm16 is the RMSNorm whose result is no product's operand: ``t = xs G r`` (``xs`` the values
pre-shifted below 2^15, ``r = isqrt(k 2^48 / d)``) at 16 fractional bits, clamped; the same
integers as ``ops_torch.norm16`` and ``cpu.rows._norm16``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..spec import constants as spec
from . import ints as ti
from .ints import (
    QKV_LIMIT,
    RESID_FRAC,
    RESID_LIMIT,
    bitlen,
    combine,
    expect,
    requant,
    rshift,
)


@triton.jit
def qk_norm(x1, x2, hh, d, mask, nh, nkv, hd, qg_ptr, kg_ptr, eps_ptr, c_q, c_k):
    """Gemma's norm16 of every q and k head (a tile row each, its two halves x1 | x2), v heads unchanged."""
    half = hd // 2
    m = tl.maximum(tl.max(tl.abs(x1), axis=1), tl.max(tl.abs(x2), axis=1))[:, None]
    s = tl.maximum(bitlen(m) - 15, 0)                       # |x| <= 2^24: s <= 10
    xs1 = rshift(x1, s)
    xs2 = rshift(x2, s)
    ss = (tl.sum(xs1 * xs1, axis=1) + tl.sum(xs2 * xs2, axis=1))[:, None]
    r = ti.rms_root(ss, hd, tl.load(eps_ptr + s))
    is_q = hh < nh
    normed = mask & (hh < nh + nkv)
    dm = d < half
    g1 = tl.where(is_q, tl.load(qg_ptr + d, mask=dm, other=0), tl.load(kg_ptr + d, mask=dm, other=0))
    g2 = tl.where(is_q, tl.load(qg_ptr + half + d, mask=dm, other=0), tl.load(kg_ptr + half + d, mask=dm, other=0))
    c = tl.where(is_q, c_q, c_k).to(tl.int64)
    n1 = ti.norm16_out(xs1 * g1 * r, c, QKV_LIMIT)
    n2 = ti.norm16_out(xs2 * g2 * r, c, QKV_LIMIT)
    return tl.where(normed, n1, x1), tl.where(normed, n2, x2)


# -- add_normed ----------------------------------------------------------------------------
@triton.jit
def _product_row(y_ptr, mult_ptr, n_rows, n_cols, row, cols, mask, c):
    """The product at 16 fractional bits, clamped to +-2^40, for ``cols`` of one row."""
    v = requant(combine(y_ptr, n_rows, n_cols, row, cols, mask), tl.load(mult_ptr + cols, mask=mask, other=0), c)
    return tl.minimum(tl.maximum(v, -RESID_LIMIT), RESID_LIMIT)


@triton.jit
def _add_normed_kernel(x_ptr, y_ptr, mult_ptr, exp_ptr, gain_ptr, eps_ptr, n_rows, n_cols, shift, c_norm,
                       BLOCK: tl.constexpr):
    """x += norm16(the product) for one row: the product is recomputed in each of three passes
    (max, sum of squares, write), cheaper than a buffer; every pass exact."""
    row = tl.program_id(0).to(tl.int64)
    c = shift - tl.load(exp_ptr + row) - RESID_FRAC
    m = tl.full((), 0, tl.int64)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.max(tl.abs(_product_row(y_ptr, mult_ptr, n_rows, n_cols, row, cols, cols < n_cols, c))))
    s = tl.maximum(bitlen(m) - 15, 0)                       # |v| <= 2^40: s <= 26
    ss = tl.full((), 0, tl.int64)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        xs = rshift(_product_row(y_ptr, mult_ptr, n_rows, n_cols, row, cols, cols < n_cols, c), s)
        ss += tl.sum(xs * xs)
    r = ti.rms_root(ss, n_cols, tl.load(eps_ptr + s))
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        xs = rshift(_product_row(y_ptr, mult_ptr, n_rows, n_cols, row, cols, mask, c), s)
        v = ti.norm16_out(xs * tl.load(gain_ptr + cols, mask=mask, other=0) * r, c_norm, RESID_LIMIT)
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0)
        tl.store(x_ptr + row * n_cols + cols, tl.minimum(tl.maximum(x + v, -RESID_LIMIT), RESID_LIMIT), mask=mask)


def add_normed(x: torch.Tensor, y: torch.Tensor, mult: torch.Tensor, shift: int, exp: torch.Tensor,
               gain: torch.Tensor, gain_shift: int, eps: torch.Tensor) -> None:
    """Gemma's post-norm add: x += norm16(the product at 16 fractional bits, clamped), clamped (in place)."""
    expect(x, torch.int64, 2)
    m, n = x.shape
    expect(y, torch.int32, 2, 2 * m, n)
    expect(mult, torch.int64, 1, n)
    expect(exp, torch.int64, 2, m, 1)
    expect(gain, torch.int64, 1, n)
    expect(eps, torch.int64, 1, 64)
    if not x.is_contiguous():
        raise ValueError("add_normed updates x in place: x must be contiguous")
    if m:
        _add_normed_kernel[(m,)](x, y.contiguous(), mult.contiguous(), exp.contiguous(), gain.contiguous(),
                                 eps.contiguous(), m, n, shift, spec.RSQRT_BITS + gain_shift - spec.RESID_FRAC,
                                 BLOCK=ti.BLOCKS.cols)
