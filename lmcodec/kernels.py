"""Exact integer attention: one specification, two implementations.

For one query (a token's head) over its keys ``J`` (cache slots ``[0, a)`` and
``[b, c)`` of its cache row), with the query as int16 ``q`` and exponent ``qe``
(real q = q * 2^(qe - 16)), keys and values as int8 with per-(token, head)
magnitudes ``kmax``/``vmax`` (real k = k8 * kmax / 127 * 2^-16):

    s_j  = sum_d q_d * k8_jd                      |s| < 2^28      (int64)
    z_j  = s_j * kmax_j                           |z| < 2^52
    d_j  = min((max_J z - z_j) >> (19 - qe), 2^30)                (qe in [0, 9])
    U_j  = min((d_j * LOG2E_ATT) >> 36, 17 * 1024)    base-2 exponent, 10 fraction bits
    p_j  = EXP2[U_j mod 1024] >> (U_j div 1024 + 14)  in [0, 2^16]
    out_d = round(sum_j p_j vmax_j v8_jd / (127 sum_j p_j))        (halves up)

``LOG2E_ATT = round(2^30 log2(e) / 127)`` folds the 1/sqrt(64) = 2^-3 softmax
scale, the 1/127 of the key scale and the change to base 2, so U_j / 1024 is
(max score - score_j) * log2(e) up to rounding.  Every intermediate is an
integer within the bound written next to it (the context is at most 16,384
keys, so the value sums stay below 2^61), hence every implementation that
follows these lines -- any order of summation, any thread split -- gives the
same bits.

:func:`attend_cpu` is a numba kernel (the CPU path: one pass over the int8
cache per query, nothing materialized); :func:`attend_torch` computes the same
with tensor operations on any device.  ``tests/test_exact.py`` checks both
against the plain reference (:mod:`lmcodec.reference`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from . import fixedmath


def _log2e_over(divisor: int, bits: int) -> int:
    v = fixedmath.log2e(fixedmath.WORK_BITS)
    return ((v << bits) // divisor + (1 << (fixedmath.WORK_BITS - 1))) >> fixedmath.WORK_BITS


#: round(2^30 log2(e) / 127): scores -> base-2 exponent (see the module docstring).
LOG2E_ATT = _log2e_over(127, 30)
ATT_SHIFT = 36
ATT_PRESHIFT = 19
ATT_D_CAP = 1 << 30
ATT_U_CAP = 17 << fixedmath.EXP2_FRAC_BITS
#: The attention weight of the best key, 2^16.
ATT_P_SHIFT = fixedmath.EXP2_VALUE_BITS - 16
MAX_KEYS = 1 << 14
KV_MAX = 127

_EXP2 = fixedmath.exp2_table()


def _numba():
    """Import numba with its cache next to lmcodec's (site-packages may be read-only)."""
    if "NUMBA_CACHE_DIR" not in os.environ:
        from .models import cache_dir
        os.environ["NUMBA_CACHE_DIR"] = str(cache_dir() / "numba")
    import numba
    return numba


_KERNEL = None


def _build_kernel():
    numba = _numba()
    exp2 = _EXP2
    lc, shift, pre, dcap, ucap, pshift = LOG2E_ATT, ATT_SHIFT, ATT_PRESHIFT, ATT_D_CAP, ATT_U_CAP, ATT_P_SHIFT

    @numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def kernel(q16, qe, kc, kmax, vc, vmax, crow, a, b, c, out):  # pragma: no cover - compiled
        n_q, nh, hd = q16.shape
        nkv = kc.shape[1]
        group = nh // nkv
        for item in numba.prange(n_q * nkv):
            n = item // nkv
            h = item % nkv
            r = crow[n]
            n1 = a[n]
            length = n1 + c[n] - b[n]
            z = np.empty((group, length), np.int64)
            zmax = np.full(group, np.int64(-(1 << 62)))
            for jj in range(length):
                j = jj if jj < n1 else b[n] + jj - n1
                km = np.int64(kmax[r, h, j])
                for g in range(group):
                    s = np.int32(0)
                    for d in range(hd):
                        s += np.int32(q16[n, h * group + g, d]) * np.int32(kc[r, h, j, d])
                    zz = np.int64(s) * km
                    z[g, jj] = zz
                    if zz > zmax[g]:
                        zmax[g] = zz
            acc = np.empty(hd, np.int64)
            for g in range(group):
                head = h * group + g
                sh = pre - qe[n, head]
                acc[:] = 0
                total = np.int64(0)
                for jj in range(length):
                    dd = (zmax[g] - z[g, jj]) >> sh
                    if dd > dcap:
                        dd = dcap
                    u = (dd * lc) >> shift
                    if u >= ucap:
                        continue
                    p = exp2[u & 1023] >> ((u >> 10) + pshift)
                    if p == 0:
                        continue
                    total += p
                    j = jj if jj < n1 else b[n] + jj - n1
                    w = p * np.int64(vmax[r, h, j])
                    for d in range(hd):
                        acc[d] += w * np.int64(vc[r, h, j, d])
                den = 127 * total
                for d in range(hd):
                    out[n, head, d] = (2 * acc[d] + den) // (2 * den)

    return kernel


