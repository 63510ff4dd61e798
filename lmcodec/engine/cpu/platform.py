"""What this CPU offers the engine, and the switch that makes any CPU take the generic paths.

Every path computes the same integers; which one runs decides only the speed.  The
capabilities are read from the machine (LLVM's view of the host CPU, the kernel's
flags), never from a brand or model name.

``LMCODEC_CPU=generic`` (docs/ENGINE.md, "Exact products on any CPU") makes a CPU with
AVX-512 VNNI take the paths of one without it: oneDNN off for ``torch._int_mm`` (torch's
generic loop), numba's kernels compiled for a baseline AVX2 target (``haswell``; an
explicit ``NUMBA_CPU_NAME`` wins), and no VNNI intrinsics.  CI runs the engine's exactness
tests under it (``tests/test_generic_cpu.py``).  Import this before numba: it sets numba's
target from the environment.
"""

from __future__ import annotations

import os

#: Set in the environment before lmcodec starts: every CPU path is the generic one.
GENERIC = os.environ.get("LMCODEC_CPU", "").strip().lower() == "generic"
#: numba's target CPU under the switch: AVX2 and FMA, no AVX-512 (Intel Haswell, AMD Zen 1-3 class).
GENERIC_TARGET = "haswell"

if GENERIC:
    os.environ.setdefault("NUMBA_CPU_NAME", GENERIC_TARGET)

#: The instruction-set features that decide the engine's speed, as the kernel lists them.
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp", "i8mm")


def cpu_flags() -> list[str]:
    """Which of :data:`FLAGS` this CPU reports (Linux's /proc/cpuinfo; empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in FLAGS if f in have]
    except OSError:
        pass
    return []


def configure_torch() -> None:
    """Under :data:`GENERIC`, torch's oneDNN off (``torch._int_mm`` takes its generic loop)."""
    if GENERIC:
        import torch

        torch.backends.mkldnn.enabled = False


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system: glibc's ``malloc_trim(0)``; elsewhere nothing.

    Why: a parallel pass and the encoder's output head free arrays of many sizes (tens of
    MB each).  glibc raises its mmap threshold to the largest size freed, so later arrays of
    up to 32 MB come from the heap, whose freed pages it keeps: compressing 12 KB held ~300 MB
    it no longer used, above what the pass needs at any moment.  A trim costs ~70 us and the
    next pass's first touch of those pages, so it belongs after a chunk of work, not a step.
    """
    global _TRIM
    if _TRIM is None:
        _TRIM = _malloc_trim()
    if _TRIM is not False:
        _TRIM(0)


def _malloc_trim():
    """glibc's ``malloc_trim``, or False where the C library has none (musl, macOS, Windows)."""
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim     # the process's own symbols: the C library's
    except (OSError, AttributeError, TypeError):
        return False


_TRIM = None
