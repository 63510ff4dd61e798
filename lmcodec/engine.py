"""The exact engine: a Llama-family forward pass in integer arithmetic.

Every value is an integer and every step is specified to the bit
(docs/ENGINE.md), so the same tokens give the same logits -- and so the same
coding frequencies -- on any CPU or GPU, with any thread count, batch size or
batch composition, whether a sequence is run in one parallel pass or one token
at a time.  That is what makes archives portable, and it lets the encoder score
a whole segment in one pass while the decoder goes step by step.

Formats (``F`` = fractional bits; "row" = one token):

* residual stream: int64 at F = 16, clamped to +-2^40;
* activations entering a product: int16 range (|x| <= 32639) with a
  power-of-two exponent per row (real = x * 2^exp), split into two int8 halves
  so each product is an int8 x int8 GEMM with exact int32 sums (``torch._int_mm``);
* q, k, v, gate, up, attention output: int64 at F = 16;
* KV cache: int8 per (token, head) with the head's max magnitude (int32);
* logits: int64 ``lam`` with a per-row exponent (real logit = lam * 2^exp).

The :class:`Engine` is device-agnostic; :mod:`lmcodec.kernels` holds the
attention kernel, and :mod:`lmcodec.reference` the plain reference it is
tested against.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import fixedmath, kernels
from .errors import UsageError
from .quantize import IntLinear, IntModel

RESID_FRAC = 16
RESID_LIMIT = 1 << 40
ACT_FRAC = 16                # q, k, v, gate, up, attention output
QKV_LIMIT = (1 << 24) - 1
MLP_LIMIT = (1 << 26) - 1
ACT_MAX = 32639              # int16 operands: x = 256 hi + lo with hi, lo in [-128, 127]
Q_MAX = 32767                # queries stay int16 inside the attention kernel
RSQRT_BITS = 24              # 1/rms at 24 fractional bits
_POW2 = [1 << k for k in range(63)]


def pick_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UsageError(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' requested but no CUDA GPU is available")
    return device


@contextmanager
def torch_threads(n: int | None):
    """Run with ``n`` intra-op threads (speed only: results do not depend on it)."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# -- integer helpers -------------------------------------------------------------------------
def round_shift(x: torch.Tensor, s) -> torch.Tensor:
    """``x / 2^s`` rounded half up, for s >= 0 (an int or a broadcastable tensor); an int s < 0 shifts left."""
    if isinstance(s, int):
        return x if s == 0 else ((x + (1 << (s - 1))) >> s if s > 0 else x << -s)
    return (x + ((torch.ones_like(s) << s) >> 1)) >> s


def bit_length(m: torch.Tensor) -> torch.Tensor:
    """Bits needed for each non-negative int64 (0 for 0), by exact comparisons."""
    pow2 = torch.tensor(_POW2, dtype=torch.int64, device=m.device)
    return (m.unsqueeze(-1) >= pow2).sum(-1)


def fit_shift(m: torch.Tensor, limit: int) -> torch.Tensor:
    """Least s >= 0 with round_shift(m, s) <= limit, for m >= 0 (limit >= 2^14)."""
    s = (bit_length(m) - 15).clamp(min=0)
    over = round_shift(m, s) > limit
    return s + over.to(torch.int64)


