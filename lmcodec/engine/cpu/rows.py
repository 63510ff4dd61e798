"""The numba code both CPU paths share: the helpers their kernels inline, and attention.

docs/ENGINE.md's formulas as numba functions compiled into the kernels that call
them: the rounding shift, the fitting shift, a product's requantization, a
residual row's RMSNorm, RoPE of a head, the int8 cache entries, a query's
q|k|v row to its query operand and cache slot; and the attention kernel
(:func:`_attend`), which both call whole.  Both CPU paths are built from
them -- the general one (:mod:`lmcodec.engine.cpu.ops`) and the fused step
(:mod:`lmcodec.engine.cpu.fused`) -- so they compute the same integers by
construction.  numba is configured by :mod:`lmcodec.engine.cpu.jit`.
"""

from __future__ import annotations

import numpy as np

from ..spec import fixedmath
from ..spec.constants import (
    ACT_FRAC,
    ACT_MAX,
    ATT_D_CAP,
    ATT_P_SHIFT,
    ATT_PRESHIFT,
    ATT_SHIFT,
    ATT_U_CAP,
    KV_MAX,
    Q_MAX,
    QKV_LIMIT,
    RESID_FRAC,
    RESID_LIMIT,
    RSQRT_BITS,
)
from .int_dots import available as _vnni_available
from .jit import (  # it configures numba; int_dots, above, imports it first too
    JIT,
    njit,
    prange,
)
from .value_sums import WIDTH, sums16, sums32, sums64, vnni64

#: Value sums by VNNI byte products (value_sums.vnni64): decided at import, as int_dots' products are.
_VNNI_SUMS = _vnni_available()

_EXP2 = fixedmath.exp2_table()
# The attention's weights drop their branch on U >= ATT_U_CAP (_softmax_values): capped there, the
# formula itself gives the spec's 0.
assert int(_EXP2.max()) >> ((ATT_U_CAP >> fixedmath.EXP2_FRAC_BITS) + ATT_P_SHIFT) == 0
_SIG = fixedmath.sigmoid_table()
_SIG_SPAN = fixedmath.SIGMOID_RANGE << fixedmath.SIGMOID_STEP_BITS
_SIG_SHIFT = ACT_FRAC - fixedmath.SIGMOID_STEP_BITS
_SIG_BITS = fixedmath.SIGMOID_VALUE_BITS
_ROPE_BITS = fixedmath.ROPE_BITS


@njit(inline="always", **JIT)
def _bitlen(m):
    n = 0
    while m >> n:
        n += 1
    return n


@njit(inline="always", **JIT)
def _rshift(x, s):
    return (x + ((np.int64(1) << s) >> 1)) >> s


@njit(inline="always", **JIT)
def _fit(m, limit):
    s = _bitlen(m) - 15
    if s < 0:
        s = 0
    if _rshift(m, s) > limit:
        s += 1
    return s


@njit(inline="always", **JIT)
def _requant(y, mult, c):
    p = y * mult
    if c >= 0:
        return _rshift(p, c)
    if p > (np.int64(1) << 40):
        p = np.int64(1) << 40
    elif p < -(np.int64(1) << 40):
        p = -(np.int64(1) << 40)
    return p << min(-c, 20)


@njit(inline="always", **JIT)
def _clamp(v, lim):
    return lim if v > lim else (-lim if v < -lim else v)


@njit(inline="always", **JIT)
def _rms_scale(v, base, k, eps):
    """An RMSNorm's pre-shift ``s`` and ``r = isqrt(k 2^48 / d)`` over ``v[base:base+k]``
    (docs/ENGINE.md, RMSNorm; shared by the operand norm and Gemma's norm16)."""
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
    return s, r


@njit(inline="always", **JIT)
def _norm16(v, base, k, gain, gain_shift, eps, limit):
    """``v[base:base+k]`` <- Gemma's norm16 of it with ``gain``, clamped to +-limit (in place:
    ``r`` needs the whole span first; docs/ENGINE.md, "Gemma 3")."""
    s, r = _rms_scale(v, base, k, eps)
    c = RSQRT_BITS + gain_shift - RESID_FRAC
    for j in range(k):
        t = _rshift(v[base + j], s) * gain[j] * r
        out = _rshift(t, c) if c >= 0 else _clamp(t, RESID_LIMIT) << min(-c, 20)
        v[base + j] = _clamp(out, limit)


