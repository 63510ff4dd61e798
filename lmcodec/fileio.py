"""Output files that appear whole or not at all, and signals that clean up.

Output is written to a hidden temporary file in the destination directory and
renamed into place only after it is complete (and verified, when asked), so a
failure, Ctrl-C or SIGTERM never leaves a truncated file under the real name.
"""

from __future__ import annotations

import os
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


class Terminated(BaseException):
    """Raised from the SIGTERM handler so ``finally`` blocks run and temp files go."""


def _on_sigterm(signum, frame):  # pragma: no cover - exercised in a subprocess test
    raise Terminated()


def install_signal_handlers() -> None:
    """Turn SIGTERM into an exception (SIGINT already raises KeyboardInterrupt)."""
    signal.signal(signal.SIGTERM, _on_sigterm)


@contextmanager
def atomic_output(path: Path, force: bool) -> Iterator[BinaryIO]:
    """Yield a file to write; on success it replaces ``path``, on failure it vanishes."""
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; use -f to overwrite")
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
