"""An archive as a file object (what ``lmcodec.open()`` returns), as ``gzip.GzipFile`` is.

Reading pulls: :class:`LMCodecFile` wraps the decoder's chunk generator
(:func:`lmcodec.archive.iter_decompressed`) in an :class:`io.BufferedReader`,
so a block is decoded when a read reaches it and memory stays at about one
decoded block.  Writing buffers at most one block: when the buffer holds a
block's worth, the block is cut where :func:`lmcodec.archive.read_blocks`
cuts it (:func:`~lmcodec.archive.cut_point`) and encoded through the same
:class:`~lmcodec.archive.ArchiveSink` that :meth:`Codec.compress_stream`
uses, so the archive is byte for byte ``Codec.compress(data)``, whatever the
sizes of the writes.

The ``_check_*`` helpers are copied from the standard library's private
``_compression.BaseStream`` (it moved to ``compression._common`` in 3.14),
not imported.
"""

from __future__ import annotations

import builtins
import io
import os
from collections.abc import Iterator
from typing import BinaryIO, Protocol

from . import archive
from .coding.settings import Stats


class ArchiveCodec(Protocol):
    """What a file object needs of :class:`lmcodec.Codec` (this module sits below it: the codec
    makes file objects, ``Codec.stream_reader``/``stream_writer``, so the file object takes it as given)."""

    def archive_sink(self, dst: BinaryIO, prompt: bytes | str | None = None) -> archive.ArchiveSink: ...

    def iter_decompressed(self, src: BinaryIO, prompt: bytes | str | None = None,
                          size: int | None = None) -> Iterator[bytes]: ...


_READ, _WRITE = "r", "w"


