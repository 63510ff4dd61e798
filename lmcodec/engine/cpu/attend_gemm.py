"""The spec's attention for many queries of one cache row, on integer GEMMs (the CPU's parallel pass).

:func:`lmcodec.engine.cpu.ops.attend` runs one query at a time: right for a
decoding step (a query or a few per row), but in the parallel pass (a chunk of
up to 2,048 queries of one segment over the same keys) its dot products are
most of the pass.  Here they become int8 products (:func:`lmcodec.engine.cpu.gemm.mm`:
oneDNN's VNNI/AMX kernels, or exact float32 GEMMs), decomposed exactly as the Triton kernels do
(docs/ENGINE.md, "The Triton kernels"):

* scores: ``q16 = 256 hi + lo + 128`` with ``hi = q16 >> 8`` and
  ``lo = (q16 & 255) - 128`` (both int8), so ``s = 256 (hi . k) + (lo . k) +
  128 sum_d k``: one product of the stacked hi and lo rows with the keys;
* value sums: ``w = p vmax`` is in [0, 2^40), ``w = sum_b 256^b (byte_b(w) -
  128) + 128 (2^40 - 1) / 255``: one product of the byte planes with the
  values, plus the offset times the values' column sums.  The top byte (``w >=
  2^32``) is rare -- under 0.1% of a real pass's weights, about one key a query
  -- so where a tile's are few it is added key by key (:func:`_finish`) instead
  of by a fifth GEMM over every key.

int32 sums stay below 2^31 (128 * 127 * 256 for scores; 128 * 127 * 8,192 keys
for values) and int64 totals below 2^61, so every sum is exact.  Between the
two products a numba pass computes, per query and head, exactly the spec's
``z``, its maximum over the query's key set, ``p`` and ``w``; keys outside the
set get ``w = 0``.  So the result equals :func:`cpu.ops.attend`'s bit for bit
(``tests/test_attend_gemm.py``), whatever the tiling.
"""

from __future__ import annotations

import numpy as np
import torch

from ..spec import fixedmath
from ..spec.constants import ATT_D_CAP, ATT_P_SHIFT, ATT_PRESHIFT, ATT_SHIFT, ATT_U_CAP
from . import gemm
from .jit import JIT, njit, prange
from .rows import _EXP2

#: Queries of one cache row per tile: bounds the score and byte-plane buffers
#: (heads x tile x keys: 9 x 256 x 2,048 int32 = 19 MB for SmolLM2).
TILE = 256
#: Use the GEMM path when a cache row has at least this many queries in one call.
MIN_QUERIES = 32
#: The byte planes of a w in [0, 2^40).
PLANES = 5
#: The top byte's weights are added key by key (not by a GEMM) when a tile has at most one in
#: this many of its (query, head, key) entries: a key costs hd int64 products then, against a
#: GEMM's hd products for every entry at BLAS speed.
SPARSE_TOP = 32
#: Top-byte keys a row names for :func:`_finish` (a row with more has its plane searched).
TOP_KEYS = 8


def w_offset(planes: int) -> int:
    """128 (256^planes - 1) / 255: the offset of the low ``planes`` shifted bytes of a w."""
    return 128 * ((1 << (8 * planes)) - 1) // 255


@njit(parallel=True, **JIT)
def _softmax_planes(s, ksum, kmax, qe, a, b, c, group, exp2, lc, planes, total, tops,
                    top_keys):  # pragma: no cover - compiled
    """Per (query n, head g) row m = n * group + g of the stacked scores ``s`` [2 M, L]
    (hi rows, then lo rows): z over its key set, the maximum, p and w = p vmax's five
    shifted bytes into ``planes`` [5, M, L] (keys outside the set: w = 0), sum p into
    ``total`` [M], the count of keys with w >= 2^32 into ``tops`` [M] and the first
    TOP_KEYS of them into ``top_keys`` [M, TOP_KEYS]."""
    M = s.shape[0] // 2
    L = s.shape[1]
    for m in prange(M):
        n = m // group
        n1 = min(a[n], L)
        lo_b, hi_c = b[n], min(c[n], L)
        z = np.empty(L, np.int64)
        zmax = np.int64(-(1 << 62))
        for j in range(L):
            if j < n1 or (j >= lo_b and j < hi_c):
                zj = (np.int64(s[m, j]) * 256 + np.int64(s[M + m, j]) + 128 * ksum[j]) * np.int64(kmax[j])
                z[j] = zj
                zmax = max(zmax, zj)
        sh = ATT_PRESHIFT - qe[m]
        tot = np.int64(0)
        top = 0
        for j in range(L):
            w = np.int64(0)
            if j < n1 or (j >= lo_b and j < hi_c):
                dd = min((zmax - z[j]) >> sh, ATT_D_CAP)
                u = (dd * lc) >> ATT_SHIFT
                if u < ATT_U_CAP:
                    p = exp2[u & 1023] >> ((u >> 10) + ATT_P_SHIFT)
                    tot += p
                    w = p * np.int64(kmax[L + j])      # vmax rides behind kmax (one array)
            for q in range(PLANES):
                planes[q, m, j] = np.int8(((w >> (8 * q)) & 255) - 128)
            top += w >= (np.int64(1) << 32)
        total[m] = tot
        tops[m] = top
        if 0 < top <= TOP_KEYS:                   # name them: w >= 2^32 where its top byte is not 0
            k = 0
            for j in range(L):
                if planes[PLANES - 1, m, j] != -128:
                    top_keys[m, k] = j
                    k += 1