def attend_cpu(q16, qe, kc, kmax, vc, vmax, crow, a, b, c) -> torch.Tensor:
    """The numba kernel on CPU tensors; returns int64 [N, nh, hd] at 16 fractional bits."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    numba = _numba()
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    out = np.empty(tuple(q16.shape), dtype=np.int64)
    _KERNEL(q16.numpy(), qe.numpy(), kc.numpy(), kmax.numpy(), vc.numpy(), vmax.numpy(),
            crow.numpy(), a.numpy(), b.numpy(), c.numpy(), out)
    return torch.from_numpy(out)


def attend_torch(q16, qe, kc, kmax, vc, vmax, crow, a, b, c) -> torch.Tensor:
    """The same specification with tensor operations (any device; memory O(N * S))."""
    n_q, nh, hd = q16.shape
    nkv, slots = kc.shape[1], kc.shape[2]
    group = nh // nkv
    dev = q16.device
    k = kc[crow].to(torch.float64)                                   # [N, nkv, S, hd]
    q = q16.view(n_q, nkv, group, hd).to(torch.float64)
    # |s| < 2^28: exact in float64 on every device (no integer GEMM on CUDA for int64).
    s = torch.matmul(q, k.transpose(-1, -2)).to(torch.int64)          # [N, nkv, G, S]
    z = s * kmax[crow].to(torch.int64)[:, :, None, :]
    j = torch.arange(slots, device=dev)
    valid = (j[None, :] < a[:, None]) | ((j[None, :] >= b[:, None]) & (j[None, :] < c[:, None]))
    valid = valid[:, None, None, :]
    low = torch.tensor(-(1 << 62), dtype=torch.int64, device=dev)
    zmax = torch.where(valid, z, low).amax(dim=-1, keepdim=True)
    sh = (ATT_PRESHIFT - qe).view(n_q, nkv, group, 1)
    d = ((zmax - z) >> sh).clamp(max=ATT_D_CAP)
    u = ((d * LOG2E_ATT) >> ATT_SHIFT).clamp(max=ATT_U_CAP)
    table = torch.as_tensor(_EXP2, device=dev)
    p = table[u & 1023] >> ((u >> 10) + ATT_P_SHIFT)
    p = torch.where(valid & (u < ATT_U_CAP), p, torch.zeros_like(p))
    total = p.sum(dim=-1, keepdim=True)                               # [N, nkv, G, 1]
    w = p * vmax[crow].to(torch.int64)[:, :, None, :]                 # < 2^40
    v = vc[crow].to(torch.float64)                                    # [N, nkv, S, hd]
    # Split w into 20-bit halves so each float64 product sum stays below 2^53.
    hi, lo = w >> 20, w & ((1 << 20) - 1)
    acc = (torch.matmul(hi.to(torch.float64), v).to(torch.int64) << 20) + torch.matmul(
        lo.to(torch.float64), v).to(torch.int64)
    den = 127 * total
    out = torch.div(2 * acc + den, 2 * den, rounding_mode="floor")
    return out.view(n_q, nh, hd)


def attend(*args) -> torch.Tensor:
    """Dispatch on the device: the numba kernel on CPU, tensor operations elsewhere."""
    if args[0].device.type == "cpu":
        return attend_cpu(*args)
    return attend_torch(*args)
