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
