"""Fitting a dictionary: a small float adapter trained on samples, then quantized to integers.

(``training``, not ``train``: :func:`lmcodec.train` is the package's function, and a
submodule of the same name would replace it on the package once imported.)

All float and autograd code of lmcodec's dictionaries lives here and is imported
lazily (``lmcodec train``, :func:`lmcodec.train`); the engine, ``ops_*`` and the
decoder never import it.  Decoding depends only on the integers the result
holds (:mod:`lmcodec.dictionary.adapter`), so float results that differ between machines
give another dictionary (another id), never a wrong decode.

The frozen base is **exactly the engine's integer model dequantized**
(``q * mult * 2^-shift``, ``G * 2^-gs``), so the adapter learns to correct the
int8 model the decoder runs, not the float model it came from.  What it adapts
(measured on records/aws-paginators, docs/DICTIONARIES.md):

* every linear layer's rows get a scale ``1 + s_n`` (the engine's row
  multiplier ``mult_n`` at 24 bits: the finest handle the engine has);
* the RMSNorm gains (15-bit integers) get a delta;
* q/k/v get a bias (the engine adds one at 16 fractional bits);
* optionally a rank-r LoRA ``B A`` on chosen projections, merged into the int8
  weights; int8 is coarse (a delta below half a step vanishes), so it is trained
  through the rounding with a straight-through estimator.

Plain torch rather than PEFT: the base is not an ``nn.Module`` from
transformers but the integer model's tensors, and the adapted pieces (row
scales, gain deltas, a bias where the model has none, a LoRA that must see the
int8 rounding) are not PEFT's layer types; the forward below is 60 lines.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.model.quantize import IntLinear, IntModel
from .adapter import LINEARS, Adapter, AdapterTensors, quantize_lora, quantize_scale

#: Samples are cut into sequences of at most this many tokens (start token
#: included): the codec's small files fit whole; longer samples become several.
SEQ_TOKENS = 512


def _deq_linear(lin: IntLinear) -> torch.Tensor:
    """Real weight ``q * mult * 2^-shift`` (float64 product, then float32)."""
    scale = lin.mult.double() * 2.0 ** -lin.shift
    return (lin.weight.double() * scale[:, None]).float()


def _deq_gain(g: torch.Tensor, gs: int) -> torch.Tensor:
    return (g.double() * 2.0 ** -gs).float()


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward: trains a delta that survives the int8 grid."""
    return x + (torch.round(x) - x).detach()


@dataclass
class Spec:
    """What to adapt: LoRA rank and targets, and the fine-grained parts."""

    rank: int = 0
    lora_on: tuple[str, ...] = ("qkv", "o", "gate_up", "down")
    scales: bool = True
    gains: bool = True
    qkv_bias: bool = True


@dataclass
class _Params:
    lora_a: dict[str, torch.Tensor] = field(default_factory=dict)
    lora_b: dict[str, torch.Tensor] = field(default_factory=dict)
    scale: dict[str, torch.Tensor] = field(default_factory=dict)
    gain: dict[str, torch.Tensor] = field(default_factory=dict)
    bias: dict[str, torch.Tensor] = field(default_factory=dict)

    def all(self) -> list[torch.Tensor]:
        return [*self.lora_a.values(), *self.lora_b.values(), *self.scale.values(), *self.gain.values(),
                *self.bias.values()]


