"""The archive driver: input bytes -> blocks -> header, block records, end record, and back.

It cuts the input into blocks, hands them to an executor (in this process or
on workers), writes the results in order, and keeps what spans blocks: the
header, the content digest, the end record.  It never holds more than the
executor has in flight (and, to choose the layout, one block ahead).

An input of at most one block (every file up to the block size) is written in
the format's short form (:func:`lmcodec.format.container.pack_short`: one check, and a
payload check from 64 tokens; no end record); two blocks or more in the general form (header, blocks, end).
"""

from __future__ import annotations

import itertools
import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import zstandard

from .coding.modelcache import ModelCache
from .coding.settings import Settings, Stats
from .errors import (
    ChecksumError,
    CorruptArchiveError,
    LMCodecError,
    PromptMismatchError,
)
from .executors import DecodeJob, EncodeJob, Executor
from .format.container import (
    MODEL_CHECK_BYTES,
    Block,
    End,
    Header,
    Method,
    content_hasher,
    pack_short,
    prompt_check,
)
from .format.reader import Reader
from .progress import Progress

#: The decoder gathers consecutive LM blocks until their segments fill its rows or
#: their bytes reach this (what it holds before writing; levels 8 and 9: a block is
#: one segment, so a big file still decodes many rows at a time).
GATHER_BYTES = 256 << 20


