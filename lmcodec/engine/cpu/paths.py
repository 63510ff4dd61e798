"""The exact paths the engine takes on this CPU, and its flags: what ``lmcodec selftest`` and the
benchmarks print beside their figures (every path gives the same integers; they differ in speed)."""

from __future__ import annotations

import os
import platform as _os_platform

from . import gemm, int_dots, ops, platform


def describe() -> dict:
    """The CPU's flags and the paths taken: the layer products, the int8 GEMMs, the fused step."""
    return {"machine": _os_platform.machine(), "flags": platform.cpu_flags(), "generic": platform.GENERIC,
            "numba_target": os.environ.get("NUMBA_CPU_NAME", "host"),
            "fused_products": "avx512-vnni" if int_dots.available() else
            "avx2 blocks of 4 rows, portable loop for the rest" if int_dots.avx2_available() else
            "portable (vpmaddwd where LLVM finds it)",
            "layer_products": gemm.products_kind(ops.split), "gemm": gemm.kind()}
