"""The :class:`Codec`: bytes -> tokens -> segments -> model -> coder -> archive, and back.

One object owns a loaded model (loading costs seconds, so keep the object for
many calls).  Compression settings live on the object; decompression takes
every setting from the archive, because the decoder must repeat the encoder's
computation exactly -- same device, dtype, thread count, batch layout, context.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator

import numpy as np
import torch
import zstandard

from . import models
from .coder import SegmentDecoder, SegmentEncoder
from .container import (Block, End, Header, Method, Reader, content_hasher, digest, prompt_check,
                        segment_layout)
from .engine import Engine, Lockstep, kv_bytes, pick_device, pick_dtype, torch_threads
from .errors import (
    ChecksumError,
    CorruptArchiveError,
    EnvironmentMismatchError,
    LMCodecError,
    ModelMismatchError,
    PromptMismatchError,
    ResourceLimitError,
    UsageError,
)
from .frequencies import MIN_TOKEN_BITS, StepTables
from .tokens import ByteTokenizer

DEFAULT_SEGMENT_TOKENS = 2048
DEFAULT_CONTEXT = 2048
DEFAULT_BATCH = {"cpu": 64, "cuda": 512}
DEFAULT_BLOCK_SIZE = 4 << 20
DEFAULT_ESCAPE_BITS = 16
ZSTD_LEVEL = 19
#: Above this many symbols per byte the data is not text the model can help
#: with (text is ~0.27); skip the slow LM pass and store it with zstd or raw.
BINARY_SYMBOLS_PER_BYTE = 0.6

#: Bytes of the prompt's tail tokenized per token of prefix kept (a token is
#: rarely over 16 bytes), bounding the work a huge prompt causes.
PROMPT_TAIL_BYTES_PER_TOKEN = 16

Progress = Callable[[int], None]


def max_kv_bytes() -> int:
    """Refuse to allocate more KV cache than this (``LMCODEC_MAX_KV_GIB``, default 16)."""
    try:
        return int(float(os.environ.get("LMCODEC_MAX_KV_GIB", "16")) * 2**30)
    except ValueError:
        return 16 * 2**30


@dataclass(frozen=True)
class Settings:
    """Compression parameters; all of them are recorded in the archive header."""

    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    batch_size: int | None = None
    segment_tokens: int = DEFAULT_SEGMENT_TOKENS
    context: int = DEFAULT_CONTEXT
    block_size: int = DEFAULT_BLOCK_SIZE
    escape_bits: int = DEFAULT_ESCAPE_BITS
    method: str = "auto"  # auto | lm | zstd | raw

    def resolved(self) -> "Settings":
        device = pick_device(self.device)
        threads = self.threads or max(1, min(torch.get_num_threads(), 8))
        batch = self.batch_size or DEFAULT_BATCH[device]
        if self.method not in ("auto", "lm", "zstd", "raw"):
            raise UsageError(f"method must be auto, lm, zstd or raw, not {self.method!r}")
        if not 1 <= threads <= 256 or not 1 <= batch <= 65535:
            raise UsageError("threads must be 1..256 and batch size 1..65535")
        if not 16 <= self.context <= 1 << 20 or not 1 <= self.segment_tokens <= 1 << 30:
            raise UsageError("context must be 16..1048576 tokens and segment tokens >= 1")
        if not 4096 <= self.block_size <= 64 << 20:
            raise UsageError("block size must be 4 KiB..64 MiB")
        if not 4 <= self.escape_bits <= 30:
            raise UsageError("escape bits must be 4..30")
        return Settings(device, pick_dtype(self.dtype, device), threads, batch, self.segment_tokens,
                        self.context, self.block_size, self.escape_bits, self.method)


@dataclass
class Stats:
    """What a compression run measured; ``model_bits`` is the ideal code length."""

    input_bytes: int = 0
    output_bytes: int = 0
    tokens: int = 0
    lm_bytes: int = 0          # input bytes coded by the model (not stored by fallback)
    lm_payload_bytes: int = 0  # range-coder payload bytes of those blocks
    model_bits: float = 0.0    # sum of -log2 p over the coded symbols
    escapes: int = 0
    seconds: float = 0.0
    methods: list[str] = field(default_factory=list)

    @property
    def bpb(self) -> float:
        """Archive bits per input byte, every byte of the archive counted."""
        return 8 * self.output_bytes / self.input_bytes if self.input_bytes else 0.0

    @property
    def model_bpb(self) -> float:
        """The model's cross-entropy in bits per byte over the LM-coded bytes."""
        return self.model_bits / self.lm_bytes if self.lm_bytes else 0.0

    @property
    def coder_overhead(self) -> float:
        """Payload bits over the model's ideal bits, minus one (0.001 = 0.1%)."""
        return 8 * self.lm_payload_bytes / self.model_bits - 1 if self.model_bits else 0.0

    def as_dict(self) -> dict:
        return dict(input_bytes=self.input_bytes, output_bytes=self.output_bytes, bpb=self.bpb,
                    model_bpb=self.model_bpb, coder_overhead=self.coder_overhead, tokens=self.tokens,
                    lm_bytes=self.lm_bytes, escapes=self.escapes, seconds=self.seconds,
                    methods=sorted(set(self.methods)))


