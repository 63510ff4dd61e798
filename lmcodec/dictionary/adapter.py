"""Dictionaries: an integer adapter of the engine's model, in one checked file.

The shape follows zstandard's ``ZstdCompressionDict``: an :class:`Adapter` is
made from the file's bytes (``Adapter(data)``, :meth:`Adapter.load`), has an id
(:meth:`fingerprint`, :meth:`dict_id`), :meth:`as_bytes` and ``len()``.  What
it holds is integers only -- the deltas docs/ENGINE.md ("Dictionaries") merges
into the int8 model at load -- plus an optional *primer* (text the codec puts
in the prompt, what ``--prompt-file`` gives by hand).  :func:`lmcodec.train`
makes one (float training, :mod:`lmcodec.dictionary.training`); decoding never runs float code.

File layout (all integers little-endian)::

    magic     4   b"LMCD"
    version   1   1
    meta_len  4   length of the meta JSON (at most MAX_META)
    meta          JSON: base model fingerprint (hex), what is adapted, each
                  tensor's name, dtype and shape, the LoRA shifts, primer length
    data_len  4   length of the zstd frame of the tensors
    data          zstd frame: every tensor's raw bytes, in the meta's order
    primer        the primer's bytes (meta "primer_bytes")
    digest   16   BLAKE2b-128 (person b"lmcodec-dict") of everything above

The digest is the dictionary's **id**: the same bytes give the same id on every
machine.  The adapted model's fingerprint is a BLAKE2b of (base fingerprint,
id), so an archive made with a dictionary names it through the model check of
its header, and decoding with another dictionary or none is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..engine.model.quantize import IntLinear, IntModel
from ..errors import DictionaryError

MAGIC = b"LMCD"
VERSION = 1
ID_BYTES = 16
MAX_META = 1 << 20          # 1 MiB of JSON: ~100 bytes per tensor, thousands of tensors
MAX_DATA = 1 << 30          # 1 GiB of integer tensors: a rank-64 LoRA on every SmolLM2 matrix is ~60 MB
LINEARS = ("qkv", "o", "gate_up", "down")
GAINS = ("attn_gain", "mlp_gain")

#: Row scales are ``2^16 + M`` at 16 fractional bits, M in [SCALE_MIN, SCALE_MAX]:
#: a row's real weight is multiplied by 0.5 .. 2; the result is clamped to
#: MULT_MAX so ``y * mult < 2^58`` (docs/ENGINE.md) holds as for the base model.
SCALE_FRAC = 16
SCALE_MIN, SCALE_MAX = -(1 << 15), 1 << 16
MULT_MAX = 1 << 24
GAIN_MAX = (1 << 15) - 1    # gains stay below 2^15 (the RMSNorm bound t < 2^47)
LORA_SHIFT_MAX = 40
_DTYPES = {"|i1": np.int8, "<i2": np.int16, "<i4": np.int32}


@dataclass
class AdapterTensors:
    """The integers of an adapter by target name (``"3.qkv"``, ``"3.attn_gain"``, ``"final_gain"``).

    lora[name] = (A int8 [r, K], B int16 [N, r], s);  scale[name] = M int32 [N];
    bias[name] = int32 [N] at 16 fractional bits (q/k/v only);  gain[name] = int32 [K].
    """

    lora: dict[str, tuple[np.ndarray, np.ndarray, int]] = field(default_factory=dict)
    scale: dict[str, np.ndarray] = field(default_factory=dict)
    bias: dict[str, np.ndarray] = field(default_factory=dict)
    gain: dict[str, np.ndarray] = field(default_factory=dict)

    def arrays(self) -> list[tuple[str, np.ndarray]]:
        """Every tensor under its file name, in a fixed order."""
        out = []
        for name in sorted(self.lora):
            a, b, _ = self.lora[name]
            out += [(name + ".lora_a", a), (name + ".lora_b", b)]
        out += [(n + ".scale", self.scale[n]) for n in sorted(self.scale)]
        out += [(n + ".bias", self.bias[n]) for n in sorted(self.bias)]
        out += [(n + ".gain", self.gain[n]) for n in sorted(self.gain)]
        return out


def quantize_lora(a: np.ndarray, b_units: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Float A [r, K] and B [N, r] (in int8 steps of each row) -> (A int8, B int16, s).

    A's rows at int8 (a_r = max|A_r| / 127); B absorbs a_r and takes the largest
    s <= LORA_SHIFT_MAX that keeps |B 2^s| <= 32767, so rshift(B A, s) ~ B A.
    """
    amax = np.abs(a).max(axis=1)
    ar = np.where(amax > 0, amax / 127, 1.0)
    a_int = np.clip(np.round(a / ar[:, None]), -127, 127).astype(np.int8)
    bp = b_units * ar[None, :]
    bmax = float(np.abs(bp).max()) if bp.size else 0.0
    s = LORA_SHIFT_MAX if bmax == 0 else int(min(LORA_SHIFT_MAX, max(0, np.floor(np.log2(32767 / bmax)))))
    b_int = np.clip(np.round(bp * 2.0 ** s), -32767, 32767).astype(np.int16)
    return a_int, b_int, s


