"""Gemma 3's layers in the exact engine (docs/ENGINE.md, "Gemma 3").

A Gemma 3 layer is a Llama layer with more norms and a local attention: q and
k are RMS-normalized per head before RoPE, the outputs of attention and of the
MLP are RMS-normalized before they join the residual stream, the MLP's gate is
GELU (tanh form) from an integer table, and the "sliding" layers see only the
last ``sliding_window`` positions, with their own RoPE base.

Every step is the engine's backend's when it computes Gemma's forms
(``GEMMA_STEPS``: the numba kernels, the tensor operations and the Triton
kernels): the MLP with the table it is given, attention with a window and a
scale, ``qkv`` with the q/k norms, and ``add_normed``, the residual add through
a post norm.  A pass runs its layers op by op (:func:`forward_layers`); a decoding
step's few rows on the CPU take the fused step instead (one numba kernel a layer
with Gemma's parts switched on, :mod:`lmcodec.engine.cpu.fused`).
"""

from __future__ import annotations

import torch

from . import ops_torch
from .model.registry import ArchConfig
from .spec import fixedmath
from .spec.constants import ACT_FRAC


def has_gemma_parts(arch: ArchConfig) -> bool:
    """Whether ``arch`` has any part a Llama lacks (any Gemma 3 feature)."""
    return (arch.hidden_act != "silu" or arch.embed_scale or arch.qk_norm or arch.post_norms
            or bool(arch.sliding_window) or bool(arch.query_pre_attn_scalar))


def steps_for(backend):
    """The steps a Gemma model runs on where ``backend`` is the device's: its own when it computes
    Gemma's forms (attention with a window and scale, the MLP with any gate table), else ops_torch's."""
    return backend if getattr(backend, "GEMMA_STEPS", False) else ops_torch


def embed_scale(arch: ArchConfig) -> int | None:
    """sqrt(hidden_size) at 16 fractional bits, floor (``isqrt(H 2^32)``); None: no scale."""
    return fixedmath.isqrt_int(arch.hidden_size << 32) if arch.embed_scale else None


def activation_table(arch: ArchConfig):
    """The MLP gate's table: the logistic (SiLU) or GELU's tanh gate, both ``x * T[x]``."""
    return fixedmath.gelu_gate_table() if arch.hidden_act == "gelu_pytorch_tanh" else fixedmath.sigmoid_table()


def attention_constant(arch: ArchConfig) -> int:
    """Scores -> base-2 exponent with the scale query_pre_attn_scalar^-1/2 (head_dim^-1/2 without it)."""
    return fixedmath.att_log2e(arch.query_pre_attn_scalar or arch.head_dim)


def forward_layers(engine, mm, x: torch.Tensor, rope: dict, B: int, T: int, positions: torch.Tensor,
                   cache, crow: torch.Tensor, keys: tuple, local_keys: tuple | None, release: bool = False) -> None:
    """Run every layer on residual rows ``x`` [B*T, H] in place (``mm``: the engine's exact int8 product).

    ``rope``: RoPE base -> (cos, sin) rows of the queries; ``positions`` [B*T] (flattened
    per query) bound the local layers' windows: query at p sees keys at positions > p - W.
    ``keys = (slots, a, b, c)``: where each query writes its key and which slots it reads
    (Engine.forward); ``local_keys`` the same in the local layers' own slots (None: they
    share the global layers' slots).  ``release``: each layer's weights back to the page cache after
    the layer (Engine.forward's ``release``, already limited to a CPU).
    """
    a, ops, eps = engine.arch, engine.ops, engine._eps
    nh, nkv, hd = a.num_heads, a.num_kv_heads, a.head_dim
    lc = engine.att_constant
    lowest = positions - a.sliding_window + 1 if a.sliding_window else None
    for li, layer in enumerate(engine.model.layers):
        local = a.is_local(li)
        slots, ka, kb, kc = local_keys if local and local_keys is not None else keys
        cos, sin = rope[a.layer_theta(li)]
        h, e = ops.norm(x, layer.attn_gain, layer.attn_gain_shift, eps)
        lin = layer.qkv
        caches = (cache.k[li], cache.kmax[li], cache.v[li], cache.vmax[li], slots)
        qk = (layer.q_gain, layer.q_gain_shift, layer.k_gain, layer.k_gain_shift, eps) if a.qk_norm else None
        q16, qe = ops.qkv(mm(h, lin.weight), lin.mult, lin.shift, lin.bias, e, cos, sin, B, T, nh, nkv, hd,
                          *caches, qk)
        window = (cache.key_positions(True), lowest) if local else None
        o = ops.attend(q16, qe, cache.k[li], cache.kmax[li], cache.v[li], cache.vmax[li], crow, ka, kb, kc,
                       window, lc)
        o16, so = ops.operand(o.reshape(B * T, nh * hd))
        _add(ops, mm(o16, layer.o.weight), x, so - ACT_FRAC, layer.o, layer.post_attn_gain,
             layer.post_attn_gain_shift, eps)
        h, e = ops.norm(x, layer.mlp_gain, layer.mlp_gain_shift, eps)
        lin = layer.gate_up
        a16, sa = ops.mlp(mm(h, lin.weight), lin.mult, lin.shift, e, engine._sigmoid)
        _add(ops, mm(a16, layer.down.weight), x, sa - 2 * ACT_FRAC, layer.down, layer.post_mlp_gain,
             layer.post_mlp_gain_shift, eps)
        if release:
            engine.release_layer(layer)


def _add(ops, y: torch.Tensor, x: torch.Tensor, exp: torch.Tensor, lin, gain, gain_shift: int, eps) -> None:
    """x += the product ``y`` of an operand with ``lin``, RMS-normalized with ``gain`` first when there is one."""
    if gain is None:
        ops.residual_add(x, y, lin.mult, lin.shift, exp)
    else:
        ops.add_normed(x, y, lin.mult, lin.shift, exp, gain, gain_shift, eps)
