"""Classical compressors through their Python bindings, timed both ways.

gzip -9: the stdlib ``gzip`` module (zlib, level 9).  zstd -19 and --ultra -22:
python-zstandard.  xz -9e: the stdlib ``lzma`` module, preset 9 | PRESET_EXTREME.
bzip2 -9: the stdlib ``bz2`` module.  brotli -q 11: the ``brotli`` binding.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import time
from typing import Callable

import zstandard


def _zstd(level: int) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    def comp(d: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=level).compress(d)

    def decomp(d: bytes) -> bytes:
        return zstandard.ZstdDecompressor().decompress(d, max_output_size=1 << 31)

    return comp, decomp


def compressors() -> dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]]:
    import brotli

    return {
        "gzip -9": (lambda d: gzip.compress(d, 9, mtime=0), gzip.decompress),
        "zstd -19": _zstd(19),
        "zstd --ultra -22": _zstd(22),
        "xz -9e": (lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
        "bzip2 -9": (lambda d: bz2.compress(d, 9), bz2.decompress),
        "brotli -q 11": (lambda d: brotli.compress(d, quality=11), brotli.decompress),
    }


def measure(data: bytes) -> dict[str, dict]:
    """Size and both speeds of every classical compressor; round trips are checked."""
    out = {}
    for name, (comp, decomp) in compressors().items():
        t0 = time.perf_counter()
        packed = comp(data)
        t1 = time.perf_counter()
        back = decomp(packed)
        t2 = time.perf_counter()
        if back != data:
            raise AssertionError(f"{name} did not round-trip")
        out[name] = {"bytes": len(packed), "compress_s": t1 - t0, "decompress_s": t2 - t1}
    return out