class FloatModel:
    """The integer model dequantized (frozen) plus trainable adapter parameters."""

    def __init__(self, model: IntModel, spec: Spec, seed: int = 0):
        self.model, self.spec, self.arch = model, spec, model.arch
        a = model.arch
        gen = torch.Generator().manual_seed(seed)
        self.lin: dict[str, torch.Tensor] = {}
        self.unit: dict[str, torch.Tensor] = {}     # real value of one int8 step per row
        self.gain: dict[str, torch.Tensor] = {}
        self.base_bias: dict[str, torch.Tensor] = {}
        p = self.p = _Params()
        for i, layer in enumerate(model.layers):
            for name in LINEARS:
                lin: IntLinear = getattr(layer, name)
                key = f"{i}.{name}"
                self.lin[key] = _deq_linear(lin)
                self.unit[key] = (lin.mult.double() * 2.0 ** -lin.shift).float()
                n, k = lin.weight.shape
                if spec.rank and name in spec.lora_on:
                    p.lora_a[key] = (torch.randn(spec.rank, k, generator=gen) / math.sqrt(k)).requires_grad_()
                    p.lora_b[key] = torch.zeros(n, spec.rank, requires_grad=True)
                if spec.scales:
                    p.scale[key] = torch.zeros(n, requires_grad=True)
                if name == "qkv":
                    if lin.bias is not None:
                        self.base_bias[key] = (lin.bias.double() * 2.0 ** -16).float()
                    if spec.qkv_bias:
                        p.bias[key] = torch.zeros(n, requires_grad=True)
            for gname in ("attn_gain", "mlp_gain"):
                key = f"{i}.{gname}"
                self.gain[key] = _deq_gain(getattr(layer, gname), getattr(layer, gname + "_shift"))
                if spec.gains:
                    p.gain[key] = torch.zeros_like(self.gain[key], requires_grad=True)
        self.gain["final_gain"] = _deq_gain(model.final_gain, model.final_gain_shift)
        if spec.gains:
            p.gain["final_gain"] = torch.zeros_like(self.gain["final_gain"], requires_grad=True)
        self.head = _deq_linear(model.head)
        self.embed = self.head if model.embed is model.head else _deq_linear(model.embed)
        hd = a.head_dim
        self.inv_freq = 1.0 / (float(model.rope_theta) ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        self.quantized = False   # evaluate with the adapter's integer rounding (after training)

    # -- the forward pass --------------------------------------------------------------
    def weight(self, key: str) -> torch.Tensor:
        w = self.lin[key]
        if key in self.p.lora_a:
            delta = (self.p.lora_b[key] @ self.p.lora_a[key]) / self.unit[key][:, None]   # in int8 steps
            w = w + _round_ste(delta) * self.unit[key][:, None]
        if key in self.p.scale:
            w = w * (1 + self.p.scale[key])[:, None]
        return w

    def norm(self, x: torch.Tensor, key: str) -> torch.Tensor:
        g = self.gain[key] + self.p.gain[key] if key in self.p.gain else self.gain[key]
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.arch.rms_norm_eps) * g

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[-2]
        ang = torch.arange(t, dtype=torch.float64, device=x.device)[:, None] * self.inv_freq[None, :]
        cos, sin = torch.cos(ang).float(), torch.sin(ang).float()
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V] (causal; right padding never reaches a real position)."""
        a = self.arch
        nh, nkv, hd = a.num_heads, a.num_kv_heads, a.head_dim
        bsz, t = ids.shape
        x = F.embedding(ids, self.embed)
        for i in range(a.num_layers):
            h = self.norm(x, f"{i}.attn_gain")
            qkv = h @ self.weight(f"{i}.qkv").T
            key = f"{i}.qkv"
            if key in self.base_bias:
                qkv = qkv + self.base_bias[key]
            if key in self.p.bias:
                qkv = qkv + self.p.bias[key]
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            q = self.rope(q.view(bsz, t, nh, hd).transpose(1, 2))
            k = self.rope(k.view(bsz, t, nkv, hd).transpose(1, 2))
            v = v.view(bsz, t, nkv, hd).transpose(1, 2)
            k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + att.transpose(1, 2).reshape(bsz, t, nh * hd) @ self.weight(f"{i}.o").T
            h = self.norm(x, f"{i}.mlp_gain")
            g, u = (h @ self.weight(f"{i}.gate_up").T).split(a.intermediate_size, dim=-1)
            x = x + (F.silu(g) * u) @ self.weight(f"{i}.down").T
        return self.norm(x, "final_gain") @ self.head.T

    # -- to integers ---------------------------------------------------------------------
    def to_tensors(self) -> AdapterTensors:
        """The trained parameters in the engine's integer spec (docs/ENGINE.md, "Dictionaries")."""
        t = AdapterTensors()
        with torch.no_grad():
            for i, layer in enumerate(self.model.layers):
                for name in LINEARS:
                    key = f"{i}.{name}"
                    if key in self.p.lora_a:
                        b_units = self.p.lora_b[key].double() / self.unit[key].double()[:, None]
                        t.lora[key] = quantize_lora(self.p.lora_a[key].double().cpu().numpy(), b_units.cpu().numpy())
                    if key in self.p.scale:
                        t.scale[key] = quantize_scale(self.p.scale[key].double().cpu().numpy())
                    if key in self.p.bias:
                        t.bias[key] = np.round(self.p.bias[key].double().cpu().numpy() * 65536).astype(np.int32)
                for gname in ("attn_gain", "mlp_gain"):
                    key = f"{i}.{gname}"
                    if key in self.p.gain:
                        gs = getattr(layer, gname + "_shift")
                        t.gain[key] = np.round(self.p.gain[key].double().cpu().numpy() * 2.0 ** gs).astype(np.int32)
            if "final_gain" in self.p.gain:
                gs = self.model.final_gain_shift
                t.gain["final_gain"] = np.round(self.p.gain["final_gain"].double().cpu().numpy() * 2.0 ** gs).astype(np.int32)
        return t