def quantize_scale(s: np.ndarray) -> np.ndarray:
    """A float row scale 1 + s -> M = round(s 2^16), within [SCALE_MIN, SCALE_MAX]."""
    return np.clip(np.round(s * (1 << SCALE_FRAC)), SCALE_MIN, SCALE_MAX).astype(np.int32)


def adapted_fingerprint(base: bytes, adapter_id: bytes) -> bytes:
    """The adapted model's fingerprint: BLAKE2b-128 of the base's and the dictionary's ids."""
    h = hashlib.blake2b(digest_size=16, person=b"lmcodec-adapted")
    h.update(base + adapter_id)
    return h.digest()


class Adapter:
    """A dictionary: integer deltas for one base model, a primer, and an id (see the module doc)."""

    def __init__(self, data: bytes):
        data = bytes(data)
        self._data = data
        meta, tensors, primer = _parse(data)
        self.meta = meta
        self.base_fingerprint: bytes = bytes.fromhex(meta["base"])
        self.tensors: AdapterTensors = tensors
        self.primer: bytes | None = primer or None
        self._id = data[-ID_BYTES:]

    # -- zstandard's ZstdCompressionDict surface -------------------------------------------
    def fingerprint(self) -> bytes:
        """The 16-byte id (the file's BLAKE2b digest)."""
        return self._id

    @property
    def id(self) -> str:
        """The id as hex, as messages and ``lmcodec info`` print it."""
        return self._id.hex()

    def dict_id(self) -> int:
        """The id's first 4 bytes as an integer (zstd's ``dict_id()``; what an archive header may record)."""
        return int.from_bytes(self._id[:4], "little")

    def as_bytes(self) -> bytes:
        return self._data

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Adapter(id={self.id[:16]}, {len(self)} bytes, adapts={self.meta['adapts']})"

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Adapter":
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise DictionaryError(f"cannot read dictionary {os.fspath(path)}: {exc.strerror or exc}") from None
        try:
            return cls(data)
        except DictionaryError as exc:
            raise DictionaryError(f"{os.fspath(path)}: {exc}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file, then rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_bytes(self._data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DictionaryError(f"cannot write dictionary {path}: {exc.strerror or exc}") from None

    @classmethod
    def build(cls, base_fingerprint: bytes, tensors: AdapterTensors, primer: bytes | None = None,
              info: dict | None = None) -> "Adapter":
        """Serialize (see the module doc) and parse back, so a built adapter is a loaded one."""
        import zstandard

        arrays = tensors.arrays()
        adapts = sorted({kind for kind, d in (("lora", tensors.lora), ("scale", tensors.scale),
                                              ("bias", tensors.bias), ("gain", tensors.gain)) if d})
        meta = {"base": base_fingerprint.hex(), "adapts": adapts,
                "tensors": [[n, np.dtype(a.dtype).str, list(a.shape)] for n, a in arrays],
                "lora_shifts": {n: int(s) for n, (_, _, s) in sorted(tensors.lora.items())},
                "primer_bytes": len(primer or b""), "info": info or {}}
        mjson = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        raw = b"".join(np.ascontiguousarray(a).astype(np.dtype(a.dtype).newbyteorder("<")).tobytes()
                       for _, a in arrays)
        frame = zstandard.ZstdCompressor(level=19).compress(raw)
        body = (MAGIC + bytes([VERSION]) + struct.pack("<I", len(mjson)) + mjson
                + struct.pack("<I", len(frame)) + frame + (primer or b""))
        return cls(body + _digest(body))

    # -- application ---------------------------------------------------------------------------
    def check_base(self, model: IntModel) -> None:
        if model.fingerprint != self.base_fingerprint:
            raise DictionaryError(
                f"dictionary {self.id[:16]} belongs to model {self.base_fingerprint.hex()[:16]}, "
                f"not to {model.fingerprint.hex()[:16]}")

    def apply(self, model: IntModel) -> IntModel:
        """The adapted integer model (docs/ENGINE.md, "Dictionaries"); the base is not modified."""
        self.check_base(model)
        return merge(model, self.tensors, adapted_fingerprint(model.fingerprint, self._id))


def _digest(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=ID_BYTES, person=b"lmcodec-dict").digest()


def _parse(data: bytes) -> tuple[dict, AdapterTensors, bytes]:
    """Check and split a dictionary file; every refusal is a one-line DictionaryError."""
    import zstandard

    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise DictionaryError("not an lmcodec dictionary (bad magic)")
    fixed = len(MAGIC) + 1 + 4
    if len(data) < fixed + 4 + ID_BYTES:
        raise DictionaryError("dictionary is truncated")
    if data[len(MAGIC)] != VERSION:
        raise DictionaryError(f"unsupported dictionary version {data[len(MAGIC)]} (this lmcodec reads {VERSION})")
    if _digest(data[:-ID_BYTES]) != data[-ID_BYTES:]:
        raise DictionaryError("dictionary is corrupted or truncated (digest mismatch)")
    (mlen,) = struct.unpack_from("<I", data, fixed - 4)
    if mlen > MAX_META or fixed + mlen + 4 > len(data) - ID_BYTES:
        raise DictionaryError("dictionary meta length out of range")
    try:
        meta = json.loads(data[fixed:fixed + mlen])
        base = bytes.fromhex(meta["base"])
        specs = [(str(n), str(d), tuple(int(x) for x in s)) for n, d, s in meta["tensors"]]
        shifts = {str(k): int(v) for k, v in meta["lora_shifts"].items()}
        plen = int(meta["primer_bytes"])
        if len(base) != 16 or not isinstance(meta["adapts"], list):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise DictionaryError("dictionary meta is malformed") from None
    pos = fixed + mlen
    (dlen,) = struct.unpack_from("<I", data, pos)
    pos += 4
    if plen < 0 or pos + dlen + plen != len(data) - ID_BYTES:
        raise DictionaryError("dictionary lengths do not add up")
    sizes = []
    for name, dt, shape in specs:
        if dt not in _DTYPES or any(x < 0 for x in shape) or len(shape) > 2:
            raise DictionaryError(f"dictionary tensor {name!r} has a bad dtype or shape")
        sizes.append(int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dt]).itemsize)
    if sum(sizes) > MAX_DATA:
        raise DictionaryError("dictionary tensors exceed the size limit")
    try:
        raw = zstandard.ZstdDecompressor().decompress(data[pos:pos + dlen], max_output_size=max(sum(sizes), 1))
    except zstandard.ZstdError:
        raise DictionaryError("dictionary tensor data is corrupted") from None
    if len(raw) != sum(sizes):
        raise DictionaryError("dictionary tensor data has the wrong length")
    arrays, off = {}, 0
    for (name, dt, shape), size in zip(specs, sizes):
        arrays[name] = np.frombuffer(raw, dtype=np.dtype(_DTYPES[dt]), count=size // np.dtype(_DTYPES[dt]).itemsize,
                                     offset=off).astype(_DTYPES[dt]).reshape(shape)
        off += size
    return meta, _tensors(arrays, shifts), data[pos + dlen:pos + dlen + plen]


