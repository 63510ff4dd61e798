"""The integer model's weights as read-only pages of its cache file, and giving those pages back.

Read into the process's own memory, a model's int8 weights (122 MB for SmolLM2) stay
resident whether or not a path still reads them.  Mapped from the engine's cache file
(:func:`map_safetensors`) they are the file's pages: :func:`release` drops a range of them
from the process at once where no path reads it for a while -- all the weights after the
fingerprint has read them, each matrix the VNNI step has packed into its own layout
(lmcodec.engine.cpu.fused), and each layer's after the layer in the encoder's parallel pass
(lmcodec.engine.engine) -- and the kernel reads them again from the page cache (or the
disk) if a path touches them later.  So releasing is never wrong, only slower where the
pages are read again.  The mapping is read-only: a stray write into a weight faults
instead of changing the bits an archive depends on.

The small arrays (scales, gains, biases) are copied: they may be unaligned in the file,
and they are a few hundred KB.
"""

from __future__ import annotations

import json
import mmap
import warnings
from pathlib import Path

import numpy as np
import torch

#: safetensors' dtype names of the integer model's arrays.
DTYPES = {"I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "U8": np.uint8}

#: Every mapping made here: (first address, length, the mmap object that keeps it open).
_MAPS: list[tuple[int, int, mmap.mmap]] = []


def map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's arrays: its int8 ones as read-only views of one mapping of the
    file, the others copied.  The format is an 8-byte little-endian header length, a JSON
    header of names, dtypes, shapes and byte offsets, then the bytes
    (https://github.com/huggingface/safetensors).  Raises ValueError on a truncated file."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if len(mm) < 8:
        raise ValueError(f"{path}: truncated header")
    n = int.from_bytes(mm[:8], "little")
    header = json.loads(mm[8:8 + n])
    base = 8 + n
    whole = np.frombuffer(mm, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        dtype = np.dtype(DTYPES[info["dtype"]])
        count = int(np.prod(info["shape"], dtype=np.int64))
        if stop - start != count * dtype.itemsize or base + stop > len(mm):
            raise ValueError(f"{path}: {name} is truncated")
        arr = whole[base + start:base + stop].view(dtype).reshape(info["shape"])
        out[name] = arr if dtype == np.int8 else arr.copy()
    _MAPS.append((whole.ctypes.data, whole.nbytes, mm))
    return out


def as_tensor(arr: np.ndarray) -> torch.Tensor:
    """``arr``'s memory as a tensor, read-only mappings included (torch warns that it cannot
    mark a tensor read-only; nothing writes into a model's weights)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


def release(arr: np.ndarray) -> int:
    """Drop the whole pages of ``arr`` from the process where it lies in a mapping made here
    (``madvise(MADV_DONTNEED)``); the bytes released (0: not mapped here, or no madvise)."""
    if arr.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    start = arr.ctypes.data
    for first, length, mm in _MAPS:
        if first <= start and start + arr.nbytes <= first + length:
            lo = -(-(start - first) // mmap.PAGESIZE) * mmap.PAGESIZE
            hi = (start + arr.nbytes - first) // mmap.PAGESIZE * mmap.PAGESIZE
            if hi <= lo:
                return 0
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            return hi - lo
    return 0
