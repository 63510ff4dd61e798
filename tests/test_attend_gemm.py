"""Attention on integer GEMMs (lmcodec.engine.cpu.attend_gemm) equals the per-query kernel bit for bit.

The parallel pass's attention runs on torch._int_mm with the scores split into the hi and
lo bytes of q16 and the value sums into the five bytes of p * vmax; these cases put every
value at the spec's limits (|q16| = 32767, k8 and v8 at +-127, kmax and vmax near 2^24) and
every shape of key set the callers make: the prefix and a window, a window wrapping around
a ring ([0, hi) + [lo, end)), keys past the set holding garbage, rows of different lengths,
several cache rows, tiles cut inside a row.  The engine-level proof is tests/test_exact.py
(the real model's parallel pass against the reference), which now runs through this path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmcodec.engine.cpu import attend_gemm
from lmcodec.engine.cpu import ops as ops_cpu
from lmcodec.engine.cpu import rows as cpu_rows
from lmcodec.engine.spec import fixedmath


def per_query(*args):
    """ops_cpu's per-query kernel, whatever the call's shape."""
    q16, qe, kt, kmax, vc, vmax, crow, a, b, c = args
    out = np.empty(tuple(q16.shape), dtype=np.int64)
    cpu_rows._attend(q16.numpy(), qe.numpy(), kt.numpy(), kmax.numpy(), vc.numpy(), vmax.numpy(), crow.numpy(),
                     a.numpy(), b.numpy(), c.numpy(), cpu_rows.NO_KEY_POSITIONS, cpu_rows.NO_LOWEST, False,
                     cpu_rows._EXP2, fixedmath.att_log2e(q16.shape[-1]), out)
    return torch.from_numpy(out)


def case(rng, rows, slots, nh, nkv, hd, queries, extreme):
    lim = 32767 if extreme else 3000
    q16 = torch.from_numpy(rng.integers(-lim, lim + 1, (rows * queries, nh, hd)).astype(np.int16))
    if extreme:
        q16[0] = 32767
        q16[1] = -32767
    qe = torch.from_numpy(rng.integers(0, 12, (rows * queries, nh)).astype(np.int64))
    kt = torch.from_numpy(rng.integers(-127, 128, (rows, nkv, hd, slots)).astype(np.int8))
    vc = torch.from_numpy(rng.integers(-127, 128, (rows, nkv, slots, hd)).astype(np.int8))
    top = (1 << 24) - 1 if extreme else 1 << 12
    kmax = torch.from_numpy(rng.integers(1, top + 1, (rows, nkv, slots)).astype(np.int32))
    vmax = torch.from_numpy(rng.integers(1, top + 1, (rows, nkv, slots)).astype(np.int32))
    if extreme:
        kt[..., :4] = 127
        vc[:, :, :4] = -127
        kmax[..., :4] = top
        vmax[..., :4] = top
    crow = torch.arange(rows).repeat_interleave(queries)
    P = 5
    pos = torch.arange(queries).repeat(rows) + P
    end = pos + 1
    window = slots // 2
    lo = torch.clamp(pos - window + 1, min=P)
    # Three shapes of key set: the whole causal prefix; prefix + window; a window wrapping a ring.
    kind = torch.from_numpy(rng.integers(0, 3, rows * queries))
    a = torch.where(kind == 0, torch.zeros_like(pos), torch.full_like(pos, P))
    b = torch.where(kind == 0, torch.zeros_like(pos), lo)
    c = end.clone()
    wrap = kind == 2
    a[wrap] = torch.clamp(end[wrap] - window // 2, min=1)
    b[wrap] = torch.clamp(end[wrap] + 2, max=slots - 1)
    c[wrap] = slots
    return q16, qe, kt, kmax, vc, vmax, crow, a, b, c


@pytest.mark.parametrize("seed,rows,nh,nkv,hd,queries,extreme", [
    (0, 1, 9, 3, 64, 70, True), (1, 2, 4, 2, 16, 40, True), (2, 3, 9, 3, 64, 300, False),
    (3, 1, 2, 1, 256, 33, True), (4, 2, 6, 2, 32, 257, True)])
def test_gemm_attention_equals_the_per_query_kernel(seed, rows, nh, nkv, hd, queries, extreme):
    rng = np.random.default_rng(seed)
    args = case(rng, rows, queries + 8, nh, nkv, hd, queries, extreme)
    assert attend_gemm.usable(args[6])
    assert torch.equal(attend_gemm.attend(*args), per_query(*args))
    assert torch.equal(ops_cpu.attend(*args), per_query(*args))


def test_a_decoding_step_keeps_the_per_query_kernel():
    assert not attend_gemm.usable(torch.arange(8))                  # one query per row
    assert not attend_gemm.usable(torch.arange(4).repeat_interleave(9))
    assert attend_gemm.usable(torch.zeros(40, dtype=torch.int64))


@pytest.mark.parametrize("sparse_top", [1, 10**9])
@pytest.mark.parametrize("seed,extreme", [(5, True), (6, False)])
def test_the_top_byte_key_by_key_or_by_a_gemm(monkeypatch, sparse_top, seed, extreme):
    """Every tile's top byte (w >= 2^32) added key by key (sparse_top 1), or by the fifth GEMM
    wherever a tile has one (10^9): the same integers as the per-query kernel either way.  Every
    fifth key's vmax is 2^20 or more, so the tiles hold some top bytes and not only top bytes, and
    rows with a few (named in top_keys) and, at the extremes, rows with more (their plane searched)."""
    monkeypatch.setattr(attend_gemm, "SPARSE_TOP", sparse_top)
    seen = []
    softmax_planes = attend_gemm._softmax_planes

    def spy(*args):
        softmax_planes(*args)
        seen.extend(args[-2].tolist())
    monkeypatch.setattr(attend_gemm, "_softmax_planes", spy)
    rng = np.random.default_rng(seed)
    args = case(rng, 2, 48 + 8, 9, 3, 64, 48, extreme)
    args[5][..., ::5] = (1 << 24) - 1 if extreme else 1 << 20
    if extreme:
        args[0][2:6] = 0                    # flat: every key of these queries weighs 2^16
    assert torch.equal(attend_gemm.attend(*args), per_query(*args))
    assert any(0 < t <= attend_gemm.TOP_KEYS for t in seen)
    assert max(seen) > attend_gemm.TOP_KEYS or not extreme


def test_w_offsets():
    for planes in (4, 5):
        w = np.random.default_rng(planes).integers(0, 1 << (8 * planes), 1000, dtype=np.int64)
        shifted = sum(((w >> (8 * q)) & 255) - 128 << (8 * q) for q in range(planes))
        assert np.array_equal(shifted + attend_gemm.w_offset(planes), w)