@njit(parallel=True, **JIT)
def _split_heads(q16, group, out):  # pragma: no cover - compiled
    """q16 [t, nh, hd] -> out [nkv, 2 M, hd] int8, M = t * group: for KV head h, row
    n * group + g holds hi = q16 >> 8 of query n's head h * group + g, row M + (same) its
    lo = (q16 & 255) - 128 (so q16 = 256 hi + lo + 128)."""
    t, nh, hd = q16.shape
    M = t * group
    for n in prange(t):
        for head in range(nh):
            h = head // group
            m = n * group + head % group
            for d in range(hd):
                v = np.int32(q16[n, head, d])
                out[h, m, d] = np.int8(v >> 8)
                out[h, M + m, d] = np.int8((v & 255) - 128)


@njit(**JIT)
def _column_sums(keys, values, ksum, vsum):  # pragma: no cover - compiled
    """ksum[j] = sum_d keys[d, j] ([hd, L] int8), vsum[d] = sum_j values[j, d] ([L, hd] int8)."""
    hd, L = keys.shape
    ksum[:] = 0
    vsum[:] = 0
    for d in range(hd):
        for j in range(L):
            ksum[j] += keys[d, j]
    for j in range(L):
        for d in range(hd):
            vsum[d] += values[j, d]


@njit(parallel=True, **JIT)
def _finish(r, dense, offset, vsum, tops, top_keys, top_plane, values, total, out):  # pragma: no cover - compiled
    """out = floor((2 acc + 127 tot) / (2 * 127 tot)), acc = sum_{b < dense} 256^b r_b + offset * vsum,
    and with four ``dense`` planes, the top byte's products key by key: 2^32 (byte_4 + 128) v for
    each key of a row whose byte is not 0 (``tops`` counts them, ``top_keys`` names them where they
    are at most TOP_KEYS, else the row of ``top_plane`` [M, L] is searched)."""
    M = total.shape[0]
    hd = vsum.shape[0]
    L = values.shape[0]
    for m in prange(M):
        den = 127 * total[m]
        acc = np.empty(hd, np.int64)
        for d in range(hd):
            acc[d] = np.int64(offset) * vsum[d]
            for q in range(dense):
                acc[d] += np.int64(r[q * M + m, d]) * (np.int64(1) << (8 * q))
        if dense == PLANES - 1:
            count = tops[m] if tops[m] <= TOP_KEYS else L
            for i in range(count):
                j = top_keys[m, i] if tops[m] <= TOP_KEYS else i
                hi = np.int64(top_plane[m, j]) + 128
                if hi != 0:
                    for d in range(hd):
                        acc[d] += (hi << 32) * np.int64(values[j, d])
        for d in range(hd):
            out[m, d] = (2 * acc[d] + den) // (2 * den)


def usable(crow: torch.Tensor) -> bool:
    """True when a call's queries are runs of at least :data:`MIN_QUERIES` per cache row."""
    n = crow.shape[0]
    return n >= MIN_QUERIES and n // (int(crow.max()) - int(crow.min()) + 1) >= MIN_QUERIES