@njit(inline="always", **JIT)
def _norm_row(xr, gain, gain_shift, eps, out):
    """RMSNorm of one residual row ``xr`` into operand row ``out``; returns its exponent
    (one row's whole norm, shared by :func:`_norm` and the fused step, lmcodec.engine.cpu.fused)."""
    k = xr.shape[0]
    s, r = _rms_scale(xr, 0, k, eps)
    mt = np.int64(0)
    for j in range(k):
        mt = max(mt, abs(_rshift(xr[j], s) * gain[j] * r))
    s2 = _fit(mt, ACT_MAX)
    for j in range(k):
        out[j] = _rshift(_rshift(xr[j], s) * gain[j] * r, s2)
    return s2 - RSQRT_BITS - gain_shift


@njit(inline="always", **JIT)
def _rope_head(vals, base, hd, cos, sin, t, out):
    half = hd // 2
    for d in range(half):
        x1 = vals[base + d]
        x2 = vals[base + half + d]
        out[d] = _clamp(_rshift(x1 * cos[t, d] - x2 * sin[t, d], _ROPE_BITS), QKV_LIMIT)
        out[half + d] = _clamp(_rshift(x2 * cos[t, d] + x1 * sin[t, d], _ROPE_BITS), QKV_LIMIT)


@njit(inline="always", **JIT)
def _kv8(vec, hd, out8):
    m = np.int64(0)
    for d in range(hd):
        m = max(m, abs(vec[d]))
    safe = max(m, np.int64(1))
    for d in range(hd):
        out8[d] = (2 * KV_MAX * vec[d] + safe) // (2 * safe)
    return m


@njit(inline="always", **JIT)
def _qkv_heads(vals, cs, sn, t, nh, nkv, hd, q16, qe, kt, kmax, vc, vmax, slot):
    """One query's q|k|v row ``vals`` -> RoPE, its query operand (q16, qe) and its key and
    value written to ``slot`` of its cache row (shared with the fused step)."""
    r = np.empty(hd, np.int64)
    q8 = np.empty(hd, np.int64)
    for h in range(nh):
        _rope_head(vals, h * hd, hd, cs, sn, t, r)
        m = np.int64(0)
        for d in range(hd):
            m = max(m, abs(r[d]))
        s = _fit(m, Q_MAX)
        for d in range(hd):
            q16[h, d] = _rshift(r[d], s)
        qe[h] = s
    for h in range(nkv):
        _rope_head(vals, (nh + h) * hd, hd, cs, sn, t, r)
        kmax[h, slot] = _kv8(r, hd, q8)
        for d in range(hd):
            kt[h, d, slot] = q8[d]
        vmax[h, slot] = _kv8(vals[(nh + nkv + h) * hd:(nh + nkv + h + 1) * hd], hd, q8)
        for d in range(hd):
            vc[h, slot, d] = q8[d]


@njit(inline="always", **JIT)
def _softmax_values(z, key_slots, cnt, vmax, vc, sh, lc, exp2, out):
    """One query head's output from its keys' ``z[m] = s_m kmax`` (m < cnt, the key in cache slot
    ``key_slots[m]`` of its row and KV head; ``vmax`` [slots], ``vc`` [slots, hd]): the maximum,
    the fixed-point exponentials and the rounded weighted mean of the values (docs/ENGINE.md,
    Attention).  No key (cnt 0): all zeros.  In place and in passes a CPU vectorizes: ``z``
    becomes the weights p (no branch: at u = ATT_U_CAP, 2^30 >> (17 + 14) is already the spec's
    0), then the kept keys' slots and ``p vmax`` are compacted to the front of ``key_slots`` and
    ``z`` (an entry is overwritten only after it is read) for :func:`_value_sums`."""
    hd = out.shape[0]
    zmax = np.int64(-(1 << 62))
    for m in range(cnt):
        zmax = max(zmax, z[m])
    for m in range(cnt):
        u = min((min((zmax - z[m]) >> sh, ATT_D_CAP) * lc) >> ATT_SHIFT, ATT_U_CAP)
        z[m] = exp2[u & 1023] >> ((u >> 10) + ATT_P_SHIFT)
    total = np.int64(0)
    for m in range(cnt):
        total += z[m]
    kept = 0
    for m in range(cnt):
        p = z[m]
        j = key_slots[m]
        key_slots[kept] = j
        z[kept] = p * np.int64(vmax[j])
        kept += p != 0
    acc = np.empty(hd, np.int64)
    _value_sums(vc, key_slots, z, kept, acc)
    den = 127 * max(total, np.int64(1))       # a query always sees its own key, but a padding
    for d in range(hd):                       # column of a local layer may see none: then 0
        out[d] = (2 * acc[d] + den) // (2 * den)


