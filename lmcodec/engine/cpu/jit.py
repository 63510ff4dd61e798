"""numba, configured before any kernel compiles: every module with kernels imports it from here.

Its compiled kernels are cached per version of lmcodec's sources, and its threading layer
is started at import (both below, and why).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path


def _sources_digest() -> str:
    """A digest of lmcodec's own source files, naming the directory of its compiled kernels.

    numba's cache checks only the file that defines a kernel: a kernel that inlines
    or calls a helper from another file (the kernels inline cpu.rows' helpers)
    would keep its compiled code after that helper changed.  A directory per
    source digest means a kernel is only ever loaded by the code that compiled it.
    """
    root = Path(__file__).resolve().parents[2]  # lmcodec/
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


from . import platform  # noqa: E402  (LMCODEC_CPU=generic sets numba's target before numba loads)

if "NUMBA_CACHE_DIR" not in os.environ:  # site-packages may be read-only
    from ...cache import cache_dir

    # LMCODEC_VNNI=0 / LMCODEC_AVX2=0 compile the kernels without VNNI / AVX2 blocks (int_dots),
    # LMCODEC_CPU=generic for a baseline AVX2 target: none shares the cache of the kernels
    # compiled for this CPU.
    _VARIANT = (("-generic" if platform.GENERIC else
                 "-novnni" if os.environ.get("LMCODEC_VNNI", "1") == "0" else "")
                + ("-noavx2" if os.environ.get("LMCODEC_AVX2", "1") == "0" else ""))
    os.environ["NUMBA_CACHE_DIR"] = str(cache_dir() / "numba" / (_sources_digest() + _VARIANT))

import numba  # noqa: E402
import torch  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

# Start numba's threading layer now, not at the first kernel: its OpenMP layer
# shares torch's libgomp, and starting it resets the calling thread's OpenMP
# thread count, which is what torch.get_num_threads() reports.  Started inside
# ``engine.torch_threads(1)`` it silently put the first block of every process
# back on all cores (2 threads where 1 was asked; 4 on 2 cores with 2 workers).
numba.get_num_threads()

#: Every kernel's compile options: cached on disk (above), without the GIL, unchecked indices.
JIT = dict(cache=True, nogil=True, boundscheck=False)

_THREADS = threading.local()


def sync_threads() -> None:
    """numba's thread count follows torch's (speed only); set only when it changes (the call is slow)."""
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if getattr(_THREADS, "n", None) != n:
        numba.set_num_threads(n)
        _THREADS.n = n


__all__ = ["JIT", "intrinsic", "njit", "numba", "prange", "sync_threads", "types"]
