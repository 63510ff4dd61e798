"""Gemma 3's own steps as numba kernels: the q/k norms inside the q|k|v step, and the
residual add through a post norm (docs/ENGINE.md, "Gemma 3": ``norm16``).

The tensor steps (:func:`lmcodec.engine.ops_torch.qkv` with ``qk_norm``,
:func:`lmcodec.engine.gemma._add`) take some twenty tensor operations a layer,
each with its own temporaries; at a decoding step's few rows that per-operation
cost, not arithmetic, is most of a Gemma layer.  Here each is one pass over the
rows, built from the helpers the CPU kernels share (:mod:`lmcodec.engine.cpu_rows`),
so they compute the same integers as the tensor steps (``tests/test_gemma.py``
runs both against the reference).
"""

from __future__ import annotations

import numpy as np
import torch

from .cpu_rows import _JIT, _bitlen, _clamp, _qkv_heads, _requant, _rshift, _threads, njit, prange
from .spec import ACT_FRAC, QKV_LIMIT, RESID_FRAC, RESID_LIMIT, RSQRT_BITS


@njit(inline="always", **_JIT)
def _norm16(v, base, k, gain, gain_shift, eps, limit):  # pragma: no cover - compiled
    """``v[base:base+k]`` <- norm16 of it with ``gain`` (in place: r needs the whole row first)."""
    m = np.int64(0)
    for j in range(k):
        m = max(m, abs(v[base + j]))
    s = max(_bitlen(m) - 15, 0)
    ss = np.int64(0)
    for j in range(k):
        xs = _rshift(v[base + j], s)
        ss += xs * xs
    d = max(ss + k * eps[s], np.int64(1))
    n = (np.int64(k) << (2 * RSQRT_BITS)) // d
    r = np.int64(np.sqrt(np.float64(n)))
    for _ in range(2):
        if r * r > n:
            r -= 1
        if (r + 1) * (r + 1) <= n:
            r += 1
    c = RSQRT_BITS + gain_shift - RESID_FRAC
    for j in range(k):
        t = _rshift(v[base + j], s) * gain[j] * r
        out = _rshift(t, c) if c >= 0 else _clamp(t, RESID_LIMIT) << min(-c, 20)
        v[base + j] = _clamp(out, limit)


@njit(parallel=True, **_JIT)
def _qkv_normed(y, mult, shift, bias, has_bias, exp, cos, sin, n_t, nh, nkv, hd, qg, qs, kg, ks, eps, kt, kmax, vc, vmax, slots,
                q16, qe):  # pragma: no cover - compiled
    m_rows = exp.shape[0]
    n = y.shape[1]
    per_row = cos.shape[0] > 1
    for i in prange(m_rows):
        b = i // n_t
        t = i % n_t
        cs = cos[b] if per_row else cos[0]
        sn = sin[b] if per_row else sin[0]
        c = shift - exp[i] - ACT_FRAC
        vals = np.empty(n, np.int64)
        for j in range(n):
            v = _requant((np.int64(y[i, j]) << 8) + np.int64(y[m_rows + i, j]), mult[j], c)
            if has_bias:
                v += bias[j]
            vals[j] = _clamp(v, QKV_LIMIT)
        for h in range(nh):
            _norm16(vals, h * hd, hd, qg, qs, eps, QKV_LIMIT)
        for h in range(nkv):
            _norm16(vals, (nh + h) * hd, hd, kg, ks, eps, QKV_LIMIT)
        _qkv_heads(vals, cs, sn, t, nh, nkv, hd, q16[i], qe[i], kt[b], kmax[b], vc[b], vmax[b], slots[b, t])


@njit(parallel=True, **_JIT)
def _add_normed(x, y, mult, shift, exp, gain, gain_shift, eps):  # pragma: no cover - compiled
    m_rows, n = x.shape
    for i in prange(m_rows):
        c = shift - exp[i] - ACT_FRAC
        v = np.empty(n, np.int64)
        for j in range(n):
            v[j] = _clamp(_requant((np.int64(y[i, j]) << 8) + np.int64(y[m_rows + i, j]), mult[j], c), RESID_LIMIT)
        _norm16(v, 0, n, gain, gain_shift, eps, RESID_LIMIT)
        for j in range(n):
            x[i, j] = _clamp(x[i, j] + v[j], RESID_LIMIT)


def qkv(y, mult, shift, bias, exp, cos, sin, B, T, nh, nkv, hd, kt, kmax, vc, vmax, slots, qk_norm):
    """:func:`lmcodec.engine.ops_torch.qkv` with ``qk_norm``, in one pass over the rows (a bias: a dictionary's)."""
    _threads()
    has_bias = bias is not None
    b = bias.numpy() if has_bias else np.zeros(1, dtype=np.int64)
    qg, qs, kg, ks, eps = qk_norm
    per_row = slots.shape[0] == B * T != T
    slots2 = (slots.view(B, T) if per_row else slots.expand(B, T)).contiguous()
    cos3, sin3 = (cos.view(B, T, -1), sin.view(B, T, -1)) if per_row else (cos[None], sin[None])
    q16 = np.empty((B * T, nh, hd), np.int16)
    qe = np.empty((B * T, nh), np.int64)
    _qkv_normed(y.numpy(), mult.numpy(), shift, b, has_bias, exp.numpy().reshape(-1), cos3.contiguous().numpy(),
                sin3.contiguous().numpy(), T, nh, nkv, hd, qg.numpy(), qs, kg.numpy(), ks, eps.numpy(),
                kt.numpy(), kmax.numpy(), vc.numpy(), vmax.numpy(), slots2.numpy(), q16, qe)
    return torch.from_numpy(q16), torch.from_numpy(qe)


def add_normed(x, y, mult, shift: int, exp, gain, gain_shift: int, eps) -> None:
    """x += norm16(the product at 16 fractional bits, clamped), clamped (in place): a post norm's add."""
    _threads()
    _add_normed(x.numpy(), y.numpy(), mult.numpy(), shift, exp.numpy().reshape(-1), gain.numpy(), gain_shift,
                eps.numpy())