def _tensors(arrays: dict[str, np.ndarray], shifts: dict[str, int]) -> AdapterTensors:
    """Group file tensors by kind and check every value range the merge relies on."""
    t = AdapterTensors()
    for name, arr in arrays.items():
        target, _, kind = name.rpartition(".")
        if kind == "lora_a":
            b = arrays.get(target + ".lora_b")
            s = shifts.get(target)
            if (b is None or s is None or arr.dtype != np.int8 or b.dtype != np.int16 or arr.ndim != 2
                    or b.ndim != 2 or b.shape[1] != arr.shape[0] or not 0 <= s <= LORA_SHIFT_MAX):
                raise DictionaryError(f"dictionary LoRA {target!r} is malformed")
            t.lora[target] = (arr, b, s)
        elif kind == "lora_b":
            if target + ".lora_a" not in arrays:
                raise DictionaryError(f"dictionary LoRA {target!r} is malformed")
        elif kind == "scale":
            if arr.ndim != 1 or arr.dtype != np.int32 or (arr.size and (arr.min() < SCALE_MIN or arr.max() > SCALE_MAX)):
                raise DictionaryError(f"dictionary row scale {target!r} is out of range")
            t.scale[target] = arr
        elif kind == "bias":
            if arr.ndim != 1 or arr.dtype != np.int32 or not target.endswith(".qkv"):
                raise DictionaryError(f"dictionary bias {target!r} is malformed")
            t.bias[target] = arr
        elif kind == "gain":
            if arr.ndim != 1 or arr.dtype != np.int32:
                raise DictionaryError(f"dictionary gain {target!r} is malformed")
            t.gain[target] = arr
        else:
            raise DictionaryError(f"dictionary tensor {name!r} is unknown")
    return t


