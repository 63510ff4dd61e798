"""The exact engine's integer steps as tensor operations (any device).

Each function implements one step of docs/ENGINE.md; :mod:`lmcodec.engine.cpu.ops`
implements the same steps as fused numba kernels for the CPU.  The engine uses
this module on CUDA and other devices; the tests run it on CPU against the
numba kernels and the plain reference, so both stay bit-identical.

Operands are int16 tensors with |v| <= 32639 and an int64 exponent per row;
products are ``torch._int_mm`` results stacked as [hi rows; lo rows] (int32).
"""

from __future__ import annotations

import functools

import torch

from .spec import fixedmath
from .spec.constants import (
    ACT_FRAC,
    ACT_MAX,
    ATT_D_CAP,
    ATT_P_SHIFT,
    ATT_PRESHIFT,
    ATT_SHIFT,
    ATT_U_CAP,
    BUCKETS,
    ESCAPES,
    KV_MAX,
    LOG2E_OUT,
    MLP_LIMIT,
    OUT_D_CAP,
    OUT_PRE_LIMIT,
    OUT_U_CAP,
    Q_MAX,
    QKV_LIMIT,
    RESID_FRAC,
    RESID_LIMIT,
    RSQRT_BITS,
)

_POW2 = [1 << k for k in range(63)]


@functools.cache
def _constants(device: torch.device) -> dict[str, torch.Tensor]:
    """The tables the steps read, made once per device and only read after that: a
    step copies nothing from the host, so it can be captured in a CUDA graph."""
    return {"pow2": torch.tensor(_POW2, dtype=torch.int64, device=device),
            "exp2": torch.as_tensor(fixedmath.exp2_table(), device=device),
            "low": torch.tensor(-(1 << 62), dtype=torch.int64, device=device)}


#: This backend computes Gemma 3's forms of the shared steps: attention over a window with any
#: scale, the MLP with the gate table it is given, qkv with the q/k norms, and add_normed
#: (gemma.steps_for).
GEMMA_STEPS = True


def round_shift(x: torch.Tensor, s) -> torch.Tensor:
    """``x / 2^s`` rounded half up for s >= 0 (int or broadcastable tensor); an int s < 0 shifts left."""
    if isinstance(s, int):
        return x if s == 0 else ((x + (1 << (s - 1))) >> s if s > 0 else x << -s)
    return (x + ((torch.ones_like(s) << s) >> 1)) >> s


def bit_length(m: torch.Tensor) -> torch.Tensor:
    """Bits of each non-negative int64 (0 for 0), by exact comparisons."""
    return (m.unsqueeze(-1) >= _constants(m.device)["pow2"]).sum(-1)


def fit_shift(m: torch.Tensor, limit: int) -> torch.Tensor:
    """Least s >= 0 with round_shift(m, s) <= limit, for m >= 0 and limit >= 2^14."""
    s = (bit_length(m) - 15).clamp(min=0)
    return s + (round_shift(m, s) > limit).to(torch.int64)


