"""Exact attention over the int8 KV cache as a Triton kernel (``attend`` of lmcodec/engine/triton/ops.py).

docs/ENGINE.md's attention: scores of int16 queries against int8 keys, the
fixed-point softmax (a table of 2^-f and shifts), and the value sums, all exact
integers.  Both products run on int8 tensor cores: the query as two int8 halves,
each key weight p * vmax as five bytes (see :func:`_scores`, :func:`_value_sums`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..spec import constants as spec
from ..spec import fixedmath
from . import ints as ti
from .ints import (
    ATT_D_CAP,
    ATT_P_SHIFT,
    ATT_PRESHIFT,
    ATT_SHIFT,
    ATT_U_CAP,
    MAX_SHIFT,
    MIN_DOT,
    MIN_DOT_K,
    NO_KEY,
    W_OFFSET,
    check_cache,
    exp2_table,
    expect,
    floor_div,
)


@triton.jit
def _scores(q_parts, k_base, km_base, skd, kp_base, low, j0, lo, hi, hd, WINDOWED: tl.constexpr,
            GROUP: tl.constexpr, PARTS: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """z = (q16 . k8) * kmax for the keys j0 .. j0 + BLOCK_S of [lo, hi): [GROUP, BLOCK_S] int64.
    WINDOWED (a local layer of Gemma 3): only keys whose position (``kp_base[j]``) is ``low`` or later.

    One int8 MMA: ``q_parts`` stacks the group's queries as PARTS blocks of rows
    (hi, lo, then zeros up to NVIDIA's 16 rows), with q16 = 256 hi + lo + 128,
    hi = q16 >> 8 and lo = (q16 & 255) - 128 in [-128, 127] for every int16; so
    s = 256 (hi . k) + (lo . k) + 128 sum(k), every int32 sum exact
    (|hi . k| <= 256 * 128 * 127 < 2^22) and |s| < 2^31 (docs/ENGINE.md).
    """
    j = j0 + tl.arange(0, BLOCK_S)
    valid = (j >= lo) & (j < hi)
    if WINDOWED:
        valid = valid & (tl.load(kp_base + j, mask=valid, other=0) >= low)
    d = tl.arange(0, HD_PAD)
    k = tl.load(k_base + d[:, None] * skd + j[None, :], mask=(d[:, None] < hd) & valid[None, :], other=0)
    y = tl.reshape(tl.dot(q_parts, k, out_dtype=tl.int32), (PARTS, GROUP, BLOCK_S))
    part = tl.arange(0, PARTS)[:, None, None]
    s = tl.sum(tl.where(part == 0, y << 8, tl.where(part == 1, y, 0)), axis=0)
    s += (tl.sum(k.to(tl.int32), axis=0) << 7)[None, :]
    z = s.to(tl.int64) * tl.load(km_base + j, mask=valid, other=0).to(tl.int64)[None, :]
    return z, j, valid


@triton.jit
def _max_score(zmax, q_parts, k_base, km_base, skd, kp_base, low, lo, hi, hd, WINDOWED: tl.constexpr,
               GROUP: tl.constexpr, PARTS: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """Pass 1 over the keys [lo, hi): the running max of z per head."""
    for j0 in range(lo, hi, BLOCK_S):
        z, j, valid = _scores(q_parts, k_base, km_base, skd, kp_base, low, j0, lo, hi, hd, WINDOWED, GROUP, PARTS,
                              HD_PAD, BLOCK_S)
        zmax = tl.maximum(zmax, tl.max(tl.where(valid[None, :], z, NO_KEY), axis=1))
    return zmax


@triton.jit
def _value_sums(tot, acc, zmax, sh, q_parts, k_base, km_base, skd, kp_base, low, v_base, vm_base, svs, exp2_ptr,
                lc, lo, hi, hd, WINDOWED: tl.constexpr, GROUP: tl.constexpr, PARTS: tl.constexpr,
                BYTES: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """Pass 2 over the keys [lo, hi): p per key (the fixed-point softmax), tot += sum p, acc += sum p vmax v8.

    w = p * vmax is in [0, 2^40) (p <= 2^16, vmax < 2^24), so w = sum_{b<5} 256^b (byte_b - 128)
    + W_OFFSET.  One int8 MMA takes the five shifted bytes of every head's weights
    stacked as BYTES blocks of rows (zeros past the fifth): int32 sums below
    128 * 127 * BLOCK_S; with the column sums of v times W_OFFSET that is
    sum_j w_j v_jd exactly.  int64 sums wrap modulo 2^64, so every partial is exact
    and the total (< 2^61, docs/ENGINE.md) is the true one.
    """
    dv = tl.arange(0, HD_PAD)
    byte = tl.arange(0, BYTES)[:, None, None]
    # Shift counts stay below 64 for every padding row too (BYTES is 16 for one head per KV head):
    # a 64-bit shift by >= 64 is poison to LLVM, and the compiled kernel summed garbage (the
    # interpreter does not).  Padding rows hold zero digits, so their products are 0 at shift 0.
    shift = tl.where(byte < 5, byte * 8, 0)
    for j0 in range(lo, hi, BLOCK_S):
        z, j, valid = _scores(q_parts, k_base, km_base, skd, kp_base, low, j0, lo, hi, hd, WINDOWED, GROUP, PARTS,
                              HD_PAD, BLOCK_S)
        # zmax >= z on every valid key; the clamp at 0 only touches masked lanes (no negative shifts).
        # From here on int32 does: d <= 2^30, and (d * lc) >> 36 is the high word of the
        # 64-bit product (d, lc < 2^31) shifted by 4; u <= 17 * 1024; EXP2 <= 2^30; p <= 2^16.
        dd = tl.minimum(tl.maximum((zmax[:, None] - z) >> sh[:, None], 0), ATT_D_CAP).to(tl.int32)
        u = tl.minimum(tl.umulhi(dd, lc) >> (ATT_SHIFT - 32), ATT_U_CAP)
        p = tl.load(exp2_ptr + (u & 1023)) >> ((u >> 10) + ATT_P_SHIFT)
        p = tl.where(valid[None, :] & (u < ATT_U_CAP), p, 0)
        tot += tl.sum(p, axis=1).to(tl.int64)               # < 2^16 * BLOCK_S per tile
        w = p.to(tl.int64) * tl.load(vm_base + j, mask=valid, other=0).to(tl.int64)[None, :]
        v = tl.load(v_base + j[:, None] * svs + dv[None, :], mask=valid[:, None] & (dv[None, :] < hd), other=0)
        digits = tl.where(byte < 5, ((w[None, :, :] >> shift) & 255) - 128, 0).to(tl.int8)
        y = tl.dot(tl.reshape(digits, (BYTES * GROUP, BLOCK_S)), v, out_dtype=tl.int32)
        y = tl.reshape(y, (BYTES, GROUP, HD_PAD)).to(tl.int64)
        acc += tl.sum(y << shift, axis=0) + tl.sum(v.to(tl.int64), axis=0)[None, :] * W_OFFSET
    return tot, acc


@triton.jit
def _attend_kernel(q_ptr, qe_ptr, kt_ptr, kmax_ptr, vc_ptr, vmax_ptr, crow_ptr, a_ptr, b_ptr, c_ptr, kpos_ptr,
                   low_ptr, exp2_ptr, out_ptr, nh, hd, group, lc, skt_r, skt_h, skt_d, skm_r, skm_h, svc_r, svc_h,
                   svc_s, svm_r, svm_h, skp_r, WINDOWED: tl.constexpr, GROUP: tl.constexpr, PARTS: tl.constexpr,
                   BYTES: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """One query's heads of one KV head over its key set [0, a) + [max(a, b), c) of cache row crow
    (WINDOWED: only its keys at position ``low[n]`` or later, by the cache's key positions ``kpos``).

    Two passes, because p depends on the maximum over the whole set through floors
    and a table (no exact rescaling as in flash attention): pass 1 reads K for the
    max score, pass 2 reads K again (mostly from L2) and V.  The softmax runs on
    [GROUP, keys] tiles (the group's heads, padded to a power of two); only the
    MMAs' operands are stacked up to NVIDIA's 16 rows.
    """
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    r = tl.load(crow_ptr + n)
    a = tl.load(a_ptr + n)
    b = tl.maximum(tl.load(b_ptr + n), a)                   # the two ranges never overlap
    c = tl.load(c_ptr + n)
    g = tl.arange(0, GROUP)
    dq = tl.arange(0, HD_PAD)
    rows = n * nh + h * group + g
    mask = (g[:, None] < group) & (dq[None, :] < hd)
    q = tl.load(q_ptr + rows[:, None] * hd + dq[None, :], mask=mask, other=0).to(tl.int32)[None, :, :]
    part = tl.arange(0, PARTS)[:, None, None]
    q_parts = tl.where(part == 0, q >> 8, tl.where(part == 1, (q & 255) - 128, 0)).to(tl.int8)
    q_parts = tl.reshape(q_parts, (PARTS * GROUP, HD_PAD))
    sh = tl.minimum(tl.maximum(-tl.load(qe_ptr + rows, mask=g < group, other=0) + ATT_PRESHIFT, 0), MAX_SHIFT)
    k_base = kt_ptr + r * skt_r + h * skt_h
    km_base = kmax_ptr + r * skm_r + h * skm_h
    v_base = vc_ptr + r * svc_r + h * svc_h
    vm_base = vmax_ptr + r * svm_r + h * svm_h
    kp_base = kpos_ptr + r * skp_r
    low = tl.load(low_ptr + n)                               # (without WINDOWED: a dummy, never compared)
    zmax = tl.full([GROUP], NO_KEY, tl.int64)
    zmax = _max_score(zmax, q_parts, k_base, km_base, skt_d, kp_base, low, 0, a, hd, WINDOWED, GROUP, PARTS, HD_PAD,
                      BLOCK_S)
    zmax = _max_score(zmax, q_parts, k_base, km_base, skt_d, kp_base, low, b, c, hd, WINDOWED, GROUP, PARTS, HD_PAD,
                      BLOCK_S)
    tot = tl.zeros([GROUP], tl.int64)
    acc = tl.zeros([GROUP, HD_PAD], tl.int64)
    tot, acc = _value_sums(tot, acc, zmax, sh, q_parts, k_base, km_base, skt_d, kp_base, low, v_base, vm_base,
                           svc_s, exp2_ptr, lc, 0, a, hd, WINDOWED, GROUP, PARTS, BYTES, HD_PAD, BLOCK_S)
    tot, acc = _value_sums(tot, acc, zmax, sh, q_parts, k_base, km_base, skt_d, kp_base, low, v_base, vm_base,
                           svc_s, exp2_ptr, lc, b, c, hd, WINDOWED, GROUP, PARTS, BYTES, HD_PAD, BLOCK_S)
    # The best key has p = 2^16, so den > 0 -- except for a padding column of a local layer (it reads
    # slot 0, outside its window): no key, tot = acc = 0, and it gets 0 (discarded), as in ops_torch.
    den = 127 * tot
    out = floor_div(2 * acc + den[:, None], 2 * tl.maximum(den, 1)[:, None])
    tl.store(out_ptr + rows[:, None] * hd + dq[None, :], out, mask=mask)


def attend(q16, qe, kt, kmax, vc, vmax, crow, a, b, c, window=None, lc: int | None = None) -> torch.Tensor:
    """Exact attention (docs/ENGINE.md): query n over slots [0, a[n]) + [b[n], c[n]) of cache row crow[n].

    ``window`` (a local layer, Gemma 3): ``(key positions [rows, slots], lowest position [N])``;
    ``lc``: the scores' base-2 constant (default: that of 1/sqrt(head dim)); ops_torch.attend's contract.
    """
    expect(q16, torch.int16, 3)
    n_q, nh, hd = q16.shape
    nkv = kt.shape[1]
    expect(qe, torch.int64, 2, n_q, nh)
    check_cache(kt, kmax, vc, vmax, nkv, hd)
    for t in (crow, a, b, c):
        expect(t, torch.int64, 1, n_q)
    if nh % nkv or hd % 2 or hd > spec.MAX_HEAD_DIM or kt.shape[3] > spec.MAX_KEYS:
        raise ValueError(f"attend: {nh} heads over {nkv}, head dim {hd} (<= {spec.MAX_HEAD_DIM}), "
                         f"{kt.shape[3]} slots (<= {spec.MAX_KEYS})")
    group = triton.next_power_of_2(nh // nkv)               # SmolLM2: 3 query heads per KV head -> 4 rows
    parts = max(2, MIN_DOT // group)                         # hi, lo, zeros: the QK operand has >= 16 rows
    n_bytes = max(8, MIN_DOT // group)                       # 5 bytes of w, zeros: the PV operand too
    hd_pad = max(MIN_DOT_K, triton.next_power_of_2(hd))      # zero dims pad the QK reduction to >= 32
    assert ti.BLOCKS.keys >= MIN_DOT_K, "the PV product reduces over ti.BLOCKS.keys keys: int8 MMA needs >= 32"
    if window is not None:
        kpos, lowest = window
        expect(kpos, torch.int64, 2, kt.shape[0], kt.shape[3])
        expect(lowest, torch.int64, 1, n_q)
        if kpos.stride(1) != 1:
            raise ValueError("key positions need their slots contiguous")
    else:
        kpos, lowest = crow, crow                            # not read (WINDOWED off)
    lc = lc or fixedmath.att_log2e(hd)
    assert 0 < lc < 1 << 31, "the kernel takes (d * LOG2E_ATT) >> 36 as a 32-bit high multiply"
    out = torch.empty((n_q, nh, hd), dtype=torch.int64, device=q16.device)
    if n_q:
        _attend_kernel[(n_q, nkv)](
            q16.contiguous(), qe.contiguous(), kt, kmax, vc, vmax, crow.contiguous(), a.contiguous(),
            b.contiguous(), c.contiguous(), kpos, lowest.contiguous(), exp2_table(q16.device, torch.int32), out, nh,
            hd, nh // nkv, lc, kt.stride(0), kt.stride(1), kt.stride(2), kmax.stride(0), kmax.stride(1),
            vc.stride(0), vc.stride(1), vc.stride(2), vmax.stride(0), vmax.stride(1), kpos.stride(0),
            WINDOWED=window is not None, GROUP=group, PARTS=parts, BYTES=n_bytes, HD_PAD=hd_pad, BLOCK_S=ti.BLOCKS.keys)
    return out