def sequences(samples: Iterable[bytes], tok, max_tokens: int) -> list[list[int]]:
    """Each sample as [start token] + its model inputs, cut at SEQ_TOKENS, at most max_tokens in all."""
    out: list[list[int]] = []
    total = 0
    for raw in samples:
        ids = tok.model_inputs(tok.encode(raw)).tolist()
        for j in range(0, max(len(ids), 1), SEQ_TOKENS - 1):
            seq = [tok.start_token] + ids[j:j + SEQ_TOKENS - 1]
            if len(seq) < 2:
                continue
            seq = seq[:max(2, max_tokens - total)]
            out.append(seq)
            total += len(seq)
            if total >= max_tokens:
                return out
    return out


def _batches(seqs: list[list[int]], batch_tokens: int, rng: np.random.Generator) -> list[list[list[int]]]:
    """Shuffle, then group sequences of similar length up to ~batch_tokens padded tokens."""
    order = rng.permutation(len(seqs)).tolist()
    out, cur, width = [], [], 0
    for i in order:
        s = seqs[i]
        w = max(width, len(s))
        if cur and w * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, w = [], len(s)
        cur.append(s)
        width = w
    if cur:
        out.append(cur)
    return out


def _pad(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(s) for s in batch)
    ids = torch.zeros(len(batch), t, dtype=torch.long)
    tgt = torch.full((len(batch), t), -100, dtype=torch.long)
    for r, s in enumerate(batch):
        ids[r, :len(s)] = torch.tensor(s)
        tgt[r, :len(s) - 1] = torch.tensor(s[1:])
    return ids, tgt


def loss_bits(fm: FloatModel, seqs: list[list[int]], batch_tokens: int = 2048) -> tuple[float, int]:
    """(total bits, predicted tokens) of ``seqs`` under ``fm`` (no gradient)."""
    bits, n = 0.0, 0
    with torch.no_grad():
        for batch in _batches(seqs, batch_tokens, np.random.default_rng(0)):
            ids, tgt = (t.to(fm.head.device) for t in _pad(batch))
            logits = fm.forward(ids)
            ce = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="sum")
            bits += float(ce) / math.log(2)
            n += int((tgt != -100).sum())
    return bits, n