def attend(q16, qe, kt, kmax, vc, vmax, crow, a, b, c, lc: int | None = None) -> torch.Tensor:
    """:func:`lmcodec.engine.cpu.ops.attend`'s result [N, nh, hd] int64, in tiles of queries
    of one cache row (consecutive queries with the same ``crow``); ``lc``: the scores' base-2
    constant (default: 1/sqrt(head dim)'s)."""
    n_q, nh, hd = q16.shape
    nkv = kt.shape[1]
    group = nh // nkv
    out = torch.empty((n_q, nh, hd), dtype=torch.int64)      # contiguous: tiles write through numpy views
    rows = crow.numpy()
    lc = fixedmath.att_log2e(hd) if lc is None else lc
    work = _Work(min(TILE, n_q) * group, hd, nkv, int(max(int(c.max()), int(a.max()))))
    start = 0
    while start < n_q:
        stop = start + 1
        while stop < n_q and stop - start < TILE and rows[stop] == rows[start]:
            stop += 1
        _tile(q16[start:stop], qe[start:stop], kt, kmax, vc, vmax, int(rows[start]), a[start:stop],
              b[start:stop], c[start:stop], group, lc, work, out[start:stop])
        start = stop
    return out


class _Work:
    """A call's buffers, sized once for its largest tile (``M`` query-head rows, ``L`` keys)
    and viewed smaller by each tile.  Tiles' key counts grow along a chunk; buffers allocated
    per tile would be a new, larger size each time, which the heap cannot reuse, and the
    process would keep hundreds of MB it no longer uses."""

    def __init__(self, M: int, hd: int, nkv: int, L: int):
        self.stacked = np.empty(nkv * 2 * M * hd, dtype=np.int8)
        self.planes = torch.empty(PLANES * M * L, dtype=torch.int8)
        self.scores = torch.empty(2 * M * L, dtype=torch.int32)
        self.sums = torch.empty(PLANES * M * hd, dtype=torch.int32)
        self.total, self.res = np.empty(M, dtype=np.int64), np.empty(M * hd, dtype=np.int64)
        self.tops, self.top_keys = np.empty(M, dtype=np.int64), np.empty((M, TOP_KEYS), dtype=np.int64)
        self.ksum, self.vsum = np.empty(L, dtype=np.int64), np.empty(hd, dtype=np.int64)


def _view(flat, *shape):
    """The first prod(shape) entries of a flat buffer, as a contiguous array of that shape."""
    return flat[:int(np.prod(shape))].reshape(shape)


def _tile(q16, qe, kt, kmax, vc, vmax, r, a, b, c, group, lc, work: _Work, out) -> None:
    """One tile of queries of cache row ``r`` against its keys [0, max c), head by KV head."""
    t, nh, hd = q16.shape
    nkv = kt.shape[1]
    L = int(max(int(c.max()), int(a.max())))
    an, bn, cn = a.numpy(), b.numpy(), c.numpy()
    M = t * group
    stacked = _view(work.stacked, nkv, 2 * M, hd)
    _split_heads(q16.numpy(), group, stacked)
    qe_heads = qe.numpy().reshape(t, nkv, group).transpose(1, 0, 2).reshape(nkv, M)
    planes = _view(work.planes, PLANES * M, L)
    scores, sums = _view(work.scores, 2 * M, L), _view(work.sums, PLANES * M, hd)
    total, res, tops, top_keys = work.total[:M], _view(work.res, M, hd), work.tops[:M], work.top_keys[:M]
    ksum, vsum = work.ksum[:L], work.vsum
    out_a = out.numpy().reshape(t, nkv, group, hd)
    for h in range(nkv):
        keys, values = kt[r, h, :, :L], vc[r, h, :L]                   # [hd, L], [L, hd] int8
        _column_sums(keys.numpy(), values.numpy(), ksum, vsum)
        s = gemm.mm(torch.from_numpy(stacked[h]), keys, scores).numpy()          # [2M, L] int32
        mags = np.concatenate([kmax[r, h, :L].numpy(), vmax[r, h, :L].numpy()])
        planes_a = planes.numpy().reshape(PLANES, M, L)
        _softmax_planes(s, ksum, mags, qe_heads[h], an, bn, cn, group, _EXP2, lc, planes_a, total, tops, top_keys)
        dense = PLANES - 1 if int(tops.sum()) * SPARSE_TOP <= M * L else PLANES
        rr = gemm.mm(planes[:dense * M], values, sums[:dense * M]).numpy()
        _finish(rr, dense, w_offset(dense), vsum, tops, top_keys, planes_a[PLANES - 1], values.numpy(), total,
                res)
        out_a[:, h] = res.reshape(t, group, hd)
