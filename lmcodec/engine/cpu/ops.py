"""The exact engine's integer steps as fused numba kernels (the CPU path).

Same functions, same results as :mod:`lmcodec.engine.ops_torch`, which spells each
step as tensor operations: on a CPU those make a dozen passes over int64
arrays per step, here every row is one pass with its values in registers.
Each kernel follows docs/ENGINE.md line by line; ``tests/test_exact.py``
checks both modules against the plain reference.

numba compiles the kernels on first use (a few seconds, cached on disk under
lmcodec's cache directory).  Integer arithmetic is exact, so the thread split
does not matter.  The per-value and per-row helpers the kernels inline live in
:mod:`lmcodec.engine.cpu.rows` (shared with the fused step, :mod:`lmcodec.engine.cpu.fused`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..spec import fixedmath
from ..spec.constants import (
    ACT_FRAC,
    ACT_MAX,
    LOG2E_OUT,
    MLP_LIMIT,
    OUT_D_CAP,
    OUT_PRE_LIMIT,
    OUT_U_CAP,
    QKV_LIMIT,
    RESID_FRAC,
    RESID_LIMIT,
)
from . import attend_gemm
from .jit import JIT, sync_threads
from .rows import (
    _EXP2,
    _SIG_BITS,
    _SIG_SHIFT,
    _SIG_SPAN,
    NO_ARRAY,
    NO_KEY_POSITIONS,
    NO_LOWEST,
    _attend,
    _clamp,
    _fit,
    _norm16,
    _norm_row,
    _qkv_heads,
    _requant,
    _rshift,
    njit,
    prange,
)


@njit(parallel=True, **JIT)
def _norm(x, gain, gain_shift, eps, out, exp):  # pragma: no cover - compiled
    for i in prange(x.shape[0]):
        exp[i] = _norm_row(x[i], gain, gain_shift, eps, out[i])


@njit(inline="always", **JIT)
def _split_row(h, out, i):
    m_rows, k = h.shape
    for j in range(k):
        v = np.int64(h[i, j])
        hi = (v + 128) >> 8
        out[i, j] = hi
        out[m_rows + i, j] = v - (hi << 8)


@njit(**JIT)
def _split(h, out):  # pragma: no cover - compiled
    for i in range(h.shape[0]):
        _split_row(h, out, i)


@njit(parallel=True, **JIT)
def _split_parallel(h, out):  # pragma: no cover - compiled
    for i in prange(h.shape[0]):
        _split_row(h, out, i)


@njit(parallel=True, **JIT)
def _operand(x, limit, out, shift):  # pragma: no cover - compiled
    m_rows, k = x.shape
    for i in prange(m_rows):
        m = np.int64(0)
        for j in range(k):
            m = max(m, abs(x[i, j]))
        s = _fit(m, limit)
        for j in range(k):
            out[i, j] = _rshift(x[i, j], s)
        shift[i] = s


@njit(parallel=True, **JIT)
def _residual_add(x, y, mult, shift, exp):  # pragma: no cover - compiled
    m_rows, n = x.shape
    for i in prange(m_rows):
        c = shift - exp[i] - RESID_FRAC
        for j in range(n):
            v = (np.int64(y[i, j]) << 8) + np.int64(y[m_rows + i, j])
            x[i, j] = _clamp(x[i, j] + _requant(v, mult[j], c), RESID_LIMIT)


@njit(parallel=True, **JIT)
def _add_normed(x, y, mult, shift, exp, gain, gain_shift, eps):  # pragma: no cover - compiled
    m_rows, n = x.shape
    for i in prange(m_rows):
        c = shift - exp[i] - RESID_FRAC
        v = np.empty(n, np.int64)
        for j in range(n):
            v[j] = _clamp(_requant((np.int64(y[i, j]) << 8) + np.int64(y[m_rows + i, j]), mult[j], c), RESID_LIMIT)
        _norm16(v, 0, n, gain, gain_shift, eps, RESID_LIMIT)
        for j in range(n):
            x[i, j] = _clamp(x[i, j] + v[j], RESID_LIMIT)


@njit(parallel=True, **JIT)
def _qkv(y, mult, shift, bias, has_bias, exp, cos, sin, n_t, nh, nkv, hd, kt, kmax, vc, vmax, slots,
         q16, qe, has_qk, qg, qs, kg, ks, eps):  # pragma: no cover - compiled
    m_rows = exp.shape[0]
    n = y.shape[1]
    per_row = cos.shape[0] > 1
    for i in prange(m_rows):
        b = i // n_t
        t = i % n_t
        slot = slots[b, t]
        cs = cos[b] if per_row else cos[0]
        sn = sin[b] if per_row else sin[0]
        c = shift - exp[i] - ACT_FRAC
        vals = np.empty(n, np.int64)
        for j in range(n):
            v = _requant((np.int64(y[i, j]) << 8) + np.int64(y[m_rows + i, j]), mult[j], c)
            if has_bias:
                v += bias[j]
            vals[j] = _clamp(v, QKV_LIMIT)
        if has_qk:  # Gemma 3: each q and k head vector's norm16 before RoPE
            for h in range(nh):
                _norm16(vals, h * hd, hd, qg, qs, eps, QKV_LIMIT)
            for h in range(nkv):
                _norm16(vals, (nh + h) * hd, hd, kg, ks, eps, QKV_LIMIT)
        _qkv_heads(vals, cs, sn, t, nh, nkv, hd, q16[i], qe[i], kt[b], kmax[b], vc[b], vmax[b], slot)


@njit(parallel=True, **JIT)
def _mlp(y, mult, shift, exp, sig, out, oshift):  # pragma: no cover - compiled
    m_rows = exp.shape[0]
    inter = y.shape[1] // 2
    for i in prange(m_rows):
        c = shift - exp[i] - ACT_FRAC
        a = np.empty(inter, np.int64)
        m = np.int64(0)
        for j in range(inter):
            g = _clamp(_requant((np.int64(y[i, j]) << 8) + np.int64(y[m_rows + i, j]), mult[j], c), MLP_LIMIT)
            jj = inter + j
            u = _clamp(_requant((np.int64(y[i, jj]) << 8) + np.int64(y[m_rows + i, jj]), mult[jj], c), MLP_LIMIT)
            idx = _clamp(_rshift(g, _SIG_SHIFT), _SIG_SPAN)
            v = _rshift(g * sig[idx + _SIG_SPAN], _SIG_BITS) * u
            a[j] = v
            m = max(m, abs(v))
        s = _fit(m, ACT_MAX)
        for j in range(inter):
            out[i, j] = _rshift(a[j], s)
        oshift[i] = s


@njit(parallel=True, **JIT)
def _gaps(y, mult, exp, out):  # pragma: no cover - compiled
    n_rows = exp.shape[0]
    vocab = y.shape[1]
    for i in prange(n_rows):
        lam = np.empty(vocab, np.int64)
        top = np.int64(-(1 << 62))
        for v in range(vocab):
            lam[v] = ((np.int64(y[i, v]) << 8) + np.int64(y[n_rows + i, v])) * mult[v]
            top = max(top, lam[v])
        s = 20 - exp[i]
        pre = max(s - OUT_PRE_LIMIT, 0)
        rest = max(s - pre, 0)
        for v in range(vocab):
            out[i, v] = min(((min((top - lam[v]) >> pre, OUT_D_CAP)) * LOG2E_OUT) >> rest, OUT_U_CAP)


# -- the same interface as ops_torch ------------------------------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    return t.numpy()


#: This backend computes Gemma 3's forms of the shared steps: attention over a window with any
#: scale, the MLP with the gate table it is given, qkv with the q/k norms, and add_normed
#: (gemma.steps_for).
GEMMA_STEPS = True


def _empty(shape, dtype) -> tuple[torch.Tensor, np.ndarray]:
    """A new output array and the tensor on the same memory (numpy allocates faster than torch.empty)."""
    arr = np.empty(shape, dtype=dtype)
    return torch.from_numpy(arr), arr


SPLIT_PARALLEL_ROWS = 64


def split(h16: torch.Tensor) -> torch.Tensor:
    """int16 operand rows (|v| <= 32639) -> [hi rows; lo rows] int8 with v = 256 hi + lo, in one pass."""
    out, arr = _empty((2 * h16.shape[0], h16.shape[1]), np.int8)
    src = _np(h16.contiguous())
    if h16.shape[0] >= SPLIT_PARALLEL_ROWS:
        sync_threads()
        _split_parallel(src, arr)
    else:  # a decoding step's few rows: starting threads costs more than the pass
        _split(src, arr)
    return out


def norm(x, gain, gain_shift, eps):
    sync_threads()
    out, out_a = _empty(x.shape, np.int16)
    exp, exp_a = _empty((x.shape[0], 1), np.int64)
    _norm(_np(x), _np(gain), gain_shift, _np(eps), out_a, exp_a.reshape(-1))
    return out, exp


def operand(x, limit: int = ACT_MAX):
    sync_threads()
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    out, out_a = _empty(x2.shape, np.int16)
    shift, shift_a = _empty((x2.shape[0], 1), np.int64)
    _operand(_np(x2.contiguous()), limit, out_a, shift_a.reshape(-1))
    return out.view(shape), shift.view(*shape[:-1], 1)


def residual_add(x, y, mult, shift, exp) -> None:
    sync_threads()
    _residual_add(_np(x), _np(y), _np(mult), shift, _np(exp).reshape(-1))


def add_normed(x, y, mult, shift: int, exp, gain, gain_shift: int, eps) -> None:
    """x += norm16(the product at 16 fractional bits, clamped), clamped, in one pass (ops_torch.add_normed)."""
    sync_threads()
    _add_normed(_np(x), _np(y), _np(mult), shift, _np(exp).reshape(-1), _np(gain), gain_shift, _np(eps))


def qkv(y, mult, shift, bias, exp, cos, sin, B, T, nh, nkv, hd, kt, kmax, vc, vmax, slots, qk_norm=None):
    """``slots`` [T] or [B*T], ``cos``/``sin`` [T, hd/2] or [B*T, hd/2]; ``qk_norm`` (Gemma 3):
    ``(q gain, shift, k gain, shift, eps)`` (ops_torch.qkv)."""
    sync_threads()
    per_row = slots.shape[0] == B * T != T
    slots2 = (slots.view(B, T) if per_row else slots.expand(B, T)).contiguous()
    cos3, sin3 = (cos.view(B, T, -1), sin.view(B, T, -1)) if per_row else (cos[None], sin[None])
    q16, q16_a = _empty((B * T, nh, hd), np.int16)
    qe, qe_a = _empty((B * T, nh), np.int64)
    has_bias = bias is not None
    b = _np(bias) if has_bias else NO_ARRAY
    qg, qs, kg, ks, eps = (_np(qk_norm[0]), qk_norm[1], _np(qk_norm[2]), qk_norm[3], _np(qk_norm[4])) \
        if qk_norm is not None else (NO_ARRAY, 0, NO_ARRAY, 0, NO_ARRAY)
    _qkv(_np(y), _np(mult), shift, b, has_bias, _np(exp).reshape(-1), _np(cos3.contiguous()), _np(sin3.contiguous()),
         T, nh, nkv, hd, _np(kt), _np(kmax), _np(vc), _np(vmax), _np(slots2), q16_a, qe_a,
         qk_norm is not None, qg, qs, kg, ks, eps)
    return q16, qe


def mlp(y, mult, shift, exp, sigmoid):
    sync_threads()
    m = exp.shape[0]
    out, out_a = _empty((m, y.shape[1] // 2), np.int16)
    oshift, oshift_a = _empty((m, 1), np.int64)
    _mlp(_np(y), _np(mult), shift, _np(exp).reshape(-1), _np(sigmoid), out_a, oshift_a.reshape(-1))
    return out, oshift


def attend(q16, qe, kt, kmax, vc, vmax, crow, a, b, c, window=None, lc: int | None = None):
    """Per query (a decoding step), or on integer GEMMs where a cache row has many queries
    (the parallel pass: :mod:`lmcodec.engine.cpu.attend_gemm`, the same integers).

    ``window`` (a local layer: key positions [rows, slots], each query's lowest visible
    position [N]) and ``lc`` (the scores' base-2 constant; default 1/sqrt(head dim)'s)
    as :func:`lmcodec.engine.ops_torch.attend`: a local layer's queries gather the keys
    inside their window, one query at a time.
    """
    sync_threads()
    lc = fixedmath.att_log2e(q16.shape[-1]) if lc is None else lc
    if window is None and attend_gemm.usable(crow):
        return attend_gemm.attend(q16, qe, kt, kmax, vc, vmax, crow, a, b, c, lc)
    kpos, lowest = (_np(window[0]), _np(window[1])) if window is not None else (NO_KEY_POSITIONS, NO_LOWEST)
    out, out_a = _empty(tuple(q16.shape), np.int64)
    _attend(_np(q16), _np(qe), _np(kt), _np(kmax), _np(vc), _np(vmax), _np(crow), _np(a), _np(b), _np(c),
            kpos, lowest, window is not None, _EXP2, lc, out_a)
    return out


def gaps(y, mult, exp):
    sync_threads()
    n = exp.shape[0]
    out, out_a = _empty((n, y.shape[1]), np.int64)
    _gaps(_np(y), _np(mult), _np(exp).reshape(-1), out_a)
    return out


#: Query rows up to which Engine.forward and Engine.gaps take the fused step (lmcodec.engine.cpu.fused):
#: one kernel per layer, the products on int_dots (AVX-512 VNNI where the CPU has it). More rows go to
#: the general path's GEMMs, which gain more per extra row. Where the two cross is measured with
#: `python -m benchmarks.step --widths 1,9,12,16` (docs/SPEED.md, "Passes of several positions").
FUSED_ROWS = 16


def forward_rows(engine, *args):
    """Engine.forward's layers for at most FUSED_ROWS rows in one kernel per layer (cpu.fused.forward_rows)."""
    from .fused import forward_rows as run
    return run(engine, *args)


def gaps_rows(engine, h16, exp):
    """Engine.gaps for at most FUSED_ROWS rows: head product and gaps in one kernel (cpu.fused.gaps_rows)."""
    from .fused import gaps_rows as run
    return run(engine, h16, exp)
