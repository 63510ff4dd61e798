"""Classical compressors on the same bytes, for comparison (Python bindings, stated levels)."""

from __future__ import annotations

import gzip
import lzma

import zstandard


def classical_sizes(data: bytes) -> dict[str, int]:
    """Compressed sizes: gzip -9 (zlib), zstd -19 (python-zstandard), xz -9 (lzma preset 9)."""
    return {
        "gzip": len(gzip.compress(data, compresslevel=9, mtime=0)),
        "zstd": len(zstandard.ZstdCompressor(level=19).compress(data)),
        "xz": len(lzma.compress(data, preset=9)),
    }