def fit_rows(x: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (last dim): ``(round_shift(x, s), s)`` with the least s that fits ``limit``."""
    s = fit_shift(x.abs().amax(dim=-1, keepdim=True), limit)
    return round_shift(x, s), s


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(n)) for 0 <= n < 2^60: a float estimate (within 1), then exact integer corrections."""
    r = torch.sqrt(n.to(torch.float64)).floor().to(torch.int64)
    for _ in range(2):
        r = torch.where(r * r > n, r - 1, r)
        r = torch.where((r + 1) * (r + 1) <= n, r + 1, r)
    return r


def split(h16: torch.Tensor) -> torch.Tensor:
    """int16 operand rows (|v| <= 32639) -> [hi rows; lo rows] int8 with v = 256 hi + lo (what the products take)."""
    hi = (h16 + 128) >> 8
    lo = h16 - (hi << 8)
    return torch.cat([hi, lo]).to(torch.int8)


def combine(y: torch.Tensor) -> torch.Tensor:
    """[hi rows; lo rows] int32 products -> int64 sums (256 hi + lo)."""
    m = y.shape[0] // 2
    return (y[:m].to(torch.int64) << 8) + y[m:].to(torch.int64)


def requant(y: torch.Tensor, mult: torch.Tensor, shift: int, exp: torch.Tensor, frac: int) -> torch.Tensor:
    """round(y * mult * 2^(exp - shift + frac)); |y * mult| < 2^58 (docs/ENGINE.md, integer product)."""
    prod = y * mult
    c = shift - exp - frac
    right = round_shift(prod, c.clamp(min=0))
    left = prod.clamp(-(1 << 40), 1 << 40) << (-c).clamp(min=0, max=20)
    return torch.where(c >= 0, right, left)


def _rms_scaled(x: torch.Tensor, gain: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """An RMSNorm's ``t = xs G r`` per row (``xs`` the row pre-shifted below 2^15, ``r = isqrt(k 2^48 / d)``):
    what the operand norm fits into int16 and Gemma's norm16 rounds to 16 fractional bits."""
    k = x.shape[-1]
    s = (bit_length(x.abs().amax(dim=-1, keepdim=True)) - 15).clamp(min=0)
    xs = round_shift(x, s)
    d = ((xs * xs).sum(dim=-1, keepdim=True) + k * eps[s]).clamp(min=1)
    return xs * gain * isqrt(torch.div(k << (2 * RSQRT_BITS), d, rounding_mode="floor"))


def norm(x: torch.Tensor, gain: torch.Tensor, gain_shift: int, eps: torch.Tensor):
    """RMSNorm of residual rows -> (int16 operand rows, exponent per row)."""
    h, s2 = fit_rows(_rms_scaled(x, gain, eps), ACT_MAX)
    return h.to(torch.int16), s2 - RSQRT_BITS - gain_shift


def norm16(x: torch.Tensor, gain: torch.Tensor, gain_shift: int, eps: torch.Tensor, limit: int) -> torch.Tensor:
    """Gemma's RMSNorms whose result is no product's operand (q and k per head, the outputs of
    attention and MLP): the RMSNorm's ``t = xs G r`` at 16 fractional bits, clamped to +-limit."""
    t = _rms_scaled(x, gain, eps)
    c = RSQRT_BITS + gain_shift - RESID_FRAC
    out = round_shift(t, c) if c >= 0 else t.clamp(-RESID_LIMIT, RESID_LIMIT) << min(-c, 20)
    return out.clamp(-limit, limit)


def operand(x: torch.Tensor, limit: int = ACT_MAX):
    """int64 rows -> (int16 rows, shift): the least power-of-two shift that fits ``limit``."""
    h, s = fit_rows(x, limit)
    return h.to(torch.int16), s


def residual_add(x: torch.Tensor, y: torch.Tensor, mult: torch.Tensor, shift: int, exp: torch.Tensor) -> None:
    """x += the product at 16 fractional bits, clamped (in place)."""
    x.copy_((x + requant(combine(y), mult, shift, exp, RESID_FRAC)).clamp(-RESID_LIMIT, RESID_LIMIT))


def add_normed(x: torch.Tensor, y: torch.Tensor, mult: torch.Tensor, shift: int, exp: torch.Tensor,
               gain: torch.Tensor, gain_shift: int, eps: torch.Tensor) -> None:
    """Gemma's post-norm add: x += norm16(the product at 16 fractional bits, clamped), clamped (in place)."""
    v = requant(combine(y), mult, shift, exp, RESID_FRAC).clamp(-RESID_LIMIT, RESID_LIMIT)
    x.copy_((x + norm16(v, gain, gain_shift, eps, RESID_LIMIT)).clamp(-RESID_LIMIT, RESID_LIMIT))


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 [..., hd] -> (int8 round(127 x / max|x|), int32 max|x|) per head vector."""
    xmax = x.abs().amax(dim=-1, keepdim=True)
    safe = xmax.clamp(min=1)
    q = torch.div(2 * KV_MAX * x + safe, 2 * safe, rounding_mode="floor")
    return q.to(torch.int8), xmax.squeeze(-1).to(torch.int32)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, T, heads, hd] by [T, hd/2] (shared) or [B, T, hd/2] (per row) tables
    (16 fractional bits), clamped."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = (cos[None], sin[None]) if cos.dim() == 2 else (cos, sin)
    c, s = c[:, :, None, :], s[:, :, None, :]
    r1 = round_shift(x1 * c - x2 * s, fixedmath.ROPE_BITS)
    r2 = round_shift(x2 * c + x1 * s, fixedmath.ROPE_BITS)
    return torch.cat([r1, r2], dim=-1).clamp(-QKV_LIMIT, QKV_LIMIT)


def qkv(y, mult, shift, bias, exp, cos, sin, B, T, nh, nkv, hd, kt, kmax, vc, vmax, slots, qk_norm=None):
    """q/k/v from the qkv product: RoPE, the int8 cache write, the int16 queries.

    ``slots`` [T] (every row writes the same slots) or [B*T] (row ``b T + t`` its own);
    ``cos``/``sin`` [T, hd/2] or [B*T, hd/2] likewise (triton.ops.qkv's contract).
    ``qk_norm`` (Gemma 3): ``(q gain, shift, k gain, shift, eps)``, the per-head :func:`norm16`
    of q and k before RoPE.
    """
    if slots.shape[0] == B * T != T:
        slots, cos, sin = slots.view(B, T), cos.view(B, T, -1), sin.view(B, T, -1)
    v = requant(combine(y), mult, shift, exp, ACT_FRAC)
    if bias is not None:
        v = v + bias
    v = v.clamp(-QKV_LIMIT, QKV_LIMIT)
    q, k, val = v.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    q, k = q.reshape(B, T, nh, hd), k.reshape(B, T, nkv, hd)
    if qk_norm is not None:
        qg, qs, kg, ks, eps = qk_norm
        q, k = norm16(q, qg, qs, eps, QKV_LIMIT), norm16(k, kg, ks, eps, QKV_LIMIT)
    q = rope(q, cos, sin)
    k = rope(k, cos, sin)
    k8, km = quantize_kv(k)                                  # [B, T, nkv, hd]
    v8, vm = quantize_kv(val.reshape(B, T, nkv, hd))
    if slots.dim() == 1:
        kt[:B, :, :, slots] = k8.permute(0, 2, 3, 1)
        kmax[:B, :, slots] = km.transpose(1, 2)
        vc[:B, :, slots] = v8.transpose(1, 2)
        vmax[:B, :, slots] = vm.transpose(1, 2)
    else:  # advanced indices around slices: the indexed dims come first, [B, T, ...]
        row = torch.arange(B, device=slots.device)[:, None].expand(B, T)
        kt[row, :, :, slots] = k8
        kmax[row, :, slots] = km
        vc[row, :, slots] = v8
        vmax[row, :, slots] = vm
    q16, qe = operand(q, Q_MAX)
    return q16.reshape(B * T, nh, hd), qe.reshape(B * T, nh)


def mlp(y, mult, shift, exp, sigmoid):
    """gate/up product -> SiLU(gate) * up as an int16 operand (exponent at 32 fractional bits)."""
    gu = requant(combine(y), mult, shift, exp, ACT_FRAC).clamp(-MLP_LIMIT, MLP_LIMIT)
    g, u = gu.chunk(2, dim=-1)
    span = fixedmath.SIGMOID_RANGE << fixedmath.SIGMOID_STEP_BITS
    idx = round_shift(g, ACT_FRAC - fixedmath.SIGMOID_STEP_BITS).clamp(-span, span)
    silu = round_shift(g * sigmoid[idx + span], fixedmath.SIGMOID_VALUE_BITS)
    return operand(silu * u)


def attend(q16, qe, kt, kmax, vc, vmax, crow, a, b, c, window=None, lc: int | None = None) -> torch.Tensor:
    """Exact attention (docs/ENGINE.md) with tensor operations; memory O(N * slots).

    ``window`` (a local layer, Gemma 3): ``(key positions [rows, slots], lowest position [N])``:
    query n sees only the slots of its key set whose key stands at ``lowest[n]`` or later.
    ``lc``: the scores' base-2 constant (default: that of 1/sqrt(head dim)).
    """
    n_q, nh, hd = q16.shape
    nkv, slots = kt.shape[1], kt.shape[3]
    group = nh // nkv
    dev = q16.device
    q = q16.view(n_q, nkv, group, hd).to(torch.float64)
    # |s| < 2^31: exact in float64 on every device (CUDA has no int64 GEMM).
    s = _per_row(q, kt, crow).to(torch.int64)                        # [N, nkv, G, S]
    z = s * kmax[crow].to(torch.int64)[:, :, None, :]
    j = torch.arange(slots, device=dev)
    valid = (j[None, :] < a[:, None]) | ((j[None, :] >= b[:, None]) & (j[None, :] < c[:, None]))
    if window is not None:
        kpos, lowest = window
        valid = valid & (kpos[crow] >= lowest[:, None])
    valid = valid[:, None, None, :]
    low = _constants(dev)["low"]
    zmax = torch.where(valid, z, low).amax(dim=-1, keepdim=True)
    d = ((zmax - z) >> (ATT_PRESHIFT - qe).view(n_q, nkv, group, 1)).clamp(max=ATT_D_CAP)
    u = ((d * (lc or fixedmath.att_log2e(hd))) >> ATT_SHIFT).clamp(max=ATT_U_CAP)
    table = _constants(dev)["exp2"]
    p = table[u & 1023] >> ((u >> 10) + ATT_P_SHIFT)
    p = torch.where(valid & (u < ATT_U_CAP), p, torch.zeros_like(p))
    total = p.sum(dim=-1, keepdim=True)
    w = p * vmax[crow].to(torch.int64)[:, :, None, :]                 # < 2^40
    # 20-bit halves of w keep every float64 sum below 2^53 (exact).
    acc = (_per_row((w >> 20).to(torch.float64), vc, crow).to(torch.int64) << 20) + _per_row(
        (w & ((1 << 20) - 1)).to(torch.float64), vc, crow).to(torch.int64)
    # A real query always sees its own key (tot >= 2^16); only a padding column of a local layer
    # (it reads slot 0, outside its window) finds none: it gets 0 and is discarded.
    den = 127 * total.clamp(min=1)
    return torch.div(2 * acc + den, 2 * den, rounding_mode="floor").view(n_q, nh, hd)


def _per_row(x: torch.Tensor, cache: torch.Tensor, crow: torch.Tensor) -> torch.Tensor:
    """``x[n] @ cache[crow[n]]`` as float64: x [N, nkv, G, A], cache [rows, nkv, A, B] -> [N, nkv, G, B].

    Every entry is one exact sum (integers below 2^53), so how the queries are grouped changes
    nothing.  On a CPU, queries that come in runs of one cache row (a segment's parallel pass)
    take one GEMM per run against that row's keys or values, converted once, instead of a
    gathered copy of the row per query; elsewhere (no host sync: CUDA graphs) and for one query
    per row (a decoding step), the gathered copy.
    """
    if crow.device.type == "cpu" and len(crow) > 1:
        rows, counts = torch.unique_consecutive(crow, return_counts=True)
        if len(rows) < len(crow):
            n_kv, group, inner = x.shape[1], x.shape[2], x.shape[3]
            out, i = [], 0
            for row, n in zip(rows.tolist(), counts.tolist()):
                xs = x[i:i + n].permute(1, 0, 2, 3).reshape(n_kv, n * group, inner)
                y = torch.matmul(xs, cache[row].to(torch.float64))                 # [nkv, n G, B]
                out.append(y.view(n_kv, n, group, -1).permute(1, 0, 2, 3))
                i += n
            return torch.cat(out)
    return torch.matmul(x, cache[crow].to(torch.float64))


def gaps(y: torch.Tensor, mult: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """Output head product -> each token's gap below the best logit, [N, V] int64.

    ``u = (max logit - logit) * log2(e)`` in fixed point with 10 fractional bits
    (so a token's weight is ``2^30 * 2^(-u / 1024)``), capped at 31 * 1024
    (docs/ENGINE.md, Frequencies).
    """
    lam = combine(y) * mult
    d = lam.amax(dim=-1, keepdim=True) - lam
    s = 20 - exp
    pre = (s - OUT_PRE_LIMIT).clamp(min=0)
    rest = (s - pre).clamp(min=0)
    return (((d >> pre).clamp(max=OUT_D_CAP) * LOG2E_OUT) >> rest).clamp(max=OUT_U_CAP)


def weights_from_gaps(u: torch.Tensor, alphabet: int, width: int) -> torch.Tensor:
    """Token gaps [N, V] -> the integer weights of every coding symbol, [N, 256, width] int64.

    Tokens: p = T[u mod 1024] >> (u div 1024) (fixedmath.exp2_table); the 256
    escapes: max(1, sum p >> 24) each; padding: 0.
    """
    table = _constants(u.device)["exp2"]
    p = table[u & 1023] >> (u >> 10)
    n = p.shape[0]
    esc = (p.sum(dim=-1, keepdim=True) >> 24).clamp(min=1)
    pad = BUCKETS * width - alphabet
    full = torch.cat([p, esc.expand(n, ESCAPES), torch.zeros((n, pad), dtype=p.dtype, device=p.device)], 1)
    return full.view(n, BUCKETS, width)


def weights(y: torch.Tensor, mult: torch.Tensor, exp: torch.Tensor, alphabet: int, width: int) -> torch.Tensor:
    """Output head product -> the integer weights of every coding symbol, [N, 256, width] int64.

    Tokens: p = 2^30 * 2^-(max logit - logit) * log2(e) in fixed point; the 256
    escapes: max(1, sum p >> 24) each; padding: 0 (docs/ENGINE.md, Frequencies).
    """
    return weights_from_gaps(gaps(y, mult, exp), alphabet, width)