def _as_bytes(prompt: bytes | str | None) -> bytes | None:
    if prompt is None:
        return None
    return prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt)


def _read_blocks(src: BinaryIO, block_size: int) -> Iterator[bytes]:
    """Cut the input into blocks, at a line break near the end when there is one."""
    carry = b""
    while True:
        chunk = carry + src.read(block_size - len(carry))
        if not chunk:
            return
        if len(chunk) < block_size:
            yield chunk
            return
        cut = chunk.rfind(b"\n", block_size * 3 // 4) + 1
        cut = cut or block_size
        yield chunk[:cut]
        carry = chunk[cut:]


class Codec:
    """Compresses and decompresses with one language model kept in memory.

    ``model``: registry name, GGUF path or HF directory (default: smollm2-135m).
    For decompression with ``model=None`` the archive's registered model is used.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, progress: Progress | None = None,
                 **settings):
        self._model_arg = model
        self.settings = Settings(**settings)
        self.progress = progress
        self.last_stats: Stats | None = None
        self._models: dict[str, models.LoadedModel] = {}
        self._engines: dict[tuple, Engine] = {}
        self._tokenizers: dict[str, ByteTokenizer] = {}
        self._prefixes: dict[tuple, list[int]] = {}

    def _tick(self, nbytes: int) -> None:
        if self.progress is not None and nbytes:
            self.progress(nbytes)

    # -- model plumbing ---------------------------------------------------------------
    def _load(self, spec: str | os.PathLike | None) -> tuple[models.LoadedModel, ByteTokenizer]:
        key = str(spec) if spec is not None else models.DEFAULT_MODEL
        if key not in self._models:
            m = models.load(spec)
            self._models[key] = m
            self._tokenizers[key] = ByteTokenizer(m.tokenizer, m.arch.vocab_size)
        return self._models[key], self._tokenizers[key]

    def _engine(self, model: models.LoadedModel, device: str, dtype: str) -> Engine:
        key = (model.model_fingerprint, device, dtype)
        if key not in self._engines:
            self._engines[key] = Engine(model, device, dtype)
        return self._engines[key]

    def _model_for(self, header: Header) -> tuple[models.LoadedModel, ByteTokenizer]:
        spec = self._model_arg
        if spec is None:
            if header.model_name not in models.REGISTRY:
                raise ModelMismatchError(
                    f"archive was made with model {header.model_name!r} "
                    f"(fingerprint {header.model_fingerprint.hex()[:16]}), which is not registered; "
                    "pass it with --model PATH")
            spec = header.model_name
        model, tok = self._load(spec)
        if model.model_fingerprint == header.model_fingerprint and tok.fingerprint != header.tokenizer_fingerprint:
            raise ModelMismatchError(
                f"wrong tokenizer: archive needs tokenizer {header.tokenizer_fingerprint.hex()[:16]}, "
                f"model {model.name!r} has {tok.fingerprint.hex()[:16]}")
        if model.model_fingerprint != header.model_fingerprint:
            raise ModelMismatchError(
                f"wrong model: archive needs {header.model_name!r} "
                f"(fingerprint {header.model_fingerprint.hex()[:16]}), "
                f"got {model.name!r} (fingerprint {model.model_fingerprint.hex()[:16]})")
        return model, tok

    def _prefix(self, tok: ByteTokenizer, prompt: bytes | None, context: int) -> list[int]:
        """Start token + the prompt's last tokens (at most half the context).

        Only the prompt's last ``PROMPT_TAIL_BYTES_PER_TOKEN * keep`` bytes are
        tokenized (both sides do the same), so a 100 MB prompt costs what a
        short one does; the whole prompt is still hashed for the prompt check.
        """
        if not prompt:
            return [tok.start_token]
        key = (tok.fingerprint, prompt_check(prompt), len(prompt), context)
        if key not in self._prefixes:
            keep = context // 2 - 1
            tail = prompt[-PROMPT_TAIL_BYTES_PER_TOKEN * keep:]
            self._prefixes[key] = [tok.start_token] + tok.model_inputs(tok.encode(tail)).tolist()[-keep:]
        return self._prefixes[key]

    # -- segment layout -------------------------------------------------------------
    layout = staticmethod(segment_layout)

    def _run(self, engine: Engine, prefix: list[int], lengths: list[int], s: Settings,
             step: Callable[[int, StepTables, list[int]], np.ndarray], nbytes: int) -> None:
        """Drive the model over segments in batches of ``s.batch_size``.

        ``step(t, tables, segs)`` codes position ``t`` of the active segments
        ``segs`` (row ``g % batch_size`` of ``tables``) and returns the model
        inputs for the next step.  Encoder and decoder share this loop, so they share
        the exact sequence of model calls.  Progress is reported in input
        bytes, spread evenly over the block's tokens.
        """
        total, done, reported = sum(lengths), 0, 0
        rows = min(len(lengths), s.batch_size)
        need = kv_bytes(engine.arch, s.dtype, rows, min(s.context, len(prefix) + max(lengths, default=0)))
        if need > max_kv_bytes():
            raise ResourceLimitError(
                f"coding needs {need / 2**30:.1f} GiB of KV cache (batch {rows} x context "
                f"{s.context}), over the {max_kv_bytes() / 2**30:.1f} GiB limit "
                "(LMCODEC_MAX_KV_GIB)")
        for start in range(0, len(lengths), s.batch_size):
            batch = lengths[start:start + s.batch_size]
            run = Lockstep(engine, prefix, len(batch), s.context, max(batch))
            feed = np.full(len(batch), prefix[-1], dtype=np.int64)
            for t in range(max(batch)):
                rows = [i for i, n in enumerate(batch) if t < n]
                tables = StepTables(run.logits, s.escape_bits)
                coded = step(t, tables, [start + i for i in rows])
                feed[rows] = coded
                if t + 1 < max(batch):
                    run.advance(torch.from_numpy(feed))
                done += len(rows)
                now = nbytes * done // total
                self._tick(now - reported)
                reported = now

    # -- compression ------------------------------------------------------------------
    def _header(self, s: Settings, prompt: bytes | None) -> Header:
        model, tok = self._load(self._model_arg)
        return Header(model.name, model.model_fingerprint, tok.fingerprint, prompt_check(prompt),
                      prompt is not None, s.device, s.dtype, s.threads, s.batch_size, s.context,
                      s.segment_tokens, s.escape_bits, s.block_size)

    def _lm_block(self, raw: bytes, symbols: np.ndarray, prompt: bytes | None,
                  s: Settings) -> tuple[Block, float]:
        """Code ``symbols`` with the model; return the block and its ideal bits."""
        model, tok = self._load(self._model_arg)
        engine = self._engine(model, s.device, s.dtype)
        lengths = self.layout(len(symbols), s.segment_tokens)
        offsets = np.cumsum([0] + lengths)
        inputs = tok.model_inputs(symbols)
        encoders = [SegmentEncoder() for _ in lengths]
        bits = 0.0

        def step(t: int, tables: StepTables, segs: list[int]) -> np.ndarray:
            nonlocal bits
            at = offsets[segs] + t
            for g, sym in zip(segs, symbols[at].tolist()):
                bits += encoders[g].encode_token(tables, g % s.batch_size, sym)
            return inputs[at]

        with torch_threads(s.threads), torch.inference_mode():
            self._run(engine, self._prefix(tok, prompt, s.context), lengths, s, step, len(raw))
        return Block.build(Method.LM, raw, [e.finish() for e in encoders], lengths), bits

    def _encode_block(self, raw: bytes, prompt: bytes | None, s: Settings, stats: Stats) -> Block:
        """The smallest of the allowed methods for this block (``auto``: all three)."""
        candidates = []
        if s.method in ("auto", "raw"):
            candidates.append(Block.build(Method.RAW, raw, [raw], [0]))
        if s.method in ("auto", "zstd"):
            packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
            candidates.append(Block.build(Method.ZSTD, raw, [packed], [0]))
        lm = None
        if s.method in ("auto", "lm"):
            _, tok = self._load(self._model_arg)
            symbols = tok.encode(raw)
            if s.method == "lm" or len(symbols) <= BINARY_SYMBOLS_PER_BYTE * len(raw):
                lm, bits = self._lm_block(raw, symbols, prompt, s)
                candidates.append(lm)
        if lm is None:
            self._tick(len(raw))
        best = min(candidates, key=lambda b: len(b.pack()))
        if best is lm:  # only coded bits that end up in the archive count
            stats.model_bits += bits
            stats.lm_payload_bytes += sum(len(p) for p in lm.payloads)
            stats.lm_bytes += len(raw)
            stats.tokens += lm.n_tokens
            stats.escapes += int((symbols >= tok.vocab_size).sum())
        stats.methods.append(best.method.name.lower())
        return best

    def compress_stream(self, src: BinaryIO, dst: BinaryIO, prompt: bytes | str | None = None) -> Stats:
        """Compress ``src`` to ``dst`` block by block (bounded memory); return the stats."""
        s = self.settings.resolved()
        prompt = _as_bytes(prompt)
        t0 = time.perf_counter()
        stats = Stats()
        if s.method in ("auto", "lm"):
            header = self._header(s, prompt)
        else:  # stored-only archives name no model and never load one
            header = Header("", bytes(16), bytes(16), prompt_check(prompt), prompt is not None,
                            s.device, s.dtype, s.threads, s.batch_size, s.context,
                            s.segment_tokens, s.escape_bits, s.block_size)
        out = header.pack()
        dst.write(out)
        total, check, n_blocks = 0, content_hasher(), 0
        for raw in _read_blocks(src, s.block_size):
            block = self._encode_block(raw, prompt, s, stats)
            packed = block.pack()
            dst.write(packed)
            stats.output_bytes += len(packed)
            total += len(raw)
            check.update(raw)
            n_blocks += 1
        end = End(total, check.digest(), n_blocks).pack()
        dst.write(end)
        stats.output_bytes += len(out) + len(end)
        stats.input_bytes = total
        stats.seconds = time.perf_counter() - t0
        return stats

    def compress(self, data: bytes, prompt: bytes | str | None = None) -> bytes:
        """Compress ``data``; the result decompresses with :meth:`decompress`.

        The measurements of the run are kept in :attr:`last_stats`.
        """
        out = io.BytesIO()
        self.last_stats = self.compress_stream(io.BytesIO(bytes(data)), out, prompt)
        return out.getvalue()

    def analyze(self, data: bytes, prompt: bytes | str | None = None) -> Stats:
        """Compress and return only the measurements (archive size, model bits)."""
        out = _Counter()
        return self.compress_stream(io.BytesIO(bytes(data)), out, prompt)

    # -- decompression ----------------------------------------------------------------
    def read_header(self, reader: Reader, prompt: bytes | None) -> Header:
        header = reader.header()
        if header.has_prompt and prompt is None:
            raise PromptMismatchError("archive was made with a prompt: pass the same --prompt")
        if not header.has_prompt and prompt is not None:
            raise PromptMismatchError("archive was made without a prompt, but one was given")
        if prompt_check(prompt) != header.prompt_check:
            raise PromptMismatchError("wrong prompt: it is not the one this archive was made with")
        return header

    def _decode_lm(self, block: Block, header: Header, prompt: bytes | None) -> bytes:
        model, tok = self._model_for(header)
        if header.device == "cuda" and not torch.cuda.is_available():
            raise EnvironmentMismatchError(
                "archive was coded on a CUDA GPU and can only be decoded on one")
        s = Settings(header.device, header.dtype, header.threads, header.batch_size,
                     header.segment_tokens, header.context, header.block_size, header.escape_bits)
        if any(e.n_tokens == 0 for e in block.segments):
            raise CorruptArchiveError("LM block has an empty segment")
        # Every token costs at least MIN_TOKEN_BITS (the stage-1 *other* symbol
        # keeps a floor of mass), so a payload bounds its token count; a forged
        # count cannot make the model run for hours.
        for i, e in enumerate(block.segments):
            if e.n_tokens * MIN_TOKEN_BITS > 8 * e.payload_len + 64:
                raise CorruptArchiveError(f"LM segment {i} declares {e.n_tokens} tokens, more than its "
                                          f"{e.payload_len}-byte payload can hold")
        engine = self._engine(model, s.device, s.dtype)
        lengths = [e.n_tokens for e in block.segments]
        decoders = [SegmentDecoder(p) for p in block.payloads]
        symbols = [np.zeros(n, dtype=np.int64) for n in lengths]
        vocab = tok.vocab_size

        def step(t: int, tables: StepTables, segs: list[int]) -> np.ndarray:
            out = np.empty(len(segs), dtype=np.int64)
            for k, g in enumerate(segs):
                sym = decoders[g].decode_token(tables, g % s.batch_size)
                symbols[g][t] = sym
                out[k] = sym if sym < vocab else tok.placeholder
            return out

        with torch_threads(s.threads), torch.inference_mode():
            self._run(engine, self._prefix(tok, prompt, s.context), lengths, s, step, block.raw_len)
        try:
            return b"".join(tok.decode(x) for x in symbols)
        except ValueError as exc:
            raise CorruptArchiveError(f"decoded an impossible symbol ({exc})") from exc

    def _decode_block(self, block: Block, header: Header, prompt: bytes | None) -> bytes:
        if block.method == Method.RAW:
            raw = block.payloads[0]
        elif block.method == Method.ZSTD:
            try:
                raw = zstandard.ZstdDecompressor().decompress(
                    block.payloads[0], max_output_size=block.raw_len)
            except zstandard.ZstdError as exc:
                raise CorruptArchiveError(f"zstd block is corrupted ({exc})") from exc
        else:
            raw = self._decode_lm(block, header, prompt)
        if len(raw) != block.raw_len or digest(raw) != block.check:
            hint = (" -- the model computed different numbers than the encoder's "
                    "(another CPU type, torch version or device?)") if block.method == Method.LM else ""
            raise ChecksumError(f"decoded data does not match the original's checksum{hint}")
        if block.method != Method.LM:
            self._tick(len(raw))
        return raw

    def decompress_stream(self, src: BinaryIO, dst: BinaryIO, prompt: bytes | str | None = None,
                          size: int | None = None) -> int:
        """Decompress ``src`` into ``dst``; return the number of bytes written.

        ``size`` is the archive's length when known: declared lengths are
        checked against it before anything is read or allocated.
        """
        prompt = _as_bytes(prompt)
        reader = Reader(src, size)
        header = self.read_header(reader, prompt)
        total, check, n_blocks = 0, content_hasher(), 0
        try:
            while True:
                rec = reader.next(header)
                if isinstance(rec, End):
                    break
                raw = self._decode_block(rec, header, prompt)
                dst.write(raw)
                total += len(raw)
                check.update(raw)
                n_blocks += 1
        except LMCodecError:
            raise
        except (ValueError, OverflowError, MemoryError, RuntimeError, IndexError, KeyError, TypeError,
                struct.error, zlib.error, zstandard.ZstdError) as exc:
            first = (str(exc).splitlines() or [""])[0][:200]
            raise CorruptArchiveError(f"archive could not be decoded ({type(exc).__name__}: {first})") from exc
        if (rec.total_len, rec.check, rec.n_blocks) != (total, check.digest(), n_blocks):
            raise ChecksumError("archive content does not match its end record (blocks missing, "
                                "reordered or spliced)")
        if not reader.at_eof():
            raise CorruptArchiveError("trailing data after the end of the archive")
        return total

    def decompress(self, blob: bytes, prompt: bytes | str | None = None) -> bytes:
        """The original bytes of an archive made by :meth:`compress`."""
        out = io.BytesIO()
        self.decompress_stream(io.BytesIO(blob), out, prompt, size=len(blob))
        return out.getvalue()


class _Counter(io.RawIOBase):
    """A sink that only counts bytes (for :meth:`Codec.analyze`)."""

    def __init__(self) -> None:
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.n += len(b)
        return len(b)
