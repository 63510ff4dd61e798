"""Where lmcodec keeps what it derives once and reuses: converted weights, integer models, compiled kernels.

A leaf: the model loader and the CPU kernels both name their directories under it,
and neither depends on the other for that.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LMCODEC_CACHE``, else ``lmcodec`` under the XDG cache directory (``~/.cache`` by default)."""
    env = os.environ.get("LMCODEC_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "lmcodec"
