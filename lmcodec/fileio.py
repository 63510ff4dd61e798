"""Output files that appear whole or not at all, and signals that clean up.

Output is written to a hidden temporary file in the destination directory and
renamed into place only after it is complete (and verified, when asked), so a
failure, Ctrl-C or SIGTERM never leaves a truncated file under the real name.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


class Terminated(BaseException):
    """Raised from the SIGTERM handler so ``finally`` blocks run and temp files go."""


#: Delay before a signal whose exception was swallowed is sent again (seconds).
REDELIVER_S = 0.05


def _on_signal(signum, frame):  # pragma: no cover - exercised in a subprocess test
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _unraisable(args, default=sys.unraisablehook) -> None:
    """Send a signal again when its exception was raised where it cannot propagate.

    Python runs a signal's handler wherever the main thread happens to be; inside
    a ctypes callback (numba's JIT compiler calls back into Python while it
    compiles a kernel) or a ``__del__`` the exception is only reported as
    "Exception ignored" and the work would go on as if no signal had come.
    Instead the report is dropped and the process signals itself again shortly,
    by when that code has returned and the exception ends the command as usual.
    """
    if isinstance(args.exc_value, (Terminated, KeyboardInterrupt)):
        signum = signal.SIGTERM if isinstance(args.exc_value, Terminated) else signal.SIGINT
        timer = threading.Timer(REDELIVER_S, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
    else:
        default(args)


def install_signal_handlers() -> None:
    """Turn SIGTERM and SIGINT into exceptions that end the command, even when first swallowed."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    sys.unraisablehook = _unraisable


class _Output:
    """The temporary output file, whose write errors name the real destination.

    A full disk (ENOSPC, or EFBIG past a file-size limit) raises from ``write``
    with no file name; the user should read which output could not be written,
    not a bare "File too large" or the hidden temporary name.
    """

    def __init__(self, f: BinaryIO, path: Path):
        self._f = f
        self._path = path

    @contextmanager
    def _naming_destination(self) -> Iterator[None]:
        """Report OS errors under the destination's name, not the temp file's."""
        try:
            yield
        except OSError as exc:
            if exc.filename is not None or exc.errno is None:
                raise
            raise type(exc)(exc.errno, exc.strerror, str(self._path)) from exc

    def write(self, data) -> int:
        with self._naming_destination():
            return self._f.write(data)

    def flush(self) -> None:
        with self._naming_destination():
            self._f.flush()

    def writable(self) -> bool:
        return True

    def __getattr__(self, name):
        return getattr(self._f, name)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: Path, force: bool) -> Iterator[BinaryIO]:
    """Yield a file to write; on success it replaces ``path``, on failure it vanishes.

    The temporary file is hidden (``.NAME.XXXXXX.tmp``) in the destination
    directory, so the final rename is atomic; errors name ``path``, never the
    temporary file.  The result gets the usual permissions (0666 less the
    umask), not mkstemp's 0600.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; use -f to overwrite")
    if path.exists() and not path.is_file() and not path.is_dir():
        # A device or FIFO (-f -o /dev/null): write into it; renaming over it would replace it.
        with open(path, "wb") as f:
            yield _Output(f, path)
        return
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        if exc.errno is None:
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            out = _Output(f, path)
            yield out
            out.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class Counter(io.RawIOBase):
    """A sink that only counts the bytes written to it (:meth:`Codec.analyze`, ``lmcodec test``)."""

    def __init__(self) -> None:
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.n += len(b)
        return len(b)