@njit(inline="always", **JIT)
def _add_value_rows(vc, js, ws, start, n, acc):
    """acc[d] += sum_{start <= i < n} ws[i] vc[js[i], d], one key at a time."""
    for i in range(start, n):
        w = ws[i]
        vr = vc[js[i]]
        for d in range(acc.shape[0]):
            acc[d] += w * np.int64(vr[d])


@njit(inline="always", **JIT)
def _value_sums(vc, js, ws, n, acc):
    """acc[d] = sum_{i < n} ws[i] vc[js[i], d]: where the head dim allows, value_sums' VNNI byte
    products four keys at a time (the last n mod 4 keys in a plain loop), or its register-resident
    int64 runs on a CPU without VNNI; else a plain loop.  The same integers every way."""
    hd = acc.shape[0]
    if hd % WIDTH == 0 and _VNNI_SUMS:
        groups = n // 4
        for d0 in range(0, hd, WIDTH):
            vnni64(vc, js, ws, np.int64(groups), np.int64(d0), acc)
        _add_value_rows(vc, js, ws, 4 * groups, n, acc)     # the last keys short of a group of four
    elif hd % WIDTH == 0:
        for d0 in range(0, hd, WIDTH):
            sums64(vc, js, ws, n, d0, acc)
    elif hd == 32:
        sums32(vc, js, ws, n, 0, acc)
    elif hd == 16:
        sums16(vc, js, ws, n, 0, acc)
    else:
        acc[:] = 0
        _add_value_rows(vc, js, ws, 0, n, acc)


#: The stand-in for an absent bias or gain (int64, so one compiled signature serves every model).
NO_ARRAY = np.zeros(1, np.int64)

#: The window arguments of :func:`_attend` for a call without one (no local layer).
NO_KEY_POSITIONS = np.zeros((1, 1), np.int64)
NO_LOWEST = np.zeros(1, np.int64)


@njit(parallel=True, **JIT)
def _attend(q16, qe, kt, kmax, vc, vmax, crow, a, b, c, kpos, lowest, windowed, exp2, lc,
            out):  # pragma: no cover - compiled
    """Attention of each query n over its key set ``[0, a) + [b, c)`` of cache row ``crow[n]``;
    ``windowed`` (a local layer, Gemma 3): only the keys whose position ``kpos[row, slot]`` is
    ``lowest[n]`` or later, gathered first, so a query costs its window, not the segment."""
    # One task per (query, query head): a decoding step's one query still splits into nh
    # tasks (9 for SmolLM2), where one per KV head (3) left one of two threads a third idle.
    n_q, nh, hd = q16.shape
    nkv = kt.shape[1]
    group = nh // nkv
    for item in prange(n_q * nh):
        n = item // nh
        head = item % nh
        h = head // group
        r = crow[n]
        n1 = a[n]
        off = b[n]
        n2 = max(c[n] - off, 0)
        key_slots = np.empty(n1 + n2, np.int64)
        cnt = 0
        if windowed:
            for jj in range(n1 + n2):
                j = jj if jj < n1 else off + jj - n1
                if kpos[r, j] >= lowest[n]:
                    key_slots[cnt] = j
                    cnt += 1
        else:
            for jj in range(n1):
                key_slots[jj] = jj
            for jj in range(n2):
                key_slots[n1 + jj] = off + jj
            cnt = n1 + n2
        s = np.zeros(cnt, np.int32)      # |s| < 2^31 for head dims up to 256
        if windowed:
            for d in range(hd):
                qd = np.int32(q16[n, head, d])
                kr = kt[r, h, d]
                for m in range(cnt):
                    s[m] += qd * np.int32(kr[key_slots[m]])
        else:                            # the whole key set: two contiguous runs of slots
            s2 = s[n1:]
            for d in range(hd):
                qd = np.int32(q16[n, head, d])
                kr = kt[r, h, d]
                for j in range(n1):
                    s[j] += qd * np.int32(kr[j])
                kr2 = kr[off:off + n2]
                for j in range(n2):
                    s2[j] += qd * np.int32(kr2[j])
        z = np.empty(cnt, np.int64)      # |z| < 2^55
        km = kmax[r, h]
        if windowed:
            for m in range(cnt):
                z[m] = np.int64(s[m]) * np.int64(km[key_slots[m]])
        else:                            # the two runs of slots again: no gather
            for m in range(n1):
                z[m] = np.int64(s[m]) * np.int64(km[m])
            for m in range(n2):
                z[n1 + m] = np.int64(s[n1 + m]) * np.int64(km[off + m])
        _softmax_values(z, key_slots, cnt, vmax[r, h], vc[r, h], ATT_PRESHIFT - qe[n, head], lc, exp2,
                        out[n, head])
