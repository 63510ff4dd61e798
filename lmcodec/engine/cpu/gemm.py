"""Exact int8 products at BLAS speed on any CPU: ``torch._int_mm``, or float32 GEMMs.

Every product the engine's general path runs on a CPU (the layers' and the output head's,
attention's score and value GEMMs in the parallel pass) is an int8 x int8 GEMM with int32
sums.  Two kernels give the same integers (docs/ENGINE.md, "Exact products on any CPU"):

* ``int8``: ``torch._int_mm``.  oneDNN's VNNI/AMX kernels where the CPU has them; elsewhere
  torch runs a generic loop, ~1 GOPS (0.07x the float model on an AVX2 Zen 3).
* ``float32``: the same operands as float32, one GEMM per chunk of at most
  :data:`FLOAT32_EXACT_K` of the inner dimension.  A product is at most 128 x 127 = 16,256
  in magnitude, so every partial sum of a chunk, in any order the BLAS adds them, is an
  integer below 2^24 and exact in float32; the chunks' results are added in int32.  Any
  BLAS (MKL, OpenBLAS, Accelerate, ARM's) is fast at float32.

Which one runs is measured once per process at SmolLM2's shapes (:func:`kind`), never read
from a CPU's name; ``LMCODEC_GEMM=int8|float32`` forces one.  No float copy of the weights
is kept: each call converts the int8 operands it reads in blocks of at most
:data:`PART_ELEMENTS` entries, so the float path costs no memory beyond a few blocks.

The layers' products have int16 operand rows, which :func:`products` either splits into
int8 halves for :func:`mm` or takes whole on int_dots' portable loop (one pass, ``vpmaddwd``
on AVX2), whichever :func:`products_kind` measured faster (``LMCODEC_PRODUCTS``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

from . import int_dots
from .jit import sync_threads
from .platform import configure_torch

configure_torch()

#: int8 x int8 products are at most 128 * 127 = 16,256 in magnitude, so float32
#: sums of up to 1,032 of them stay below 2^24: every float32 GEMM returns them exactly.
FLOAT32_EXACT_K = 1024
#: Entries of every float32 buffer a product makes (4 MiB): operand blocks stay in cache, the
#: output head's 49,152 weight rows never exist as floats all together (113 MB), and the
#: buffers are the same few sizes however long the pass, so the heap reuses them instead of
#: growing with each new shape.
PART_ELEMENTS = 1 << 20

#: The measured (or forced) choices, by the environment variable that forces each.
_CHOSEN: dict[str, str] = {}


def products(h16: torch.Tensor, w: torch.Tensor, split: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Operand rows ``h16`` [M, K] int16 times int8 weights ``w`` [N, K] -> [hi rows; lo rows] int32
    (``256 y[i] + y[M + i]`` the exact sum): the int16 rows on int_dots' portable loop in one pass,
    or ``split`` into int8 halves and :func:`mm`, whichever :func:`products_kind` measured faster."""
    if products_kind(split) == "int16":
        return _int16_products(h16, w)
    return mm(split(h16), w.t())


def _int16_products(h16: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    sync_threads()
    y = torch.empty((2 * h16.shape[0], w.shape[0]), dtype=torch.int32)
    int_dots.dots_halves(h16.contiguous().numpy(), w.numpy(), y.numpy())
    return y


def products_kind(split: Callable[[torch.Tensor], torch.Tensor]) -> str:
    """``int16`` (int_dots' portable loop) or ``halves`` (split, then :func:`mm`): the faster here,
    measured once at a layer product's shape; ``LMCODEC_PRODUCTS`` forces one."""
    def candidates():
        h = torch.full((64, 576), 1000, dtype=torch.int16)
        w = torch.ones((1536, 576), dtype=torch.int8)
        return {"int16": lambda: _int16_products(h, w), "halves": lambda: mm(split(h), w.t())}

    return _chosen("LMCODEC_PRODUCTS", candidates)


def _chosen(env: str, candidates: Callable[[], dict[str, Callable[[], object]]]) -> str:
    """``$env`` where it names one of the candidates, else the fastest of them; decided once."""
    if env not in _CHOSEN:
        fns = candidates()
        forced = os.environ.get(env, "")
        _CHOSEN[env] = forced if forced in fns else _faster(fns)
    return _CHOSEN[env]


def _faster(fns: dict[str, Callable[[], object]]) -> str:
    """The name of the fastest call: one warm-up (compiles), then the best of five, so that a
    moment of other work on the machine does not decide it."""
    timing = {}
    for name, fn in fns.items():
        fn()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        timing[name] = best
    return min(timing, key=timing.get)


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a`` [M, K] int8 times ``b`` [K, N] int8 (any strides) -> int32 [M, N], exactly;
    into ``out`` (a contiguous [M, N] int32 tensor) when given, so that a caller can reuse one buffer."""
    if kind() == "float32":
        return _float32_mm(a, b, out)
    return torch._int_mm(a, b) if out is None else torch._int_mm(a, b, out=out)


def _float32_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`mm` by float32 GEMMs over K-chunks of at most FLOAT32_EXACT_K, in blocks of rows
    and columns whose float copies hold at most PART_ELEMENTS each; the chunks' sums are added
    in int32."""
    m, k = a.shape
    n = b.shape[1]
    out = torch.empty((m, n), dtype=torch.int32) if out is None else out
    kc = max(1, min(k, FLOAT32_EXACT_K))
    mb = max(1, min(m, PART_ELEMENTS // kc))
    nb = max(1, min(n, PART_ELEMENTS // mb, PART_ELEMENTS // kc))
    part = torch.empty(mb * nb, dtype=torch.float32)
    for m0 in range(0, m, mb):
        m1 = min(m, m0 + mb)
        for c in range(0, k, kc):
            af = a[m0:m1, c:c + kc].to(torch.float32)
            for n0 in range(0, n, nb):
                n1 = min(n, n0 + nb)
                p = part[:(m1 - m0) * (n1 - n0)].view(m1 - m0, n1 - n0)
                torch.mm(af, b[c:c + kc, n0:n1].to(torch.float32), out=p)
                if c == 0:
                    out[m0:m1, n0:n1].copy_(p)
                else:
                    out[m0:m1, n0:n1] += p.to(torch.int32)
    return out


def kind() -> str:
    """``int8`` (``torch._int_mm``) or ``float32`` (exact float GEMMs): the faster here, measured
    once at a layer product's shape ([64 x 576] x [576 x 1536]); ``LMCODEC_GEMM`` forces one."""
    def candidates():
        a = torch.ones((64, 576), dtype=torch.int8)
        b = torch.ones((1536, 576), dtype=torch.int8).t()
        return {"int8": lambda: torch._int_mm(a, b), "float32": lambda: _float32_mm(a, b)}

    return _chosen("LMCODEC_GEMM", candidates)
