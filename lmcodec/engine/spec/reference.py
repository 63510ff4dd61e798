"""Independent reference of the exact engine's arithmetic (docs/ENGINE.md, ``lmcodec-int-1``).

Written from the specification page alone, to check the fast engines bit for
bit: plain int64 numpy (Python ints for the constants and every scalar), one
token at a time, every rounding spelled out as the page writes it.  Slow on
purpose; tests only.

Layers are walked outermost and tokens innermost: token p's layer-l values
depend only on layer l-1 of positions <= p, so this order computes exactly the
same numbers as token-by-token stepping while converting each weight matrix to
int64 once.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from . import fixedmath
from .constants import ESCAPES

EXP2 = fixedmath.exp2_table()           # int64 [1024], EXP2[0] = 2^30
SIG = fixedmath.sigmoid_table()         # int64 [32769]
GELU = fixedmath.gelu_gate_table()      # int64 [32769]


def _log2e_constants() -> tuple[int, int]:
    """LOG2E_ATT = round(2^30 log2(e) / 127), LOG2E_OUT = round(2^30 log2(e)), halves up."""
    w = fixedmath.WORK_BITS
    v = fixedmath.log2e(w)                                   # log2(e) * 2^w
    att = (2 * (v << 30) + 127 * (1 << w)) // (2 * 127 * (1 << w))
    out = (2 * (v << 30) + (1 << w)) // (2 * (1 << w))
    return att, out


LOG2E_ATT, LOG2E_OUT = _log2e_constants()


def _att_constant(hd: int) -> int:
    """round(2^33 log2(e) / (127 sqrt(hd))), halves up, from exact integers (= LOG2E_ATT for hd 64)."""
    w = fixedmath.WORK_BITS
    v = fixedmath.log2e(w)
    den = 127 * math.isqrt(hd << (2 * w))
    return (2 * (v << 33) + den) // (2 * den)
assert LOG2E_ATT == 12197496, LOG2E_ATT
assert LOG2E_OUT == 1549082005, LOG2E_OUT

RESIDUAL_LIMIT = 1 << 40
QKV_LIMIT = (1 << 24) - 1
GATE_UP_LIMIT = (1 << 26) - 1


# ----------------------------------------------------------------- notation

def rshift(x, s: int):
    """Round half up: (x + 2^(s-1)) >> s for s > 0, x for s = 0 (Python int or int64 array)."""
    assert s >= 0 and (s <= 62 or not isinstance(x, np.ndarray)), s
    if s == 0:
        return x
    return (x + (1 << (s - 1))) >> s


def bitlen(m: int) -> int:
    return int(m).bit_length()


def fit(m: int, limit: int) -> int:
    """Least s >= 0 with rshift(m, s) <= limit, computed as the spec says."""
    m = int(m)
    s0 = max(0, bitlen(m) - 15)
    return s0 + (1 if rshift(m, s0) > limit else 0)


def clamp(x, limit: int):
    return np.clip(x, -limit, limit)


def absmax(x: np.ndarray) -> int:
    return int(np.abs(x).max())


# ----------------------------------------------------------------- pieces

def rmsnorm(x: np.ndarray, gain: np.ndarray, gs: int, eps_q32: int) -> tuple[np.ndarray, int]:
    """Residual row x (16 fractional bits) -> operand (h, e)."""
    k = len(x)
    s = max(0, bitlen(absmax(x)) - 15)
    xs = rshift(x, s)
    eps_s = rshift(eps_q32, 2 * s)
    d = max(1, int((xs * xs).sum()) + k * eps_s)
    r = math.isqrt((k << 48) // d)
    t = xs * gain * r
    assert absmax(t) < (1 << 47)
    s2 = fit(absmax(t), 32639)
    h = rshift(t, s2)
    return h, s2 - 24 - gs


def norm16(x: np.ndarray, gain: np.ndarray, gs: int, eps_q32: int, limit: int) -> np.ndarray:
    """Gemma's RMSNorms whose result is not a product's operand (q and k per head, the outputs of
    attention and MLP): the RMSNorm's t = xs G r at 16 fractional bits, clamped to +-limit."""
    k = len(x)
    s = max(0, bitlen(absmax(x)) - 15)
    xs = rshift(x, s)
    d = max(1, int((xs * xs).sum()) + k * rshift(eps_q32, 2 * s))
    t = xs * gain * math.isqrt((k << 48) // d)
    c = 24 + gs - 16
    out = rshift(t, c) if c >= 0 else clamp(t, 1 << 40) << min(-c, 20)
    return clamp(out, limit)


def gelu_gate(g: np.ndarray) -> np.ndarray:
    """GELU (tanh form) of gate values at 16 fractional bits, from the integer table (as SiLU's)."""
    i_ = clamp(rshift(g, 6), 16384)
    return rshift(g * GELU[i_ + 16384], 16)


class _Linear:
    """An IntLinear's integers as int64 numpy: weight [N, K], mult [N], shift, bias [N] or None."""

    def __init__(self, lin):
        self.w = lin.weight.numpy().astype(np.int64)
        self.mult = lin.mult.numpy().astype(np.int64)
        self.shift = int(lin.shift)
        self.bias = None if lin.bias is None else lin.bias.numpy().astype(np.int64)

    def dot(self, h: np.ndarray) -> np.ndarray:
        """y = sum_k h_k q_nk, exact in int64."""
        assert absmax(h) <= 32767
        return h @ self.w.T

    def product(self, h: np.ndarray, e: int, frac: int) -> np.ndarray:
        y = self.dot(h)
        p = y * self.mult
        assert absmax(p) < (1 << 58)
        c = self.shift - e - frac
        if c >= 0:
            out = rshift(p, c)
        else:
            out = clamp(p, 1 << 40) << min(-c, 20)
        if self.bias is not None:
            out = out + self.bias
        return out


def key_positions(p: int, prefix_len: int, context: int) -> list[int]:
    """Positions the token at p attends to: the prefix plus the last context - prefix_len positions."""
    if p < prefix_len:
        return list(range(0, p + 1))
    start = max(prefix_len, p - (context - prefix_len) + 1)
    return list(range(0, prefix_len)) + list(range(start, p + 1))


def quantize_cache(vec: np.ndarray) -> tuple[np.ndarray, int]:
    """A head vector of k (after RoPE) or v -> (int8 values as int64, max|vec|)."""
    vmax = absmax(vec)
    vm = max(vmax, 1)
    return (254 * vec + vm) // (2 * vm), vmax


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """One head vector at one position (cos, sin: that position's rows)."""
    half = len(x) // 2
    x1, x2 = x[:half], x[half:]
    r1 = rshift(x1 * cos - x2 * sin, 16)
    r2 = rshift(x2 * cos + x1 * sin, 16)
    return clamp(np.concatenate([r1, r2]), QKV_LIMIT)


def attend(q: np.ndarray, keys: list[tuple[np.ndarray, int]], values: list[tuple[np.ndarray, int]],
           lc: int = LOG2E_ATT) -> np.ndarray:
    """One query head over its key set -> output head vector at 16 fractional bits."""
    qe = fit(absmax(q), 32767)
    q16 = rshift(q, qe)
    k8 = np.stack([k for k, _ in keys])                          # [J, hd]
    kmax = np.array([m for _, m in keys], dtype=np.int64)
    v8 = np.stack([v for v, _ in values])
    vmax = np.array([m for _, m in values], dtype=np.int64)
    s = k8 @ q16
    assert absmax(s) < (1 << 31)
    z = s * kmax
    assert qe <= 19
    d = np.minimum((z.max() - z) >> (19 - qe), 1 << 30)
    u = (d * lc) >> 36
    inside = u < 17 * 1024
    uc = np.where(inside, u, 0)
    p = np.where(inside, EXP2[uc % 1024] >> (uc // 1024 + 14), 0)
    total = int(p.sum())
    num = (p * vmax) @ v8                                         # sum_j p_j vmax_j v8_jd
    return (2 * num + 127 * total) // (2 * 127 * total)


# ----------------------------------------------------------------- the model

def sink_at(p: int, prefix_len: int, trained: int | None) -> int:
    """Where the prefix stands for a query at position p (docs/ENGINE.md, "Long segments"):
    0 within ``P + 4q`` positions, then ``q * (floor((p - P) / q) - 3)``, q = max(1, trained // 4)."""
    if trained is None or p < prefix_len:
        return 0
    q = max(1, trained // 4)
    return q * max(0, (p - prefix_len) // q - 3)


def reference_run(model, ids: list[int], prefix_len: int, context: int,
                  trained: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run the token ids at positions 0..len(ids)-1; ids[:prefix_len] are the prefix (attention sink).

    Token at position p attends to positions [0, prefix_len) and
    [max(prefix_len, p-(context-prefix_len)+1), p] (for p < prefix_len simply [0, p]).
    With ``trained`` (the model's trained positions) a query at p sees the prefix
    as run on its own at positions [D, D + prefix_len), D = :func:`sink_at`.
    Returns (lam [len(ids), V] int64, exp [len(ids)] int64): real logit = lam * 2**exp.
    """
    a = model.arch
    ids = [int(t) for t in ids]
    n = len(ids)
    assert 1 <= prefix_len <= n and prefix_len <= context <= 8192
    nh, nkv, hd = a.num_heads, a.num_kv_heads, a.head_dim
    assert hd <= 256 and hd % 2 == 0
    lc = _att_constant(hd)
    group = nh // nkv
    bases = sorted({sink_at(p, prefix_len, trained) for p in range(n)} - {0})
    # The prefix at base 0 is the sequence's own first positions; each other base is a
    # separate run of the prefix tokens alone, positions base .. base + prefix_len - 1.
    runs = [(0, ids, n)] + [(d, ids[:prefix_len], prefix_len) for d in bases]
    top = max(d + m for d, _, m in runs)
    tables = {th: fixedmath.rope_tables(Fraction(th), hd, top) for th in {a.layer_theta(i) for i in range(a.num_layers)}}
    eps = int(model.eps_q32)
    if a.query_pre_attn_scalar:
        lc = _att_constant(a.query_pre_attn_scalar)
    act_table = GELU if a.hidden_act == "gelu_pytorch_tanh" else SIG
    # Gemma: embeddings times sqrt(H), taken as isqrt(H 2^32) (16 fractional bits).
    scale = math.isqrt(a.hidden_size << 32) if a.embed_scale else None

    # Embedding: x = rshift(q_t * mult_t, shift_head - 16) (Gemma: rshift(q_t * mult_t * scale, shift_head)).
    emb = model.embed
    def embed(tokens: list[int]) -> list[np.ndarray]:
        out = []
        for t in tokens:
            row = emb.weight[t].numpy().astype(np.int64) * int(emb.mult[t])
            if scale is None:
                out.append(rshift(row, int(emb.shift) - 16) if int(emb.shift) >= 16 else row << (16 - int(emb.shift)))
            else:
                out.append(rshift(row * scale, int(emb.shift)) if int(emb.shift) >= 0 else row * scale << -int(emb.shift))
        return out
    xs = {d: embed(toks) for d, toks, _ in runs}

    for li, layer in enumerate(model.layers):
        cos, sin = tables[a.layer_theta(li)]
        window = a.sliding_window if a.is_local(li) else None
        qk_norm = a.qk_norm
        if qk_norm:
            qg, kg = (getattr(layer, n).numpy().astype(np.int64) for n in ("q_gain", "k_gain"))
        if a.post_norms:
            pag, pmg = (getattr(layer, n).numpy().astype(np.int64) for n in ("post_attn_gain", "post_mlp_gain"))
        qkv, o = _Linear(layer.qkv), _Linear(layer.o)
        gate_up, down = _Linear(layer.gate_up), _Linear(layer.down)
        attn_gain = layer.attn_gain.numpy().astype(np.int64)
        mlp_gain = layer.mlp_gain.numpy().astype(np.int64)
        caches: dict[int, tuple[list, list]] = {}          # base -> ([position][kv head] -> (k8, kmax), v)
        for d, _, m in sorted(runs, key=lambda r: -r[0]):    # the moved prefixes first: the run at 0 reads them
            cache_k: list[list[tuple[np.ndarray, int]]] = []
            cache_v: list[list[tuple[np.ndarray, int]]] = []
            caches[d] = (cache_k, cache_v)
            for i in range(m):
                x = xs[d][i]
                p = d + i
                # Attention block.
                h, e = rmsnorm(x, attn_gain, layer.attn_gain_shift, eps)
                qkv_out = clamp(qkv.product(h, e, 16), QKV_LIMIT)
                q_all = qkv_out[: nh * hd]
                k_all = qkv_out[nh * hd: (nh + nkv) * hd]
                v_all = qkv_out[(nh + nkv) * hd: (nh + 2 * nkv) * hd]
                def head_k(j: int) -> np.ndarray:
                    vec = k_all[j * hd:(j + 1) * hd]
                    return norm16(vec, kg, layer.k_gain_shift, eps, QKV_LIMIT) if qk_norm else vec
                cache_k.append([quantize_cache(rope(head_k(j), cos[p], sin[p])) for j in range(nkv)])
                cache_v.append([quantize_cache(v_all[j * hd:(j + 1) * hd]) for j in range(nkv)])
                if d:                                        # a moved prefix: causal among its own tokens
                    keys = [(cache_k[j], cache_v[j], d + j) for j in range(i + 1)]
                else:
                    base = sink_at(i, prefix_len, trained)
                    sk, sv = caches[base]
                    keys = [(sk[j], sv[j], base + j) if j < prefix_len else (cache_k[j], cache_v[j], j)
                            for j in key_positions(i, prefix_len, context)]
                if window is not None:                       # a local layer: the last `window` positions only
                    keys = [key for key in keys if key[2] > p - window]
                heads = []
                for qh in range(nh):
                    kvh = qh // group
                    q = q_all[qh * hd:(qh + 1) * hd]
                    if qk_norm:
                        q = norm16(q, qg, layer.q_gain_shift, eps, QKV_LIMIT)
                    q = rope(q, cos[p], sin[p])
                    heads.append(attend(q, [k[kvh] for k, _, _ in keys], [v[kvh] for _, v, _ in keys], lc))
                att = np.concatenate(heads)
                s = fit(absmax(att), 32639)
                y = o.product(rshift(att, s), s - 16, 16)
                if a.post_norms:
                    y = norm16(clamp(y, RESIDUAL_LIMIT), pag, layer.post_attn_gain_shift, eps, RESIDUAL_LIMIT)
                x = clamp(x + y, RESIDUAL_LIMIT)
                # MLP block.
                h, e = rmsnorm(x, mlp_gain, layer.mlp_gain_shift, eps)
                gu = clamp(gate_up.product(h, e, 16), GATE_UP_LIMIT)
                g, u = gu[: a.intermediate_size], gu[a.intermediate_size:]
                i_ = clamp(rshift(g, 6), 16384)
                silu = rshift(g * act_table[i_ + 16384], 16)
                act = silu * u
                assert absmax(act) < (1 << 52)
                s = fit(absmax(act), 32639)
                y = down.product(rshift(act, s), s - 32, 16)
                if a.post_norms:
                    y = norm16(clamp(y, RESIDUAL_LIMIT), pmg, layer.post_mlp_gain_shift, eps, RESIDUAL_LIMIT)
                x = clamp(x + y, RESIDUAL_LIMIT)
                xs[d][i] = x
    xs = xs[0]

    head = _Linear(model.head)
    final_gain = model.final_gain.numpy().astype(np.int64)
    lam = np.empty((n, head.w.shape[0]), dtype=np.int64)
    exp = np.empty(n, dtype=np.int64)
    for p in range(n):
        h, e = rmsnorm(xs[p], final_gain, model.final_gain_shift, eps)
        lam[p] = head.dot(h) * head.mult
        exp[p] = e - head.shift
    return lam, exp


# ----------------------------------------------------------------- frequencies

def reference_tables(lam: np.ndarray, exp: int, alphabet: int) -> tuple[np.ndarray, np.ndarray]:
    """For one position: (stage1 [256] int64, stage2 [256, width] int64); alphabet = V + 256."""
    lam = np.asarray(lam, dtype=np.int64)
    vocab = len(lam)
    assert alphabet == vocab + ESCAPES
    big_e = int(exp)
    d = int(lam.max()) - lam
    s = 20 - big_e
    pre = max(0, s - 36)
    rest = max(0, s - pre)
    assert pre <= 62 and rest <= 62
    u = np.minimum((np.minimum(d >> pre, (1 << 31) - 1) * LOG2E_OUT) >> rest, 31 * 1024)
    p = EXP2[u % 1024] >> (u // 1024)

    width = -(-alphabet // 256)
    probs = np.zeros(256 * width, dtype=np.int64)
    probs[:vocab] = p
    probs[vocab:alphabet] = max(1, int(p.sum()) >> 24)
    rows = probs.reshape(256, width)

    # Stage 1: buckets.
    m = [int(v) for v in rows.sum(axis=1)]
    cut = max(0, bitlen(width) - 8)
    m_ = [v >> cut for v in m]
    total = sum(m_)
    stage1 = [256 + m_[b] * ((1 << 24) - (1 << 16)) // total for b in range(256)]
    top = m_.index(max(m_))                       # lowest index on ties
    stage1[top] += (1 << 24) - sum(stage1)

    # Stage 2: within each bucket.
    stage2 = np.empty((256, width), dtype=np.int64)
    for b in range(256):
        row = [int(v) for v in rows[b]]
        g = [1 + pj * ((1 << 24) - width) // max(m[b], 1) for pj in row]
        j = row.index(max(row))
        g[j] += (1 << 24) - sum(g)
        stage2[b] = g
    return np.array(stage1, dtype=np.int64), stage2


def reference_bits(stage1: np.ndarray, stage2: np.ndarray, symbol: int) -> float:
    """-log2 of the coding probability of ``symbol``: 48 - log2 g_bucket - log2 g_within."""
    width = stage2.shape[1]
    b, j = divmod(int(symbol), width)
    return 48 - math.log2(int(stage1[b])) - math.log2(int(stage2[b, j]))


# ----------------------------------------------------------------- dictionaries

def _merged_linear(lin, key: str, lora: dict, scale: dict, bias: dict):
    """docs/ENGINE.md, "Dictionaries", for one IntLinear: LoRA into q, then the row scale, then the bias."""
    import torch

    q = lin.weight.numpy().astype(np.int64)
    mult = lin.mult.numpy().astype(np.int64)
    b = None if lin.bias is None else lin.bias.numpy().astype(np.int64)
    if key in lora:
        a_, b_, s = lora[key]
        total = b_.astype(np.int64) @ a_.astype(np.int64)
        q = np.clip(q + rshift(total, s), -127, 127)
    if key in scale:
        m = scale[key].astype(np.int64)
        mult = np.array([min(max(rshift(int(mult[n]) * ((1 << 16) + int(m[n])), 16), 0), 1 << 24)
                         for n in range(len(mult))], dtype=np.int64)
    if key in bias:
        b = (np.zeros(len(mult), dtype=np.int64) if b is None else b) + bias[key].astype(np.int64)
    return type(lin)(torch.from_numpy(q.astype(np.int8)), torch.from_numpy(mult), int(lin.shift),
                     None if b is None else torch.from_numpy(b))


def reference_merge(model, tensors, fingerprint: bytes):
    """The adapted IntModel: ``tensors`` (an adapter's lora/scale/bias/gain dicts) merged into ``model``."""
    from dataclasses import replace

    import torch

    def gain(g, key):
        if key not in tensors.gain:
            return g
        out = np.clip(g.numpy().astype(np.int64) + tensors.gain[key].astype(np.int64), -32767, 32767)
        return torch.from_numpy(out)

    layers = []
    for i, layer in enumerate(model.layers):
        lin = {n: _merged_linear(getattr(layer, n), f"{i}.{n}", tensors.lora, tensors.scale, tensors.bias)
               for n in ("qkv", "o", "gate_up", "down")}
        layers.append(replace(layer, attn_gain=gain(layer.attn_gain, f"{i}.attn_gain"),
                              mlp_gain=gain(layer.mlp_gain, f"{i}.mlp_gain"), **lin))
    return replace(model, layers=layers, final_gain=gain(model.final_gain, "final_gain"), fingerprint=fingerprint)