def cut_point(buf: bytes, block_size: int) -> int:
    """Where a full buffer of ``block_size`` bytes ends its block: after the last line
    break in its last quarter, else at ``block_size`` (the model codes whole lines better)."""
    return buf.rfind(b"\n", block_size * 3 // 4) + 1 or block_size


def read_blocks(src: BinaryIO, block_size: int) -> Iterator[bytes]:
    """Cut the input into blocks (:func:`cut_point`)."""
    carry = b""
    while True:
        chunk = carry + src.read(block_size - len(carry))
        if not chunk:
            return
        if len(chunk) < block_size:
            yield chunk
            return
        cut = cut_point(chunk, block_size)
        yield chunk[:cut]
        carry = chunk[cut:]


def _model_arg(models: ModelCache) -> str | None:
    return None if models.model_arg is None else str(models.model_arg)


def _dictionary(models: ModelCache) -> bytes | None:
    """The dictionary file's bytes, for workers that load their own models (None without one)."""
    return None if models.adapter is None else models.adapter.as_bytes()


def archive_header(models: ModelCache, s: Settings, prompt: bytes | None) -> Header:
    """The header of an archive made with settings ``s`` (resolved)."""
    if s.method in ("auto", "lm"):
        _, _, name = models.coding_model()
        base = models.base_fingerprint(models.model_arg)
        return Header(name, base[:MODEL_CHECK_BYTES], b"", prompt_check(prompt), prompt is not None,
                      s.context, s.segment_tokens, s.lanes, s.block_size, s.level, s.mixer,
                      dict_id=models.dict_id())
    # Stored-only archives name no model and never load one.
    return Header("", b"", b"", prompt_check(prompt), prompt is not None,
                  s.context, s.segment_tokens, s.lanes, s.block_size, s.level, s.mixer)


class ArchiveSink:
    """An archive written block by block: each block's record as the executor returns it.

    The layout depends on the block count, known only when a second block comes
    or the input ends: the first block is held back until then.  At most one
    block (every file up to the block size) gives the short form
    (:func:`lmcodec.format.container.pack_short`: no CRCs, no end record), written on
    :meth:`finish`; two or more give the general form: the header when the
    second block comes, then the records, the end record on :meth:`finish`.

    :func:`compress_stream` feeds it the blocks :func:`read_blocks` cuts; the
    writer of :func:`lmcodec.open` feeds it the blocks it cuts from its writes
    with the same :func:`cut_point`, so both give the same archive.
    """

    def __init__(self, dst: BinaryIO, *, models: ModelCache, settings: Settings, prompt: bytes | None,
                 executor: Executor, progress: Progress):
        self.settings = s = settings.resolved()
        self._dst, self._executor, self._progress = dst, executor, progress
        self._header = archive_header(models, s, prompt)
        self._job = EncodeJob(s, prompt, _model_arg(models), self._header.model_fingerprint, _dictionary(models))
        self._t0 = time.perf_counter()
        self._total, self._n, self._check = 0, 0, content_hasher()
        self._held: bytes | None = None     # the first block, until the layout is known
        self._general = False               # the general form's header is written
        self.stats = Stats()

    @property
    def block_size(self) -> int:
        return self.settings.block_size

    def write_blocks(self, blocks: Iterable[bytes]) -> None:
        """Encode and write ``blocks`` in order (pulled lazily: at most the executor's in-flight work)."""
        blocks = iter(blocks)
        if not self._general:
            for raw in blocks:
                if self._held is None:
                    self._held = raw
                    continue
                head = self._header.pack()      # a second block: the general form
                self._dst.write(head)
                self.stats.output_bytes += len(head)
                self._general = True
                blocks = itertools.chain([self._held, raw], blocks)
                self._held = None
                break
            else:
                return
        for encoded in self._executor.map(self._job, self._counted(blocks), self._progress):
            packed = encoded.block.pack()
            self._dst.write(packed)
            self.stats.output_bytes += len(packed)
            self.stats.add(encoded)

    def _counted(self, blocks: Iterable[bytes]) -> Iterator[bytes]:
        """The content digest follows the input's order as it is read."""
        for raw in blocks:
            self._total += len(raw)
            self._n += 1
            self._check.update(raw)
            yield raw

    def finish(self) -> Stats:
        """Write the short-form archive, or the general form's end record; return the stats."""
        if self._general:
            end = End(self._total, self._check.digest(), self._n).pack()
            self._dst.write(end)
            self.stats.output_bytes += len(end)
            self.stats.input_bytes = self._total
        else:
            raw, encoded = self._held or b"", None
            if self._held is not None:
                (encoded,) = self._executor.map(self._job, iter([raw]), self._progress)
                self.stats.add(encoded)
            archive = pack_short(self._header, encoded.block if encoded else None, raw)
            self._dst.write(archive)
            self.stats.output_bytes, self.stats.input_bytes = len(archive), len(raw)
        self.stats.seconds = time.perf_counter() - self._t0
        return self.stats


def compress_stream(src: BinaryIO, dst: BinaryIO, *, models: ModelCache, settings: Settings,
                    prompt: bytes | None, executor: Executor, progress: Progress) -> Stats:
    """Compress ``src`` to ``dst`` block by block (bounded memory); return the stats."""
    sink = ArchiveSink(dst, models=models, settings=settings, prompt=prompt, executor=executor, progress=progress)
    sink.write_blocks(read_blocks(src, sink.block_size))
    return sink.finish()


def read_header(reader: Reader, prompt: bytes | None, models: ModelCache | None = None) -> Header:
    """The archive's header, with the dictionary (of ``models``) and the prompt given checked against it.

    The dictionary comes first: its primer is the prompt when none is given, so
    a missing dictionary would otherwise read as a missing prompt.
    """
    header = reader.header()
    if models is not None:
        models.check_dictionary(header)
    if header.has_prompt and prompt is None:
        raise PromptMismatchError("archive was made with a prompt: pass the same --prompt")
    if not header.has_prompt and prompt is not None:
        raise PromptMismatchError("archive was made without a prompt, but one was given")
    if not header.prompt_matches(prompt):
        raise PromptMismatchError("wrong prompt: it is not the one this archive was made with")
    return header


def _groups(reader: Reader, header: Header, rows: int, end: list) -> Iterator[list[Block]]:
    """Consecutive LM blocks gathered until their segments fill ``rows`` or their bytes reach
    :data:`GATHER_BYTES` (decoded side by side); a stored block alone.  ``end`` gets the end record."""
    pending: list[Block] = []
    while True:
        rec = reader.next(header)
        if isinstance(rec, End):
            if pending:
                yield pending
            end.append(rec)
            return
        if rec.method != Method.LM:
            if pending:
                yield pending
            pending = []
            yield [rec]
            continue
        pending.append(rec)
        if sum(len(b.tokens) for b in pending) >= rows or sum(b.raw_len for b in pending) >= GATHER_BYTES:
            yield pending
            pending = []


def iter_decompressed(src: BinaryIO, *, models: ModelCache, settings: Settings, prompt: bytes | None,
                      executor: Executor, progress: Progress, size: int | None = None) -> Iterator[bytes]:
    """The original bytes of an archive, block by block as they are decoded and checked.

    ``size`` is the archive's length when known: declared lengths are checked
    against it before anything is read or allocated.  The end record is
    checked after the last block: a consumer that stops early has seen only
    checked blocks, never the whole archive's verdict.
    """
    reader = Reader(src, size)
    header = read_header(reader, prompt, models)
    s = settings.resolved()
    total, check, n_blocks, end = 0, reader.content_hasher(), 0, []
    job = DecodeJob(s, header, prompt, _model_arg(models), _dictionary(models))
    try:
        for raws in executor.map(job, _groups(reader, header, s.decode_rows, end), progress):
            for raw in raws:
                total += len(raw)
                check.update(raw)
                n_blocks += 1
                yield raw
    except LMCodecError:
        raise
    except (ValueError, OverflowError, MemoryError, RuntimeError, IndexError, KeyError, TypeError,
            struct.error, zlib.error, zstandard.ZstdError) as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        raise CorruptArchiveError(f"archive could not be decoded ({type(exc).__name__}: {first})") from exc
    rec = end[0]
    if (rec.total_len, rec.check, rec.n_blocks) != (total, check.digest(), n_blocks):
        raise ChecksumError("archive content does not match its end record (blocks missing, "
                            "reordered or spliced)")
    reader.expect_end()