def fit(fm: FloatModel, seqs: list[list[int]], *, steps: int, lr: float = 2e-3, batch_tokens: int = 2048,
        seed: int = 0, progress: Callable[[int, int, float], None] | None = None) -> list[float]:
    """Adam on the adapter parameters for ``steps`` batches; returns the loss (bits/token) per step."""
    params = fm.p.all()
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    batches: list[list[list[int]]] = []
    losses = []
    for step in range(steps):
        if not batches:
            batches = _batches(seqs, batch_tokens, rng)
        ids, tgt = (t.to(fm.head.device) for t in _pad(batches.pop()))
        logits = fm.forward(ids)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()) / math.log(2))
        if progress is not None:
            progress(step + 1, steps, losses[-1])
    return losses


#: Default bound on the training tokens: ~40,000 tokens fit one 2-core pass in
#: about the time the issue's float probe took (150 s for 40k tokens).
DEFAULT_MAX_TOKENS = 40_000
#: Tokens per optimizer step (padded): the logits of a 1,024-token batch over
#: SmolLM2's 49,152 tokens are 200 MB of float32, twice that with gradients.
BATCH_TOKENS = 1024
DEFAULT_LR = 2e-3


def _to_device(fm: FloatModel, device: str) -> None:
    if device == "cpu":
        return
    for d in (fm.lin, fm.unit, fm.gain, fm.base_bias):
        for k in d:
            d[k] = d[k].to(device)
    fm.head = fm.head.to(device)
    fm.embed = fm.head if fm.model.embed is fm.model.head else fm.embed.to(device)
    fm.inv_freq = fm.inv_freq.to(device)
    for d in (fm.p.lora_a, fm.p.lora_b, fm.p.scale, fm.p.gain, fm.p.bias):
        for k in d:
            d[k] = d[k].detach().to(device).requires_grad_()


def primer_of(samples: list[bytes], budget: int) -> bytes:
    """The last samples that fit in ``budget`` bytes, joined by newlines (most recent last)."""
    out: list[bytes] = []
    used = 0
    for raw in reversed(samples):
        if used + len(raw) + 1 > budget:
            break
        out.append(raw)
        used += len(raw) + 1
    return b"\n".join(reversed(out))


def train_adapter(samples: Iterable[bytes], *, model=None, rank: int = 0, max_tokens: int = DEFAULT_MAX_TOKENS,
                  steps: int | None = None, lr: float = DEFAULT_LR, primer_bytes: int = 0, seed: int = 0,
                  device: str = "cpu", progress: Callable[[int, int, float], None] | None = None):
    """Fit a dictionary to ``samples`` for ``model`` (a registry name or path; default SmolLM2).

    One pass over at most ``max_tokens`` tokens unless ``steps`` says otherwise;
    ``rank`` > 0 adds a LoRA on every projection; ``primer_bytes`` > 0 stores the
    last samples that fit as the dictionary's primer.  Returns an :class:`Adapter`.
    """
    from ..coding.tokens import ByteTokenizer
    from ..engine.model import registry as models
    from ..engine.model.quantize import load_int_model

    samples = [bytes(s) for s in samples]
    if not samples or not any(samples):
        from ..errors import UsageError
        raise UsageError("no training samples (every sample is empty)")
    loaded = models.load(model)
    tok = ByteTokenizer(loaded.tokenizer, loaded.arch.vocab_size)
    base = load_int_model(loaded, tok.fingerprint)
    torch.manual_seed(seed)
    seqs = sequences(samples, tok, max_tokens)
    ntok = sum(map(len, seqs))
    steps = steps if steps is not None else max(1, -(-ntok // BATCH_TOKENS))
    fm = FloatModel(base, Spec(rank=rank), seed=seed)
    _to_device(fm, device)
    t0 = time.perf_counter()
    losses = fit(fm, seqs, steps=steps, lr=lr, batch_tokens=BATCH_TOKENS, seed=seed, progress=progress)
    info = {"tokens": ntok, "steps": steps, "rank": rank, "seconds": round(time.perf_counter() - t0, 1),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}
    primer = primer_of(samples, primer_bytes) if primer_bytes > 0 else None
    return Adapter.build(base.fingerprint, fm.to_tensors(), primer or None, info)
