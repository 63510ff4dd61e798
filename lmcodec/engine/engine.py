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

The :class:`Engine` is device-agnostic: it runs the integer steps of a backend
module chosen explicitly by device (:func:`backend`): :mod:`lmcodec.engine.cpu.ops`
(numba) on CPU, :mod:`lmcodec.engine.triton.ops` (Triton kernels) on CUDA,
:mod:`lmcodec.engine.ops_torch` (tensor operations) elsewhere; all three are tested
bit-equal to the plain reference :mod:`lmcodec.engine.spec.reference`.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import torch

from ..errors import UsageError
from . import gemma, ops_torch
from .kvcache import KVCache
from .model import mapped
from .model.quantize import IntModel
from .spec import fixedmath
from .spec.constants import ACT_FRAC, MAX_HEAD_DIM, RESID_FRAC, bucket_width


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


def int_mm(h16: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact products of operand rows with int8 weights ``w`` [N, K]: [hi rows; lo rows] int32.

    int8 x int8 sums stay below 2^31 for K < 2^17, so every GEMM kernel returns the same
    integers; on a CPU :mod:`lmcodec.engine.cpu.gemm` picks the faster of two exact kernels.
    """
    ops = backend(h16.device)
    if h16.device.type == "cpu":
        from .cpu import gemm

        return gemm.products(h16, w, ops.split)
    a = ops.split(h16)
    if a.device.type == "cuda" and a.shape[0] <= 16:  # cuBLASLt needs M > 16
        pad = torch.zeros((17 - a.shape[0], a.shape[1]), dtype=a.dtype, device=a.device)
        return torch._int_mm(torch.cat([a, pad]), w.t())[: a.shape[0]]
    return torch._int_mm(a, w.t())


def backend(device: torch.device):
    """The integer steps for ``device``: numba kernels on CPU, Triton kernels on CUDA, tensor operations elsewhere."""
    return _backend(device.type)


@functools.cache
def _backend(kind: str):
    if kind == "cpu":
        # numba loads only where the CPU path runs
        from .cpu import ops as cpu_ops
        return cpu_ops
    if kind == "cuda":
        # triton loads only where the CUDA path runs
        from .triton import ops as triton_ops
        return triton_ops
    return ops_torch


@dataclass
class Logits:
    """Exact logits: real logit[i, v] = lam[i, v] * 2^exp[i]."""

    lam: torch.Tensor   # int64 [N, V]
    exp: torch.Tensor   # int64 [N, 1]


def _per_row(t: torch.Tensor, B: int, shared: bool) -> torch.Tensor:
    """A value given per position ([T, ...], shared by the B rows) repeated for each row ([B*T, ...])."""
    return t.repeat(B, *([1] * (t.dim() - 1))) if shared else t


def _flat_keys(slots: torch.Tensor, key_ranges, B: int, T: int, dev) -> tuple:
    """Slots and key ranges in the ops' layout: slots [T] stay shared by the B rows (their ranges
    repeated per row), per-row [B, T] ones are flattened to [B*T] (row b T + t)."""
    if slots.dim() == 1:
        return (slots, *(r.to(dev).repeat(B) for r in key_ranges))
    return (slots.reshape(B * T), *(r.to(dev).reshape(B * T) for r in key_ranges))


#: Positions whose RoPE block rows the engine adds at a time (a multiple of fixedmath.ROPE_BLOCK).
#: Each entry of a block row is an exact fixed-point series in Python (~40 us): 8,192 positions
#: are 128 rows of hd/2 entries per RoPE base, 4,096 entries for SmolLM2 and 16,384 for each of
#: Gemma's two bases (1.3 s of every Gemma process's start); 1,024 positions at a time cost what
#: a small file needs. Rows do not depend on how they are grown (each is computed on its own).
ROPE_RANGE = 1024


class Engine:
    """The exact forward pass of one :class:`~lmcodec.engine.model.quantize.IntModel` on one device."""

    def __init__(self, model: IntModel, device: str = "cpu", ops=None):
        self.device = torch.device(device)
        self.model = model.to(str(self.device)) if self.device.type != "cpu" else model
        self.arch = model.arch
        self.ops = ops or backend(self.device)
        a = self.arch
        if gemma.has_gemma_parts(a):
            # Gemma 3's attention windows and scale, its norms and GELU table: the backends that
            # compute them (GEMMA_STEPS: numba, tensor ops, Triton) run it; any other op set is
            # refused (gemma.py).
            if ops is not None and gemma.steps_for(ops) is not ops:
                raise UsageError(f"{a.model_type} does not run on the {ops.__name__} kernels")
            self.ops = gemma.steps_for(self.ops)
        if a.num_heads % a.num_kv_heads or a.head_dim % 2 or a.head_dim > MAX_HEAD_DIM:
            raise UsageError(f"unsupported attention shape (head dim {a.head_dim}: even, at most {MAX_HEAD_DIM})")
        self.q_size = a.num_heads * a.head_dim
        self.kv_size = a.num_kv_heads * a.head_dim
        self._sigmoid = torch.as_tensor(gemma.activation_table(a), device=self.device)
        self._embed_scale = gemma.embed_scale(a)
        #: Scores -> base-2 exponent (gemma.attention_constant): the kernels take it from here.
        self.att_constant = gemma.attention_constant(a)
        # RoPE: cos/sin of every offset in a block of 64 positions, and of each block's start
        # (grown as positions are reached): a position's row combines the two on the device.
        # One pair per RoPE base (Gemma 3's local layers have their own).
        self._thetas = sorted({a.layer_theta(i) for i in range(a.num_layers)} | {a.rope_theta})
        self._rope_lo = {th: torch.as_tensor(fixedmath.rope_offsets(self._fraction(th), a.head_dim),
                                             device=self.device) for th in self._thetas}
        self._rope_hi = {th: torch.zeros((2, 0, a.head_dim // 2), dtype=torch.int64, device=self.device)
                         for th in self._thetas}
        # eps in the units of rows shifted right by s: eps * 2^(2 (16 - s)) = eps_q32 / 4^s.
        eps = [(model.eps_q32 + (1 << (2 * s - 1))) >> (2 * s) if s else model.eps_q32 for s in range(64)]
        self._eps = torch.tensor(eps, dtype=torch.int64, device=self.device)
        # Arrays a backend makes once and reuses every step (the fused CPU step's weights as numpy
        # arrays, its scratch rows per row count): gpt-fast's setup_caches, made on first use.
        self.scratch: dict = {}

    @property
    def fingerprint(self) -> bytes:
        return self.model.fingerprint

    def _fraction(self, theta: float):
        """A RoPE base as the exact rational the tables take (the model's own for rope_theta)."""
        return self.model.rope_theta if theta == self.arch.rope_theta else Fraction(theta)

    def reserve_positions(self, n: int) -> None:
        """Make positions [0, n) usable (RoPE block rows, added ROPE_RANGE positions at a time).
        Host work; a static-shape step calls it once, before capture."""
        for th in self._thetas:
            have = self._rope_hi[th].shape[1]
            need = -(-n // fixedmath.ROPE_BLOCK)
            if need <= have:
                continue
            per = ROPE_RANGE // fixedmath.ROPE_BLOCK
            need = -(-need // per) * per
            rows = fixedmath.rope_block_starts(self._fraction(th), self.arch.head_dim, have, need - have)
            self._rope_hi[th] = torch.cat([self._rope_hi[th], torch.as_tensor(rows, device=self.device)], dim=1)

    def _rope_tables(self, positions: torch.Tensor, bound: int | None = None,
                     theta: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows of ``positions`` (any shape: [T], or per row [B, T]) -> [..., hd/2].

        Each row combines its block's and its offset's rows (fixedmath.rope_combine: the
        same integers as fixedmath.rope_tables), so rows at any positions cost the same.
        ``bound`` > every position skips reading them: without it the largest is read
        on the host (a sync when they live on a GPU).
        """
        self.reserve_positions(bound if bound is not None else int(positions.max()) + 1)
        th = self.arch.rope_theta if theta is None else theta
        p = positions.to(self.device)
        block = torch.div(p, fixedmath.ROPE_BLOCK, rounding_mode="floor")
        hi, lo = self._rope_hi[th][:, block], self._rope_lo[th][:, p - block * fixedmath.ROPE_BLOCK]
        return fixedmath.rope_combine(hi[0], hi[1], lo[0], lo[1])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Residual rows of tokens: the int8 embedding row times its scale, at 16 fractional bits."""
        e = self.model.embed
        rows = e.weight[ids].to(torch.int64) * e.mult[ids].unsqueeze(-1)
        if self._embed_scale is not None:  # Gemma: times sqrt(H) at 16 fractional bits
            return ops_torch.round_shift(rows * self._embed_scale, e.shift)
        return ops_torch.round_shift(rows, e.shift - RESID_FRAC)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                key_ranges: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                bound: int | None = None, local: tuple | None = None,
                release: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``ids`` [B, T] at ``positions``, writing K/V at cache ``slots`` of rows 0..B-1.

        ``positions``, ``slots`` and each of ``key_ranges = (a, b, c)`` are either
        [T] (shared by every row: a pass over one segment, a lockstep batch) or
        [B, T] (per row: rows at different positions in one step, docs/ENGINE.md,
        "Rows at their own positions").  Query ``(row, t)`` sits at position
        ``positions[row, t]``, writes its key and value to slot ``slots[row, t]``
        of its row and attends to slots ``[0, a) + [b, c)`` of its row.  Returns
        the final normalized hidden rows as an operand ``(h16 [B*T, H] int16,
        exp [B*T, 1])``; :meth:`weights` and :meth:`logits` take any subset of them.
        ``bound`` (> every position, when the caller knows one) spares reading the
        positions on the host: then nothing in the pass waits for the device.
        ``local = (slots, key_ranges)``, in the same layout: the local layers' own, for a
        cache that gives them their own slots (``KVCache.local_pos``; given exactly then).
        ``release``: on a CPU, give each layer's weights back to the page cache after the layer
        (:func:`lmcodec.engine.model.mapped.release`), for a sweep of wide passes (the encoder's
        chunks of 512 positions): the process then holds one layer's weights at a time, and maps
        the next chunk's back in ~15 ms (SmolLM2) against the chunk's seconds.  Not for
        decoding's passes, which would pay those milliseconds on every pass.
        """
        a, ops, dev = self.arch, self.ops, self.device
        B, T = ids.shape
        nh, nkv, hd = a.num_heads, a.num_kv_heads, a.head_dim
        ids, slots = ids.to(dev), slots.to(dev)
        if positions.dim() != slots.dim() or any(r.dim() != slots.dim() for r in key_ranges):
            raise ValueError("positions, slots and key ranges must all be [T] or all [B, T]")
        cos, sin = self._rope_tables(positions, bound)
        x = self.embed(ids).reshape(B * T, a.hidden_size).contiguous()
        crow = torch.arange(B, device=dev).repeat_interleave(T)
        shared = slots.dim() == 1
        slots, ka, kb, kc = _flat_keys(slots, key_ranges, B, T, dev)
        if not shared:  # the ops take per-row values flattened, row b T + t: [B*T] slots, [B*T, hd/2] RoPE rows
            cos, sin = cos.reshape(B * T, -1), sin.reshape(B * T, -1)
        if (local is None) != (cache.local_pos is None):
            raise ValueError("local slots and key sets go with a cache whose local layers have their own slots")
        # A step's few rows: one kernel per layer (cpu.ops's fused step), every value given per row.
        fused = getattr(ops, "forward_rows", None) if B * T <= getattr(ops, "FUSED_ROWS", 0) else None
        release = release and dev.type == "cpu"
        if gemma.has_gemma_parts(a):
            pos = positions.to(dev).expand(B, T).reshape(B * T)
            local_keys = None if local is None else _flat_keys(local[0].to(dev), local[1], B, T, dev)
            if cache.pos is not None:
                cache.pos[crow, slots.repeat(B) if shared else slots] = pos
            if local_keys is not None:
                at = local_keys[0]
                cache.local_pos[crow, at.repeat(B) if shared else at] = pos
            rope = {th: (cos, sin) if th == a.rope_theta else self._rope_flat(positions, bound, th, B, shared)
                    for th in self._thetas}
            if fused is not None:
                lowest = pos - a.sliding_window + 1 if a.sliding_window else None
                tables = {th: (_per_row(c, B, shared), _per_row(s, B, shared)) for th, (c, s) in rope.items()}
                own = None if local_keys is None else (_per_row(local_keys[0], B, shared), *local_keys[1:])
                return fused(self, x, tables, crow, (_per_row(slots, B, shared), ka, kb, kc), cache, own, lowest)
            gemma.forward_layers(self, int_mm, x, rope, B, T, pos, cache, crow, (slots, ka, kb, kc), local_keys,
                                 release)
            return ops.norm(x, self.model.final_gain, self.model.final_gain_shift, self._eps)
        if fused is not None:
            return fused(self, x, {a.rope_theta: (_per_row(cos, B, shared), _per_row(sin, B, shared))}, crow,
                         (_per_row(slots, B, shared), ka, kb, kc), cache)
        for li, layer in enumerate(self.model.layers):
            h, e = ops.norm(x, layer.attn_gain, layer.attn_gain_shift, self._eps)
            lin = layer.qkv
            q16, qe = ops.qkv(int_mm(h, lin.weight), lin.mult, lin.shift, lin.bias, e, cos, sin, B, T, nh, nkv, hd,
                              cache.k[li], cache.kmax[li], cache.v[li], cache.vmax[li], slots)
            o = ops.attend(q16, qe, cache.k[li], cache.kmax[li], cache.v[li], cache.vmax[li], crow, ka, kb, kc)
            o16, so = ops.operand(o.reshape(B * T, nh * hd))
            ops.residual_add(x, int_mm(o16, layer.o.weight), layer.o.mult, layer.o.shift, so - ACT_FRAC)
            h, e = ops.norm(x, layer.mlp_gain, layer.mlp_gain_shift, self._eps)
            lin = layer.gate_up
            a16, sa = ops.mlp(int_mm(h, lin.weight), lin.mult, lin.shift, e, self._sigmoid)
            ops.residual_add(x, int_mm(a16, layer.down.weight), layer.down.mult, layer.down.shift, sa - 2 * ACT_FRAC)
            if release:
                self.release_layer(layer)
        return ops.norm(x, self.model.final_gain, self.model.final_gain_shift, self._eps)

    def _rope_flat(self, positions: torch.Tensor, bound: int | None, theta: float, B: int, shared: bool):
        """RoPE rows of base ``theta`` in the ops' layout: [T, hd/2] shared, or [B*T, hd/2] per row."""
        cos, sin = self._rope_tables(positions, bound, theta)
        return (cos, sin) if shared else (cos.reshape(B * positions.shape[1], -1), sin.reshape(B * positions.shape[1], -1))

    def weights(self, h16: torch.Tensor, exp: torch.Tensor, alphabet: int) -> torch.Tensor:
        """Integer weights of every coding symbol for hidden rows: [N, 256, width] int64 (frequencies.py)."""
        return ops_torch.weights_from_gaps(self.gaps(h16, exp), alphabet, bucket_width(alphabet))

    def gaps(self, h16: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
        """Each token's gap below the best logit, [N, V] int64 (ops_torch.gaps).

        :func:`lmcodec.engine.ops_torch.weights_from_gaps` turns them into the same
        weights as :meth:`weights`; in between, the online bias
        (:mod:`lmcodec.coding.mixing`) shifts them.
        """
        head = self.model.head
        fused = getattr(self.ops, "gaps_rows", None)
        if fused is not None and h16.shape[0] <= self.ops.FUSED_ROWS:
            return fused(self, h16, exp)
        return self.ops.gaps(int_mm(h16, head.weight), head.mult, exp - head.shift)

    def release_layer(self, layer) -> None:
        """Give a layer's weight matrices back to the page cache (``forward(release=True)``)."""
        for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
            mapped.release(lin.weight.numpy())

    def logits(self, h16: torch.Tensor, exp: torch.Tensor) -> Logits:
        """Exact logits of hidden rows: lam = (h W_head^T) * mult, real logit = lam * 2^exp."""
        head = self.model.head
        return Logits(ops_torch.combine(int_mm(h16, head.weight)) * head.mult, exp - head.shift)