class LMCodecFile(io.BufferedIOBase):
    """A file object reading or writing one lmcodec archive.

    ``filename``: a path (str, bytes, PathLike) or a binary file object to read
    from or write to.  ``mode``: "r"/"rb", "w"/"wb" or "x"/"xb" ("a" is not
    supported: archives appended to each other do not decode as one).
    ``codec``: the :class:`~lmcodec.Codec` that codes it (it keeps its model
    loaded for the next file; :func:`lmcodec.open` makes one from settings).
    ``prompt``: the decoding key, if the archive has one.  ``closefd``: close ``filename``'s file object on close (default:
    only a file this object opened).
    """

    def __init__(self, filename, mode: str = "r", *, codec: ArchiveCodec, prompt: bytes | str | None = None,
                 closefd: bool | None = None):
        if mode not in ("r", "rb", "w", "wb", "x", "xb"):
            raise ValueError(f"Invalid mode: {mode!r}")
        self._codec = codec
        self._prompt = prompt   # the codec's reader and writer take bytes or str
        self._mode = _READ if mode.startswith("r") else _WRITE
        if isinstance(filename, (str, bytes, os.PathLike)):
            self._fp: BinaryIO = builtins.open(filename, mode[0] + "b")
            self._closefd = True if closefd is None else closefd
            self.name = os.fsdecode(filename)
        elif hasattr(filename, "read" if self._mode == _READ else "write"):
            self._fp = filename
            self._closefd = bool(closefd)
            self.name = getattr(filename, "name", "")
        else:
            raise TypeError("filename must be a str, bytes, PathLike or file object")
        self._closed = False
        try:
            if self._mode == _READ:
                self._origin = _tell(self._fp)  # where the archive starts (a backward seek returns there)
                self._buffer = io.BufferedReader(_Decoded(self))
            else:
                self._writer = _BlockWriter(self._codec, self._fp, self._prompt)
        except BaseException:
            if self._closefd:
                self._fp.close()
            raise

    # -- the four checks of _compression.BaseStream ----------------------------------------
    def _check_not_closed(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def _check_can_read(self) -> None:
        if not self.readable():
            raise io.UnsupportedOperation("File not open for reading")

    def _check_can_write(self) -> None:
        if not self.writable():
            raise io.UnsupportedOperation("File not open for writing")

    def _check_can_seek(self) -> None:
        if not self.readable():
            raise io.UnsupportedOperation("Seeking is only supported on files open for reading")
        if not self.seekable():
            raise io.UnsupportedOperation("The underlying file object does not support seeking")

    # -- state ------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def mode(self) -> str:
        return "rb" if self._mode == _READ else "wb"

    def readable(self) -> bool:
        self._check_not_closed()
        return self._mode == _READ

    def writable(self) -> bool:
        self._check_not_closed()
        return self._mode == _WRITE

    def seekable(self) -> bool:
        return self.readable() and _seekable(self._fp)

    def fileno(self) -> int:
        self._check_not_closed()
        return self._fp.fileno()

    @property
    def stats(self) -> Stats | None:
        """A writer's measurements, once it is closed (as :attr:`Codec.last_stats`)."""
        return getattr(self, "_stats", None)

    def close(self) -> None:
        """A writer encodes its last block and writes the end record; then the file closes."""
        if self._closed:
            return
        try:
            if self._mode == _WRITE:
                self._stats = self._writer.finish()
            else:
                self._buffer.close()
        finally:
            self._closed = True
            if self._closefd:
                self._fp.close()

    # -- reading ----------------------------------------------------------------------------
    def read(self, size: int | None = -1) -> bytes:
        self._check_can_read()
        return self._buffer.read(size)

    def read1(self, size: int = -1) -> bytes:
        self._check_can_read()
        return self._buffer.read1(size)

    def readinto(self, b) -> int:
        self._check_can_read()
        return self._buffer.readinto(b)

    def peek(self, size: int = 0) -> bytes:
        self._check_can_read()
        return self._buffer.peek(size)

    def readline(self, size: int | None = -1) -> bytes:
        self._check_can_read()
        return self._buffer.readline(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Seek in the decompressed data.  Slow: forward decodes up to the target, and
        backward decodes again from the archive's start (as ``LZMAFile.seek``)."""
        self._check_can_seek()
        return self._buffer.seek(offset, whence)

    def tell(self) -> int:
        self._check_not_closed()
        return self._buffer.tell() if self._mode == _READ else self._writer.taken

    # -- writing ----------------------------------------------------------------------------
    def write(self, data) -> int:
        self._check_can_write()
        return self._writer.write(data)

    def flush(self) -> None:
        """Nothing to do before a block is full: a block is coded whole, so flushing cannot
        make a partial block visible (``close()`` writes the rest)."""
        self._check_not_closed()


class _Decoded(io.RawIOBase):
    """The decoded bytes as a raw stream: chunks pulled from the decoder as reads need them."""

    def __init__(self, owner: LMCodecFile):
        self._owner = owner
        self._chunks: Iterator[bytes] | None = None
        self._start()

    def _start(self) -> None:
        """Start decoding at the archive's first byte (again, for a backward seek)."""
        owner = self._owner
        if self._chunks is not None:
            self._chunks.close()
        size = _size_left(owner._fp)
        self._chunks = owner._codec.iter_decompressed(owner._fp, owner._prompt, size)
        self._chunk = memoryview(b"")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._chunk:
            if self._chunks is None:
                return 0
            try:
                self._chunk = memoryview(next(self._chunks))
            except StopIteration:  # the end record and trailing bytes are checked by then
                self._chunks = None
                return 0
        n = min(len(b), len(self._chunk))
        b[:n] = self._chunk[:n]
        self._chunk = self._chunk[n:]
        self._pos += n
        return n

    def seekable(self) -> bool:
        return _seekable(self._owner._fp)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence == io.SEEK_END:
            while self.read(io.DEFAULT_BUFFER_SIZE):
                pass
            offset += self._pos
        elif whence != io.SEEK_SET:
            raise ValueError(f"Invalid value for whence: {whence}")
        if offset < self._pos:
            self._owner._fp.seek(self._owner._origin)
            self._start()
        while self._pos < offset:
            if not self.read(min(io.DEFAULT_BUFFER_SIZE, offset - self._pos)):
                break
        return self._pos

    def close(self) -> None:
        if self._chunks is not None:
            self._chunks.close()
        super().close()


class _BlockWriter:
    """Input cut into blocks exactly as ``read_blocks`` cuts a stream, each encoded when full.

    Holds at most one block (``block_size`` bytes): data is taken from each
    write only as far as it fills the block.
    """

    def __init__(self, codec: ArchiveCodec, fp: BinaryIO, prompt: bytes | str | None):
        self._sink = codec.archive_sink(fp, prompt)
        self._block_size = self._sink.block_size
        self._buf = bytearray()
        self.taken = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        at = 0
        while at < len(view):
            room = self._block_size - len(self._buf)
            self._buf += view[at:at + room]
            at += room
            if len(self._buf) == self._block_size:
                cut = archive.cut_point(self._buf, self._block_size)
                self._sink.write_blocks([bytes(self._buf[:cut])])
                del self._buf[:cut]
        self.taken += len(view)
        return len(view)

    def finish(self) -> Stats:
        if self._buf:
            self._sink.write_blocks([bytes(self._buf)])
            self._buf.clear()
        return self._sink.finish()


def _tell(fp) -> int | None:
    try:
        return fp.tell()
    except (OSError, AttributeError, ValueError):
        return None


def _seekable(fp) -> bool:
    try:
        return bool(fp.seekable())
    except (AttributeError, ValueError):
        return False


def _size_left(fp) -> int | None:
    """Bytes from the position to the end of a regular file (checks declared lengths); None for a pipe."""
    try:
        if not fp.seekable():
            return None
        here = fp.tell()
        end = fp.seek(0, io.SEEK_END)
        fp.seek(here)
        return end - here
    except (OSError, AttributeError, ValueError):
        return None
