"""The model as the exact engine uses it: integer weights derived from the float file.

Every float32 weight is read as what it is -- an integer mantissa times a power
of two -- and quantized with integer arithmetic only, so the result is a pure
function of the model file's bits:

* linear weights: int8 per output row, ``q = round(127 w / max|w_row|)``, with
  the row's scale ``max|w_row| / 127`` kept as a 24-bit integer multiplier
  ``mult`` and one power-of-two ``shift`` per matrix (real weight =
  ``q * mult * 2^-shift``);
* RMSNorm gains: int16-range integers with one power-of-two scale per vector;
* biases (Qwen2's q/k/v): integers at the engine's 16 fractional bits.

The embedding table is the tied output head's int8 rows (or the model's own
when untied).  :func:`fingerprint` hashes exactly what decoding depends on: the
engine's spec version, the shape, every integer tensor, the constant tables and
the tokenizer's byte table.  The same weights under another file name are the
same model; a machine whose float-to-int conversion differed would show a
different fingerprint and be refused, never decode wrongly.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ...cache import cache_dir
from ..spec import fixedmath
from . import mapped
from .registry import ArchConfig, LoadedModel

#: Version of the integer engine's arithmetic (docs/ENGINE.md).  Any change to
#: a rounding, a width or a table changes the bits an archive depends on, so it
#: changes this string and with it every model fingerprint.
SPEC_VERSION = "lmcodec-int-1"

WEIGHT_MAX = 127        # int8 weights in [-127, 127]
MULT_BITS = 24          # row multipliers in [2^23, 2^24] for the largest row
GAIN_BITS = 15          # RMSNorm gains in (-2^15, 2^15)
BIAS_FRAC = 16          # biases at 16 fractional bits (the engine's q/k/v format)


def _mantissas(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact decomposition of float32 values: ``x = m * 2^e``, |m| in [2^23, 2^24) or 0.

    Reads the IEEE-754 bit fields; subnormals are normalized, zeros give m = 0.
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.int64)
    sign = np.where(bits >> 31, -1, 1)
    field = (bits >> 23) & 0xFF
    frac = bits & 0x7FFFFF
    if (field == 0xFF).any():
        raise ValueError("model weights contain inf or NaN")
    m = np.where(field > 0, frac | (1 << 23), frac)
    e = np.where(field > 0, field - 150, -149)
    # Normalize subnormals so every nonzero mantissa has 24 bits.
    for _ in range(23):
        small = (m > 0) & (m < (1 << 23))
        if not small.any():
            break
        m = np.where(small, m << 1, m)
        e = np.where(small, e - 1, e)
    return sign * m, np.where(m == 0, np.int64(-1 << 20), e)


def _round_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """round(num / den), halves up, for num >= 0 and den > 0: floor((2 num + den) / (2 den))."""
    return (2 * num + den) // (2 * den)


@dataclass
class IntLinear:
    """``y = x W^T`` with int8 ``weight`` [N, K]: real W[n] = weight[n] * mult[n] * 2^-shift."""

    weight: torch.Tensor   # int8 [N, K]
    mult: torch.Tensor     # int64 [N]
    shift: int
    bias: torch.Tensor | None = None  # int64 [N] at BIAS_FRAC fractional bits


def quantize_linear(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """float32 [N, K] -> (int8 weights, int64 multipliers, shift).  Integer-only."""
    m, e = _mantissas(w)
    am = np.abs(m)
    # Row maximum of |w|: compare (e, m) lexicographically (both exact).
    key = np.where(am > 0, (e + (1 << 20)) * (1 << 25) + am, 0)
    arg = key.argmax(axis=1)
    rows = np.arange(w.shape[0])
    ma, ea = am[rows, arg], e[rows, arg]
    zero_row = ma == 0
    ma_safe = np.where(zero_row, 1, ma)
    d = ea[:, None] - e                      # >= 0 for every nonzero entry
    far = (d >= 10) | (am == 0)              # 127 * 2^24 / (2^23 * 2^10) < 1/2: rounds to 0
    den = ma_safe[:, None] << np.where(far, 0, d)
    q = _round_div(WEIGHT_MAX * am, den)
    q = np.where(far | zero_row[:, None], 0, q) * np.sign(m)
    # Multipliers: round(ma * 2^(ea + shift) / 127), the largest row in [2^23, 2^24].
    top = int(np.argmax(np.where(zero_row, -1, (ea + (1 << 20)) * (1 << 25) + ma)))
    t = 7 if int(ma[top]) * 128 < 127 * (1 << 24) else 6
    shift = t - int(ea[top])
    s = ea + shift                           # <= t for every row
    num = np.where(s >= 0, ma << np.clip(s, 0, 7), ma)
    den = np.where(s >= 0, WEIGHT_MAX, WEIGHT_MAX << np.clip(-s, 0, 40))
    mult = np.where(zero_row | (s < -40), 0, _round_div(num, den))
    return q.astype(np.int8), mult.astype(np.int64), shift


def quantize_gain(g: np.ndarray) -> tuple[np.ndarray, int]:
    """float32 RMSNorm gain [K] -> (int64 G, shift) with real gain = G * 2^-shift, max|G| in [2^14, 2^15]."""
    m, e = _mantissas(g)
    am = np.abs(m)
    if not am.any():
        return np.zeros(len(g), dtype=np.int64), 0
    ea = int(e[np.argmax(np.where(am > 0, (e + (1 << 20)) * (1 << 25) + am, -1))])  # exponent of max|g|
    shift = (GAIN_BITS - 1) - 23 - ea
    return _to_fixed(m, e, shift), shift


def _to_fixed(m: np.ndarray, e: np.ndarray, frac: int) -> np.ndarray:
    """round(m * 2^(e + frac)) for exact mantissas (halves away from zero)."""
    s = e + frac
    am = np.abs(m)
    right = np.clip(-s, 0, 62)
    val = np.where(s >= 0, am << np.clip(s, 0, 30), np.where(right >= 40, 0, (am + ((1 << right) >> 1)) >> right))
    return np.sign(m) * val


def to_fixed(x: np.ndarray, frac: int) -> np.ndarray:
    """float32 values as integers at ``frac`` fractional bits (exact rounding, int64)."""
    m, e = _mantissas(np.asarray(x, dtype=np.float32))
    return _to_fixed(m, e, frac)


@dataclass
class IntLayer:
    attn_gain: torch.Tensor
    attn_gain_shift: int
    qkv: IntLinear
    o: IntLinear
    mlp_gain: torch.Tensor
    mlp_gain_shift: int
    gate_up: IntLinear
    down: IntLinear
    # Gemma 3 (ArchConfig.qk_norm, post_norms): per-head gains of q and k, and the gains of
    # the norms after attention and after the MLP; (None, 0) for a Llama.
    q_gain: torch.Tensor | None = None
    q_gain_shift: int = 0
    k_gain: torch.Tensor | None = None
    k_gain_shift: int = 0
    post_attn_gain: torch.Tensor | None = None
    post_attn_gain_shift: int = 0
    post_mlp_gain: torch.Tensor | None = None
    post_mlp_gain_shift: int = 0

    def to(self, device: str) -> "IntLayer":
        """A copy with every tensor on ``device``."""
        def mv(v):
            if isinstance(v, IntLinear):
                return IntLinear(v.weight.to(device), v.mult.to(device), v.shift,
                                 None if v.bias is None else v.bias.to(device))
            return v.to(device) if isinstance(v, torch.Tensor) else v
        return IntLayer(**{f.name: mv(getattr(self, f.name)) for f in fields(self)})


#: The optional IntLayer gains by quantized-array name and (Gemma 3) HF weight name.
GEMMA_GAINS = (("q_gain", "self_attn.q_norm.weight"), ("k_gain", "self_attn.k_norm.weight"),
               ("post_attn_gain", "post_attention_layernorm.weight"),
               ("post_mlp_gain", "post_feedforward_layernorm.weight"))


@dataclass
class IntModel:
    """Everything the exact engine computes with, all integers, plus the shape."""

    arch: ArchConfig
    layers: list[IntLayer]
    final_gain: torch.Tensor
    final_gain_shift: int
    head: IntLinear            # also the embedding table when tied
    embed: IntLinear           # the embedding rows (the head itself when tied)
    eps_q32: int               # rms_norm_eps at 32 fractional bits
    rope_theta: Fraction
    fingerprint: bytes

    def to(self, device: str) -> "IntModel":
        """A copy with every tensor on ``device`` (integers move exactly)."""
        def mv(lin: IntLinear) -> IntLinear:
            return IntLinear(lin.weight.to(device), lin.mult.to(device), lin.shift,
                             None if lin.bias is None else lin.bias.to(device))
        layers = [l.to(device) for l in self.layers]
        head = mv(self.head)
        embed = head if self.embed is self.head else mv(self.embed)
        return IntModel(self.arch, layers, self.final_gain.to(device), self.final_gain_shift, head, embed,
                        self.eps_q32, self.rope_theta, self.fingerprint)


def _tensors(model: LoadedModel) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Quantize every weight of ``model``: (integer arrays by name, shifts by name)."""
    a = model.arch
    w = {k: v.numpy() for k, v in model.weights.items()}
    arrays: dict[str, np.ndarray] = {}
    shifts: dict[str, int] = {}

    def linear(name: str, mats: list[np.ndarray], biases: list[np.ndarray] | None = None) -> None:
        q, mult, shift = quantize_linear(np.concatenate(mats))
        arrays[name + ".weight"], arrays[name + ".mult"], shifts[name] = q, mult, shift
        if biases is not None:
            arrays[name + ".bias"] = to_fixed(np.concatenate(biases), BIAS_FRAC)

    def gain(name: str, g: np.ndarray) -> None:
        if a.norm_plus_one:  # Gemma's RMSNorm scales by 1 + w: the float32 sum, as HF computes it
            g = np.float32(1.0) + g.astype(np.float32)
        arrays[name], shifts[name] = quantize_gain(g)

    for i in range(a.num_layers):
        p = f"model.layers.{i}."
        qkv_b = [w.get(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
        gain(f"{i}.attn_gain", w[p + "input_layernorm.weight"])
        linear(f"{i}.qkv", [w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"],
               qkv_b if all(b is not None for b in qkv_b) else None)
        linear(f"{i}.o", [w[p + "self_attn.o_proj.weight"]])
        if a.post_norms:  # Gemma: post_attention_layernorm follows attention; the MLP's pre-norm is its own
            for name, hf in GEMMA_GAINS:
                gain(f"{i}.{name}", w[p + hf])
            gain(f"{i}.mlp_gain", w[p + "pre_feedforward_layernorm.weight"])
        else:
            gain(f"{i}.mlp_gain", w[p + "post_attention_layernorm.weight"])
        linear(f"{i}.gate_up", [w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]])
        linear(f"{i}.down", [w[p + "mlp.down_proj.weight"]])
    gain("final_gain", w["model.norm.weight"])
    linear("head", [w["model.embed_tokens.weight"] if a.tie_word_embeddings else w["lm_head.weight"]])
    if not a.tie_word_embeddings:
        linear("embed", [w["model.embed_tokens.weight"]])
    return arrays, shifts


def arch_dict(arch: ArchConfig) -> dict:
    """The shape as the fingerprint hashes it: a field added after ``lmcodec-int-1``'s first models
    (Gemma 3's) only where it differs from its default, so a Llama's fingerprint stays what it was."""
    out = asdict(arch)
    for f in fields(arch):
        if f.name in _ADDED_FIELDS and out[f.name] == f.default:
            del out[f.name]
    if "layer_types" in out:
        out["layer_types"] = list(out["layer_types"])
    return out


_ADDED_FIELDS = ("hidden_act", "embed_scale", "norm_plus_one", "qk_norm", "post_norms", "query_pre_attn_scalar",
                 "sliding_window", "layer_types", "rope_local_theta")


def fingerprint(arch: ArchConfig, arrays: dict[str, np.ndarray], shifts: dict[str, int],
                eps_q32: int, tokenizer_fingerprint: bytes) -> bytes:
    """BLAKE2b-128 of what decoding depends on (see the module docstring)."""
    h = hashlib.blake2b(digest_size=16, person=b"lmcodec-engine")
    h.update(SPEC_VERSION.encode() + b"\0")
    h.update(json.dumps(arch_dict(arch), sort_keys=True).encode() + b"\0")
    h.update(json.dumps(shifts, sort_keys=True).encode() + b"\0")
    h.update(str(eps_q32).encode() + b"\0")
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{arr.dtype.str}:{arr.shape}\0".encode())
        h.update(memoryview(arr).cast("B"))      # the array's bytes, without a copy
    h.update(fixedmath.exp2_table().tobytes())
    h.update(fixedmath.sigmoid_table().tobytes())
    cos, sin = fixedmath.rope_tables(Fraction(arch.rope_theta), arch.head_dim, 1024)
    h.update(cos.tobytes() + sin.tobytes())
    if arch.hidden_act != "silu":
        h.update(fixedmath.gelu_gate_table().tobytes())
    if arch.rope_local_theta:
        cos, sin = fixedmath.rope_tables(Fraction(arch.rope_local_theta), arch.head_dim, 1024)
        h.update(cos.tobytes() + sin.tobytes())
    h.update(tokenizer_fingerprint)
    return h.digest()


def _assemble(arch: ArchConfig, arrays: dict[str, torch.Tensor], shifts: dict[str, int], eps_q32: int,
              fp: bytes) -> IntModel:
    def lin(name: str) -> IntLinear:
        return IntLinear(arrays[name + ".weight"], arrays[name + ".mult"], shifts[name], arrays.get(name + ".bias"))

    def extra(i: int) -> dict:
        out = {}
        for name, _ in GEMMA_GAINS if arch.post_norms else ():
            out[name], out[name + "_shift"] = arrays[f"{i}.{name}"], shifts[f"{i}.{name}"]
        return out

    layers = [IntLayer(arrays[f"{i}.attn_gain"], shifts[f"{i}.attn_gain"], lin(f"{i}.qkv"), lin(f"{i}.o"),
                       arrays[f"{i}.mlp_gain"], shifts[f"{i}.mlp_gain"], lin(f"{i}.gate_up"), lin(f"{i}.down"),
                       **extra(i))
              for i in range(arch.num_layers)]
    head = lin("head")
    embed = head if arch.tie_word_embeddings else lin("embed")
    return IntModel(arch, layers, arrays["final_gain"], shifts["final_gain"], head, embed, eps_q32,
                    Fraction(arch.rope_theta), fp)


_LOADED: dict[tuple[bytes, bytes], IntModel] = {}


def load_int_model(model: LoadedModel, tokenizer_fingerprint: bytes) -> IntModel:
    """The integer model of ``model``, from the cache or quantized now (seconds, once)."""
    key = (model.model_fingerprint, tokenizer_fingerprint)
    if key in _LOADED:
        return _LOADED[key]
    from safetensors.numpy import save_file

    target = cache_dir() / "engine" / f"{model.model_fingerprint.hex()}-{SPEC_VERSION}"
    meta_path, data_path = target / "meta.json", target / "int.safetensors"
    arrays = None
    if meta_path.is_file() and data_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            arrays = mapped.map_safetensors(data_path)
            shifts, eps_q32 = meta["shifts"], int(meta["eps_q32"])
        except (OSError, ValueError, KeyError):
            arrays = None
    if arrays is None:
        arrays, shifts = _tensors(model)
        eps_q32 = int(round(Fraction(model.arch.rms_norm_eps) * (1 << 32)))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
            try:
                save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / "int.safetensors"))
                (tmp / "meta.json").write_text(json.dumps({"shifts": shifts, "eps_q32": eps_q32}))
                try:
                    tmp.rename(target)
                except OSError:
                    if not target.exists():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            arrays = mapped.map_safetensors(data_path)      # the file's pages, as on every later load
        except (OSError, ValueError):
            pass  # an unwritable cache only costs time (and the weights stay in the process's memory)
    fp = fingerprint(model.arch, arrays, shifts, eps_q32, tokenizer_fingerprint)
    for v in arrays.values():
        mapped.release(v)       # the fingerprint read every page; the paths read back what they use
    tensors = {k: mapped.as_tensor(np.ascontiguousarray(v)) for k, v in arrays.items()}
    _LOADED[key] = _assemble(model.arch, tensors, shifts, eps_q32, fp)
    return _LOADED[key]

