"""A lean batched Llama-family forward pass with a preallocated KV cache.

The coder needs one next-token distribution per position, and the decoder can
only compute them one step at a time.  So the encoder computes them the same
way: :class:`Lockstep` advances ``B`` segments together, one token each per
step, through exactly the kernels, shapes and thread count the decoder will use.
That, not any numerical tolerance, is what makes the two sides agree bit for bit.

Context handling: every segment starts from the same *prefix* (start token +
prompt), prefilled once at batch 1 and copied into each row of the cache.  When
a segment outgrows the cache, the oldest non-prefix entries are overwritten
(a ring buffer); the prefix stays as an attention sink.  RoPE is applied with
absolute positions when a key is written, so relative offsets stay exact.

Device-agnostic: the same code runs on CPU and CUDA tensors.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .errors import ModelError, UsageError
from .models import ArchConfig, LoadedModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UsageError(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' requested but no CUDA GPU is available")
    return device


def pick_dtype(dtype: str, device: str) -> str:
    """``auto`` -> float32 on CPU (bf16 is ~6x slower there), bfloat16 on CUDA."""
    if dtype == "auto":
        return "float32" if device == "cpu" else "bfloat16"
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return dtype


@contextmanager
def torch_threads(n: int):
    """Run with exactly ``n`` intra-op threads: CPU kernels split work by thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _pin_cuda_numerics() -> None:
    """Fix the process-wide CUDA matmul switches that change results.

    Encoder and decoder must not depend on what the host program set (TF32,
    reduced-precision reductions), and cuBLAS needs a fixed workspace to pick
    deterministic algorithms.
    """
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False


class Linear:
    """``y = x W^T + b`` with the fastest deterministic kernel this device offers.

    On CPU in float32 the weight is prepacked once for oneDNN, whose kernels run
    small-batch products (the decoder's shape: a few dozen rows) up to 2x
    faster than MKL's ``sgemm`` behind ``F.linear``, which repacks the weight at
    every call.  Elsewhere it is ``F.linear``.  Encoder and decoder make the
    same choice on the same machine, so both compute the same bits.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        self._packed = _pack_for_onednn(weight)
        if self._packed is not None:
            self.weight = None  # the packed copy replaces it

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def onednn_usable() -> bool:
    """Whether this torch build has oneDNN's prepacked linear (x86 and ARM CPU builds do)."""
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


