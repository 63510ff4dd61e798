"""The archive driver: input bytes -> blocks -> header, block records, end record, and back.

It cuts the input into blocks, hands them to an executor (in this process or
on workers), writes the results in order, and keeps what spans blocks: the
header, the content digest, the end record.  It never holds more than the
executor has in flight (and, to choose the layout, one block ahead).

An input of at most one block (every file up to the block size) is written in
the format's short form (:func:`lmcodec.container.pack_short`: one check, no
end record); two blocks or more in the general form (header, blocks, end).
"""

from __future__ import annotations

import itertools
import struct
import time
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import zstandard

from .container import (MODEL_CHECK_BYTES, Block, End, Header, Method, Reader, content_hasher, pack_short,
                        prompt_check)
from .errors import ChecksumError, CorruptArchiveError, LMCodecError, ModelMismatchError, PromptMismatchError
from .executors import DecodeJob, EncodeJob, Executor
from .modelcache import ModelCache
from .progress import Progress
from .settings import Settings, Stats

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


def archive_header(models: ModelCache, s: Settings, prompt: bytes | None) -> Header:
    """The header of an archive made with settings ``s`` (resolved)."""
    if s.method in ("auto", "lm"):
        model, _, name = models.coding_model()
        return Header(name, model.fingerprint[:MODEL_CHECK_BYTES], b"", prompt_check(prompt), prompt is not None,
                      s.context, s.segment_tokens, s.lanes, s.block_size, s.level, s.mixer)
    # Stored-only archives name no model and never load one.
    return Header("", b"", b"", prompt_check(prompt), prompt is not None,
                  s.context, s.segment_tokens, s.lanes, s.block_size, s.level, s.mixer)


def compress_stream(src: BinaryIO, dst: BinaryIO, *, models: ModelCache, settings: Settings,
                    prompt: bytes | None, executor: Executor, progress: Progress) -> Stats:
    """Compress ``src`` to ``dst`` block by block (bounded memory); return the stats."""
    s = settings.resolved()
    t0 = time.perf_counter()
    stats = Stats()
    header = archive_header(models, s, prompt)
    raws = read_blocks(src, s.block_size)
    ahead = list(itertools.islice(raws, 2))   # at most one block: the short form
    if len(ahead) < 2:
        raw = ahead[0] if ahead else b""
        encoded = None
        if ahead:
            (encoded,) = executor.map(EncodeJob(s, prompt, _model_arg(models)), iter(ahead), progress)
            stats.add(encoded)
        archive = pack_short(header, encoded.block if encoded else None, raw)
        dst.write(archive)
        stats.output_bytes, stats.input_bytes = len(archive), len(raw)
        stats.seconds = time.perf_counter() - t0
        return stats
    src_blocks = itertools.chain(ahead, raws)
    out = header.pack()
    dst.write(out)
    content = {"total": 0, "n": 0, "check": content_hasher()}

    def blocks() -> Iterator[bytes]:   # the content digest follows the input's order as it is read
        for raw in src_blocks:
            content["total"] += len(raw)
            content["n"] += 1
            content["check"].update(raw)
            yield raw

    for encoded in executor.map(EncodeJob(s, prompt, _model_arg(models)), blocks(), progress):
        packed = encoded.block.pack()
        dst.write(packed)
        stats.output_bytes += len(packed)
        stats.add(encoded)
    end = End(content["total"], content["check"].digest(), content["n"]).pack()
    dst.write(end)
    stats.output_bytes += len(out) + len(end)
    stats.input_bytes = content["total"]
    stats.seconds = time.perf_counter() - t0
    return stats


def read_header(reader: Reader, prompt: bytes | None) -> Header:
    """The archive's header, with the prompt given checked against it."""
    header = reader.header()
    if header.has_prompt and prompt is None:
        raise PromptMismatchError("archive was made with a prompt: pass the same --prompt")
    if not header.has_prompt and prompt is not None:
        raise PromptMismatchError("archive was made without a prompt, but one was given")
    if not header.prompt_matches(prompt):
        raise PromptMismatchError("wrong prompt: it is not the one this archive was made with")
    if header.dict_id:
        # This lmcodec decodes no dictionary archive (a dictionary changes the model, so
        # decoding without it could only fail its check after running the model).
        raise ModelMismatchError(f"archive was made with dictionary {header.dict_id.hex()}; "
                                 "this lmcodec cannot load dictionaries")
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
    header = read_header(reader, prompt)
    s = settings.resolved()
    total, check, n_blocks, end = 0, reader.content_hasher(), 0, []
    job = DecodeJob(s, header, prompt, _model_arg(models))
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
    if not reader.at_eof():
        raise CorruptArchiveError("trailing data after the end of the archive")
