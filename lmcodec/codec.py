"""The :class:`Codec`: the public facade over the encoder, the decoder and the archive driver.

One object owns loaded models (loading costs seconds, so keep the object for
many calls).  Compression settings live on the object; decompression takes the
coding layout (context, segment size, lanes) from the archive.  The engine is
exact (docs/ENGINE.md), so nothing about the machine is recorded: the encoder
scores each segment in one parallel pass, the decoder steps through them with
whatever device, threads and batch size suit it, and both get the same bits.

The work is done by one module per role: :mod:`lmcodec.coding.encoder` (a block's
bytes -> a block), :mod:`lmcodec.coding.decoder` (blocks -> bytes),
:mod:`lmcodec.archive` (header, block order, digest, end record) and
:mod:`lmcodec.executors` (where the block work runs).
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO, Iterator

from . import archive
from .coding.context import BlockContext
from .coding.modelcache import ModelCache
from .coding.settings import (  # noqa: F401  (public names)
    DECODE_ROWS,
    DEFAULT_LEVEL,
    DecodeStats,
    Settings,
    Stats,
    max_kv_bytes,
)
from .dictionary.adapter import Adapter
from .executors import Executor, InProcessExecutor
from .fileio import Counter
from .fileobj import LMCodecFile
from .format.container import Header, segment_layout
from .format.reader import Reader
from .progress import Progress, ProgressCallback


def _as_bytes(prompt: bytes | str | None) -> bytes | None:
    if prompt is None:
        return None
    return prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt)


def _as_adapter(d: "Adapter | bytes | str | os.PathLike | None") -> Adapter | None:
    if d is None or isinstance(d, Adapter):
        return d
    if isinstance(d, (bytes, bytearray, memoryview)):
        return Adapter(bytes(d))
    return Adapter.load(d)


class Codec:
    """Compresses and decompresses with one language model kept in memory.

    ``model``: registry name, GGUF path or HF directory (default: smollm2-135m).
    For decompression with ``model=None`` the archive's registered model is used.
    ``executor``: where the block work runs (default: this process).
    ``dictionary``: an :class:`Adapter` (or its file's bytes or path) both sides
    load, like zstandard's ``dict_data=``; its primer, if it has one, is the
    prompt whenever no other prompt is given.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, progress: ProgressCallback | None = None,
                 executor: Executor | None = None, dictionary: Adapter | bytes | str | os.PathLike | None = None,
                 **settings):
        self.dictionary = _as_adapter(dictionary)
        self.models = ModelCache(model, self.dictionary)
        self.context = BlockContext(self.models)
        self.settings = Settings(**settings)
        self.progress = progress
        self.executor = executor or InProcessExecutor(self.context)
        self.last_stats: Stats | None = None

    layout = staticmethod(segment_layout)

    @property
    def last_decode(self) -> DecodeStats:
        """The model passes, rows and guesses of the last decompression run in this process
        (blocks decoded by other processes, a cluster's workers, are not counted)."""
        return self.context.decode_stats

    @property
    def last_decode_passes(self) -> int:
        """Row-passes of the last decompression: its tokens over this is the tokens a row
        decoded per model pass (1 without guesses; benchmarks.against)."""
        return self.context.decode_stats.row_passes

    @property
    def score_memo(self) -> dict | None:
        """Set to a dict to keep segments' hidden rows between calls (benchmarks)."""
        return self.context.score_memo

    @score_memo.setter
    def score_memo(self, memo: dict | None) -> None:
        self.context.score_memo = memo

    def _progress(self) -> Progress:
        return Progress(self.progress)

    def _prompt(self, prompt: bytes | str | None) -> bytes | None:
        """The prompt given, else the dictionary's primer (None without either)."""
        if prompt is None and self.dictionary is not None:
            return self.dictionary.primer
        return _as_bytes(prompt)

    # -- compression ------------------------------------------------------------------
    def compress_stream(self, src: BinaryIO, dst: BinaryIO, prompt: bytes | str | None = None) -> Stats:
        """Compress ``src`` to ``dst`` block by block (bounded memory); return the stats."""
        return archive.compress_stream(src, dst, models=self.models, settings=self.settings,
                                       prompt=self._prompt(prompt), executor=self.executor, progress=self._progress())

    def compress(self, data: bytes, prompt: bytes | str | None = None) -> bytes:
        """Compress ``data``; the result decompresses with :meth:`decompress`.

        The measurements of the run are kept in :attr:`last_stats`.
        """
        out = io.BytesIO()
        self.last_stats = self.compress_stream(io.BytesIO(bytes(data)), out, prompt)
        return out.getvalue()

    def archive_sink(self, dst: BinaryIO, prompt: bytes | str | None = None) -> archive.ArchiveSink:
        """An archive written into ``dst`` block by block (the writer of :func:`lmcodec.open`)."""
        return archive.ArchiveSink(dst, models=self.models, settings=self.settings, prompt=_as_bytes(prompt),
                                   executor=self.executor, progress=self._progress())

    def stream_writer(self, fh: BinaryIO, prompt: bytes | str | None = None, *, closefd: bool = True):
        """A file object compressing what is written to it into ``fh`` (python-zstandard's shape;
        :func:`lmcodec.open` in mode "wb"): a block is written when full, the end record on close."""
        return LMCodecFile(fh, "wb", codec=self, prompt=prompt, closefd=closefd)

    def stream_reader(self, fh: BinaryIO, prompt: bytes | str | None = None, *, closefd: bool = True):
        """A file object reading the decompressed bytes of the archive in ``fh`` (python-zstandard's
        shape; :func:`lmcodec.open` in mode "rb"): blocks are decoded as reads reach them."""
        return LMCodecFile(fh, "rb", codec=self, prompt=prompt, closefd=closefd)

    def analyze(self, data: bytes, prompt: bytes | str | None = None) -> Stats:
        """Compress and return only the measurements (archive size, model bits)."""
        return self.compress_stream(io.BytesIO(bytes(data)), Counter(), prompt)

    # -- decompression ----------------------------------------------------------------
    @staticmethod
    def read_header(reader: Reader, prompt: bytes | None) -> Header:
        return archive.read_header(reader, prompt)

    def iter_decompressed(self, src: BinaryIO, prompt: bytes | str | None = None,
                          size: int | None = None) -> Iterator[bytes]:
        """The original bytes of the archive in ``src``, chunk by chunk as blocks are decoded
        (what the decoder did: :attr:`last_decode`)."""
        self.context.decode_stats = DecodeStats()
        return archive.iter_decompressed(src, models=self.models, settings=self.settings, prompt=self._prompt(prompt),
                                         executor=self.executor, progress=self._progress(), size=size)

    def decompress_stream(self, src: BinaryIO, dst: BinaryIO, prompt: bytes | str | None = None,
                          size: int | None = None) -> int:
        """Decompress ``src`` into ``dst``; return the number of bytes written.

        ``size`` is the archive's length when known: declared lengths are
        checked against it before anything is read or allocated.
        """
        total = 0
        for raw in self.iter_decompressed(src, prompt, size):
            dst.write(raw)
            total += len(raw)
        return total

    def decompress(self, blob: bytes, prompt: bytes | str | None = None) -> bytes:
        """The original bytes of an archive made by :meth:`compress`."""
        out = io.BytesIO()
        self.decompress_stream(io.BytesIO(blob), out, prompt, size=len(blob))
        return out.getvalue()