def _pack_for_onednn(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not onednn_usable():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


class Engine:
    """Fused weights of one model on one device in one dtype."""

    def __init__(self, model: LoadedModel, device: str = "cpu", dtype: str = "float32"):
        a: ArchConfig = model.arch
        self.arch = a
        self.device = torch.device(device)
        if self.device.type == "cuda":
            _pin_cuda_numerics()
        self.dtype = DTYPES[dtype]
        w = model.weights
        pre = "model."

        def get(name: str) -> torch.Tensor:
            try:
                t = w[pre + name]
            except KeyError as exc:
                raise ModelError(f"weight {name!r} missing from the model") from exc
            return t.to(self.device, self.dtype).contiguous()

        def opt(name: str) -> torch.Tensor | None:
            return get(name) if pre + name in w else None

        self.embed = get("embed_tokens.weight")
        self.norm = get("norm.weight")
        self.lm_head = Linear(self.embed if a.tie_word_embeddings else (
            w["lm_head.weight"].to(self.device, self.dtype).contiguous()))
        self.layers = []
        for i in range(a.num_layers):
            p = f"layers.{i}."
            qkv_b = [opt(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
            self.layers.append(dict(
                attn_norm=get(p + "input_layernorm.weight"),
                qkv=Linear(torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"]).contiguous(),
                           torch.cat(qkv_b) if all(b is not None for b in qkv_b) else None),
                o=Linear(get(p + "self_attn.o_proj.weight")),
                mlp_norm=get(p + "post_attention_layernorm.weight"),
                gate_up=Linear(torch.cat([get(p + "mlp.gate_proj.weight"),
                                          get(p + "mlp.up_proj.weight")]).contiguous()),
                down=Linear(get(p + "mlp.down_proj.weight")),
            ))
        hd = a.head_dim
        self.inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        self.q_size = a.num_heads * hd
        self.kv_size = a.num_kv_heads * hd

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ang = positions.to(torch.float64)[:, None] * self.inv_freq[None, :]
        ang = torch.cat([ang, ang], dim=-1)
        return (ang.cos().to(self.device, self.dtype), ang.sin().to(self.device, self.dtype))

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.arch.rms_norm_eps)
        return weight * xf.to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of ``q`` [B, T, nh, hd] over cache entries ``[0, length)``.

        The query heads sharing a KV head are stacked into one matrix, so each
        cached key and value is read once per step for all of them: a decoding
        step is bound by reading the cache, not by arithmetic.
        """
        a = self.arch
        B, T, nh, hd = q.shape
        nkv = a.num_kv_heads
        group = nh // nkv
        keys = k_cache[:, :, :length]                    # [B, nkv, L, hd]
        values = v_cache[:, :, :length]
        qg = q.view(B, T, nkv, group, hd).permute(0, 2, 3, 1, 4).reshape(B, nkv, group * T, hd)
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float()
        if mask is not None:
            scores = scores.view(B, nkv, group, T, length).masked_fill(~mask, float("-inf"))
            scores = scores.view(B, nkv, group * T, length)
        attn = torch.softmax(scores, dim=-1).to(self.dtype)
        out = torch.matmul(attn, values)                 # [B, nkv, group*T, hd]
        return out.view(B, nkv, group, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, nh * hd)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, length: int,
                all_positions: bool = False) -> torch.Tensor:
        """Run ``ids`` [B, T] at ``positions`` [T], writing K/V at cache ``slots`` [T].

        Attention covers cache entries ``[0, length)``; when T > 1 (prefill) the
        entries are the T new ones and a causal mask applies.  Returns the
        float32 logits of the last position, [B, V] (of every position, [B, T, V],
        with ``all_positions``: used to measure, never to code).
        """
        a = self.arch
        B, T = ids.shape
        nh, nkv, hd = a.num_heads, a.num_kv_heads, a.head_dim
        cos, sin = self._rope(positions)
        mask = None
        if 1 < T < length:
            mask = torch.ones(T, length, dtype=torch.bool, device=self.device).tril(length - T)
        x = F.embedding(ids, self.embed)
        scale = 1.0 / math.sqrt(hd)
        for li, layer in enumerate(self.layers):
            h = self._rms(x, layer["attn_norm"])
            qkv = layer["qkv"](h)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            # The softmax scale goes on q (B*nh*hd values), not on the scores
            # (B*nh*length): for head_dim 64 it is 1/8, exact either way.
            q = self._rotate(q.view(B, T, nh, hd), cos[:, None, :], sin[:, None, :]) * scale
            k = self._rotate(k.view(B, T, nkv, hd), cos[:, None, :], sin[:, None, :])
            k_cache[li].index_copy_(2, slots, k.transpose(1, 2))
            v_cache[li].index_copy_(2, slots, v.view(B, T, nkv, hd).transpose(1, 2))
            if T > 1 and length == T:  # prefill from an empty cache: fused causal kernel
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, nkv, hd).transpose(1, 2),
                    is_causal=True, scale=1.0, enable_gqa=True)
                out = out.transpose(1, 2).reshape(B, T, nh * hd)
            else:
                out = self._attend(q, k_cache[li], v_cache[li], length, mask)
            x = x + layer["o"](out)
            h = self._rms(x, layer["mlp_norm"])
            gate, up = layer["gate_up"](h).chunk(2, dim=-1)
            x = x + layer["down"](F.silu(gate) * up)
        x = self._rms(x if all_positions else x[:, -1], self.norm)
        return self.lm_head(x).float()

    def score(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits at every position of ``ids`` [B, T] from one causal pass, [B, T, V].

        Used to measure (probe, benchmarks), never to code: the coder needs the
        step-by-step computation the decoder can repeat.
        """
        a = self.arch
        B, T = ids.shape
        shape = (a.num_layers, B, a.num_kv_heads, T, a.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        pos = torch.arange(T)
        return self.forward(ids.to(self.device), pos, pos.to(self.device), k, torch.zeros_like(k), T,
                            all_positions=True)


def kv_bytes(arch: ArchConfig, dtype: str, rows: int, capacity: int) -> int:
    """Memory the KV cache of ``rows`` x ``capacity`` tokens takes."""
    per_token = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * DTYPES[dtype].itemsize
    return per_token * rows * capacity


class Lockstep:
    """``batch`` segments advancing together, one token per segment per step.

    The cache holds ``min(context, len(prefix) + longest)`` entries: a segment
    never needs more, so short inputs get small caches.  Encoder and decoder
    know both numbers, so they allocate the same shapes.
    """

    def __init__(self, engine: Engine, prefix: list[int], batch: int, context: int, longest: int):
        a = engine.arch
        if not prefix:
            raise ValueError("prefix must hold at least the start token")
        if len(prefix) > context // 2:
            raise ValueError("prefix longer than half the context")
        self.engine = engine
        self.context = min(context, len(prefix) + longest)
        context = self.context
        self.sink = len(prefix)
        shape = (a.num_layers, batch, a.num_kv_heads, context, a.head_dim)
        dev = engine.device
        self.k = torch.zeros(shape, dtype=engine.dtype, device=dev)
        self.v = torch.zeros(shape, dtype=engine.dtype, device=dev)
        # Prefill the shared prefix once at batch 1, then copy it into every row.
        p = len(prefix)
        pk = torch.zeros((a.num_layers, 1, a.num_kv_heads, context, a.head_dim), dtype=engine.dtype, device=dev)
        pv = torch.zeros_like(pk)
        idx = torch.arange(p, device=dev)
        logits = engine.forward(torch.tensor([prefix], device=dev), idx.cpu(), idx, pk, pv, p)
        self.k[:, :, :, :p] = pk[:, :, :, :p]
        self.v[:, :, :, :p] = pv[:, :, :, :p]
        self.logits = logits.expand(batch, -1).contiguous()
        self.position = p

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [B]; return the next logits [B, V] (float32)."""
        pos = self.position
        ring = self.context - self.sink
        slot = pos if pos < self.context else self.sink + (pos - self.sink) % ring
        length = min(pos + 1, self.context)
        dev = self.engine.device
        self.logits = self.engine.forward(
            tokens.view(-1, 1).to(dev), torch.tensor([pos]), torch.tensor([slot], device=dev),
            self.k, self.v, length)
        self.position = pos + 1
        return self.logits