def to_int16_rows(x: torch.Tensor, limit: int = ACT_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (last dim): ``(round_shift(x, s), s)`` with the least s that fits ``limit``."""
    s = fit_shift(x.abs().amax(dim=-1, keepdim=True), limit)
    return round_shift(x, s), s


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(n)) for int64 0 <= n < 2^60: a float estimate, then exact integer corrections."""
    r = torch.sqrt(n.to(torch.float64)).floor().to(torch.int64)
    for _ in range(2):
        r = torch.where(r * r > n, r - 1, r)
        r = torch.where((r + 1) * (r + 1) <= n, r + 1, r)
    return r


def int_matmul(x16: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact ``x16 @ w.T`` for |x16| <= 32639 (int64 [M, K]) and int8 ``w`` [N, K] -> int64 [M, N].

    x = 256 hi + lo with hi, lo in [-128, 127]; both halves go through one
    int8 x int8 -> int32 GEMM (sums below 2^31 for K < 2^17), combined in int64.
    """
    m = x16.shape[0]
    hi = (x16 + 128) >> 8
    lo = x16 - (hi << 8)
    both = torch.cat([hi, lo]).to(torch.int8)
    y = _int_mm(both, w)
    return (y[:m].to(torch.int64) << 8) + y[m:].to(torch.int64)


def _int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if a.device.type == "cuda" and a.shape[0] <= 16:  # cuBLASLt needs M > 16
        pad = torch.zeros((17 - a.shape[0], a.shape[1]), dtype=a.dtype, device=a.device)
        return torch._int_mm(torch.cat([a, pad]), w.t())[: a.shape[0]]
    return torch._int_mm(a, w.t())


def requant(y: torch.Tensor, lin: IntLinear, exp: torch.Tensor, frac: int) -> torch.Tensor:
    """A product ``y`` (rows with exponent ``exp``) times the weights' scales, at ``frac`` bits.

    real = y * mult * 2^(exp - shift); result = round(real * 2^frac).  |y * mult| < 2^58.
    """
    prod = y * lin.mult
    s = lin.shift - exp - frac
    right = round_shift(prod, s.clamp(min=0))
    left = prod.clamp(-(1 << 40), 1 << 40) << (-s).clamp(min=0, max=20)
    return torch.where(s >= 0, right, left)


@dataclass
class Logits:
    """Exact logits: real logit[i, v] = lam[i, v] * 2^exp[i]."""

    lam: torch.Tensor   # int64 [N, V]
    exp: torch.Tensor   # int64 [N, 1]


@dataclass
class KVCache:
    """Per layer: int8 keys/values [rows, kv heads, slots, head dim] and their magnitudes."""

    k: list[torch.Tensor]
    kmax: list[torch.Tensor]
    v: list[torch.Tensor]
    vmax: list[torch.Tensor]

    @classmethod
    def empty(cls, model: IntModel, rows: int, slots: int, device) -> "KVCache":
        a = model.arch
        shape = (rows, a.num_kv_heads, slots, a.head_dim)
        mk = lambda: [torch.zeros(shape, dtype=torch.int8, device=device) for _ in range(a.num_layers)]
        ms = lambda: [torch.zeros(shape[:3], dtype=torch.int32, device=device) for _ in range(a.num_layers)]
        return cls(mk(), ms(), mk(), ms())

    def copy_rows(self, src: "KVCache", n_slots: int) -> None:
        """Every row of self takes row 0 of ``src`` in slots [0, n_slots) (the shared prefix)."""
        for mine, theirs in ((self.k, src.k), (self.kmax, src.kmax), (self.v, src.v), (self.vmax, src.vmax)):
            for layer, (m, t) in enumerate(zip(mine, theirs)):
                m[:, :, :n_slots] = t[:1, :, :n_slots]


def kv_bytes(model_arch, rows: int, slots: int) -> int:
    """Memory of a :class:`KVCache` (int8 values, int32 magnitudes)."""
    return 2 * model_arch.num_layers * rows * model_arch.num_kv_heads * slots * (model_arch.head_dim + 4)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 [..., hd] -> (int8 round(127 x / max|x|), int32 max|x|) per head vector."""
    xmax = x.abs().amax(dim=-1, keepdim=True)
    safe = xmax.clamp(min=1)
    q = torch.div(2 * kernels.KV_MAX * x + safe, 2 * safe, rounding_mode="floor")
    return q.to(torch.int8), xmax.squeeze(-1).to(torch.int32)


class Engine:
    """The exact forward pass of one :class:`~lmcodec.quantize.IntModel` on one device."""

    def __init__(self, model: IntModel, device: str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(str(self.device)) if self.device.type != "cpu" else model
        self.arch = model.arch
        a = self.arch
        if a.num_heads % a.num_kv_heads or a.head_dim % 2:
            raise UsageError("unsupported attention shape")
        self.q_size = a.num_heads * a.head_dim
        self.kv_size = a.num_kv_heads * a.head_dim
        self._sigmoid = torch.as_tensor(fixedmath.sigmoid_table(), device=self.device)
        self._rope_n = 0
        self._cos = self._sin = None
        # eps in the units of rows shifted right by s: eps * 2^(2 (16 - s)) = eps_q32 / 4^s.
        eps = [round_half_up_shift(model.eps_q32, 2 * s) for s in range(64)]
        self._eps = torch.tensor(eps, dtype=torch.int64, device=self.device)

    @property
    def fingerprint(self) -> bytes:
        return self.model.fingerprint

    # -- building blocks -------------------------------------------------------------------
    def _rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        need = int(positions.max()) + 1
        if need > self._rope_n:
            n = max(need, 2 * self._rope_n, 4096)
            cos, sin = fixedmath.rope_tables(self.model.rope_theta, self.arch.head_dim, n)
            self._cos = torch.as_tensor(cos, device=self.device)
            self._sin = torch.as_tensor(sin, device=self.device)
            self._rope_n = n
        pos = positions.to(self.device)
        return self._cos[pos], self._sin[pos]

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate [B, T, heads, hd] by [T, hd/2] tables (Q16), rounded back to F = 16."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        r1 = round_shift(x1 * c - x2 * s, fixedmath.ROPE_BITS)
        r2 = round_shift(x2 * c + x1 * s, fixedmath.ROPE_BITS)
        return torch.cat([r1, r2], dim=-1).clamp(-QKV_LIMIT, QKV_LIMIT)

    def _rmsnorm(self, x: torch.Tensor, gain: torch.Tensor, gain_shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm of residual rows -> (int16-range rows, exponent per row)."""
        k = x.shape[-1]
        s = (bit_length(x.abs().amax(dim=-1, keepdim=True)) - 15).clamp(min=0)
        xs = round_shift(x, s)                               # |xs| <= 2^15
        ss = (xs * xs).sum(dim=-1, keepdim=True)             # < K 2^30
        d = (ss + k * self._eps[s]).clamp(min=1)
        rinv = isqrt(torch.div(k << (2 * RSQRT_BITS), d, rounding_mode="floor"))  # ~ 2^24 / rms
        t = xs * gain * rinv                                 # < 2^15 2^15 2^29
        h, s2 = to_int16_rows(t)
        return h, s2 - RSQRT_BITS - gain_shift

    def _linear(self, x16: torch.Tensor, exp: torch.Tensor, lin: IntLinear, frac: int) -> torch.Tensor:
        y = requant(int_matmul(x16, lin.weight), lin, exp, frac)
        return y if lin.bias is None else y + lin.bias

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Residual rows of tokens: the int8 embedding row times its scale, at F = 16."""
        e = self.model.embed
        rows = e.weight[ids].to(torch.int64) * e.mult[ids].unsqueeze(-1)
        return round_shift(rows, e.shift - RESID_FRAC)

    # -- the pass ----------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                key_ranges: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``ids`` [B, T] at ``positions`` [T], writing K/V at cache ``slots`` [T] of rows 0..B-1.

        Query ``(row, t)`` attends to cache slots ``[0, a) + [b, c)`` of its row,
        where ``key_ranges = (a, b, c)`` are [T] tensors.  Returns the final
        normalized hidden rows ``(h16 [B*T, H], exp [B*T, 1])``; :meth:`logits`
        turns any subset of them into logits.
        """
        a = self.arch
        B, T = ids.shape
        nh, nkv, hd = a.num_heads, a.num_kv_heads, a.head_dim
        dev = self.device
        ids = ids.to(dev)
        slots = slots.to(dev)
        cos, sin = self._rope_tables(positions)
        x = self.embed(ids).view(B * T, a.hidden_size)
        crow = torch.arange(B, device="cpu").repeat_interleave(T)
        ka, kb, kc_ = (r.repeat(B).cpu() for r in key_ranges)
        for li, layer in enumerate(self.model.layers):
            h, e = self._rmsnorm(x, layer.attn_gain, layer.attn_gain_shift)
            qkv = self._linear(h, e, layer.qkv, ACT_FRAC).clamp(-QKV_LIMIT, QKV_LIMIT)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = self._rope(q.reshape(B, T, nh, hd), cos, sin)
            k = self._rope(k.reshape(B, T, nkv, hd), cos, sin)
            k8, kmax = quantize_kv(k)
            v8, vmax = quantize_kv(v.reshape(B, T, nkv, hd))
            cache.k[li][:B, :, slots] = k8.transpose(1, 2)
            cache.kmax[li][:B, :, slots] = kmax.transpose(1, 2)
            cache.v[li][:B, :, slots] = v8.transpose(1, 2)
            cache.vmax[li][:B, :, slots] = vmax.transpose(1, 2)
            q16, qe = to_int16_rows(q, Q_MAX)                     # per (token, head)
            o = self._attend(q16.reshape(B * T, nh, hd), qe.reshape(B * T, nh), li, cache, crow, ka, kb, kc_)
            o16, eo = to_int16_rows(o.reshape(B * T, nh * hd))
            x = (x + self._linear(o16, eo - ACT_FRAC, layer.o, RESID_FRAC)).clamp(-RESID_LIMIT, RESID_LIMIT)
            h, e = self._rmsnorm(x, layer.mlp_gain, layer.mlp_gain_shift)
            gu = self._linear(h, e, layer.gate_up, ACT_FRAC).clamp(-MLP_LIMIT, MLP_LIMIT)
            g, u = gu.chunk(2, dim=-1)
            idx = (round_shift(g, ACT_FRAC - fixedmath.SIGMOID_STEP_BITS)
                   .clamp(-fixedmath.SIGMOID_RANGE << fixedmath.SIGMOID_STEP_BITS,
                          fixedmath.SIGMOID_RANGE << fixedmath.SIGMOID_STEP_BITS))
            silu = round_shift(g * self._sigmoid[idx + (fixedmath.SIGMOID_RANGE << fixedmath.SIGMOID_STEP_BITS)],
                               fixedmath.SIGMOID_VALUE_BITS)
            a16, ea = to_int16_rows(silu * u)                     # silu * u at F = 32
            x = (x + self._linear(a16, ea - 2 * ACT_FRAC, layer.down, RESID_FRAC)).clamp(-RESID_LIMIT, RESID_LIMIT)
        return self._rmsnorm(x, self.model.final_gain, self.model.final_gain_shift)

    def _attend(self, q16, qe, li, cache, crow, a, b, c) -> torch.Tensor:
        args = (q16.to(torch.int16), qe, cache.k[li], cache.kmax[li], cache.v[li], cache.vmax[li])
        rng = (crow, a, b, c)
        if self.device.type != "cpu":
            rng = tuple(t.to(self.device) for t in rng)
        return kernels.attend(*args, *rng)

    def logits(self, h16: torch.Tensor, exp: torch.Tensor) -> Logits:
        """Exact logits of final hidden rows: lam = (h16 W_head^T) * mult, exp = row exp - shift."""
        head = self.model.head
        lam = int_matmul(h16, head.weight) * head.mult
        return Logits(lam, exp - head.shift)


def round_half_up_shift(x: int, s: int) -> int:
    """Python-int version of :func:`round_shift` that also shifts left for s < 0."""
    return (x + (1 << (s - 1))) >> s if s > 0 else x << -s