# ----------------------------------------------------------------------- the merge (engine side)

def _rshift(x: torch.Tensor, s: int) -> torch.Tensor:
    """Round half up: (x + 2^(s-1)) >> s (arithmetic shift: floor for negatives)."""
    return x if s == 0 else (x + (1 << (s - 1))) >> s


def _merge_linear(lin: IntLinear, key: str, t: AdapterTensors) -> IntLinear:
    weight, mult, bias = lin.weight, lin.mult, lin.bias
    n, k = weight.shape
    if key in t.lora:
        a, b, s = t.lora[key]
        if a.shape[1] != k or b.shape[0] != n:
            raise DictionaryError(f"dictionary LoRA {key!r} does not fit the model's {n}x{k} matrix")
        delta = _rshift(torch.from_numpy(b.astype(np.int64)) @ torch.from_numpy(a.astype(np.int64)), s)
        weight = (weight.to(torch.int64) + delta).clamp_(-127, 127).to(torch.int8)
    if key in t.scale:
        m = t.scale[key]
        if m.shape != (n,):
            raise DictionaryError(f"dictionary row scale {key!r} does not fit the model")
        mult = _rshift(mult.to(torch.int64) * (torch.from_numpy(m.astype(np.int64)) + (1 << SCALE_FRAC)),
                       SCALE_FRAC).clamp_(0, MULT_MAX)
    if key in t.bias:
        db = t.bias[key]
        if db.shape != (n,):
            raise DictionaryError(f"dictionary bias {key!r} does not fit the model")
        bias = (torch.zeros(n, dtype=torch.int64) if bias is None else bias.to(torch.int64)) \
            + torch.from_numpy(db.astype(np.int64))
    return IntLinear(weight.contiguous(), mult.contiguous(), lin.shift, bias)


def _merge_gain(g: torch.Tensor, key: str, t: AdapterTensors) -> torch.Tensor:
    if key not in t.gain:
        return g
    d = t.gain[key]
    if d.shape != tuple(g.shape):
        raise DictionaryError(f"dictionary gain {key!r} does not fit the model")
    return (g.to(torch.int64) + torch.from_numpy(d.astype(np.int64))).clamp_(-GAIN_MAX, GAIN_MAX)


def merge(model: IntModel, t: AdapterTensors, fingerprint: bytes) -> IntModel:
    """Apply integer deltas to an IntModel (docs/ENGINE.md, "Dictionaries").  Integer-only."""
    known = {f"{i}.{n}" for i in range(len(model.layers)) for n in LINEARS}
    gains = {f"{i}.{n}" for i in range(len(model.layers)) for n in GAINS} | {"final_gain"}
    for key in [*t.lora, *t.scale, *t.bias]:
        if key not in known:
            raise DictionaryError(f"dictionary adapts {key!r}, which this model does not have")
    for key in t.gain:
        if key not in gains:
            raise DictionaryError(f"dictionary adapts {key!r}, which this model does not have")
    layers = []
    for i, layer in enumerate(model.layers):
        lins = {n: _merge_linear(getattr(layer, n), f"{i}.{n}", t) for n in LINEARS}
        # replace keeps every other field (Gemma 3's q/k and post-norm gains) as it was.
        layers.append(replace(layer, attn_gain=_merge_gain(layer.attn_gain, f"{i}.attn_gain", t),
                              mlp_gain=_merge_gain(layer.mlp_gain, f"{i}.mlp_gain", t), **lins))
    return replace(model, layers=layers, final_gain=_merge_gain(model.final_gain, "final_gain", t),
                   fingerprint=fingerprint)
