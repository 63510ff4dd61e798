"""The :class:`Codec`: bytes -> tokens -> segments -> model -> coder -> archive, and back.

One object owns a loaded model (loading costs seconds, so keep the object for
many calls).  Compression settings live on the object; decompression takes the
coding layout (context, segment size, lanes) from the archive.  The engine is
exact (docs/ENGINE.md), so nothing about the machine is recorded: the encoder
scores each segment in one parallel pass, the decoder steps through them with
whatever device, threads and batch size suit it, and both get the same bits.
"""

from __future__ import annotations

import hashlib
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
from .coder import StreamDecoder, StreamEncoder
from .container import (DEFAULT_BLOCK_SIZE, DEFAULT_LANES, LEVELS, MAX_CONTEXT, MAX_LANES, MIN_CONTEXT,
                        MODEL_CHECK_BYTES, Block, End, Header, Method, Reader, content_hasher,
                        digest, prompt_check, segment_layout, stream_groups)
from .engine import Engine, kv_bytes, pick_device, torch_threads
from .errors import (
    ChecksumError,
    CorruptArchiveError,
    LMCodecError,
    ModelMismatchError,
    PromptMismatchError,
    ResourceLimitError,
    UsageError,
)
from .frequencies import MIN_TOKEN_BITS, PRECISION, CodingTables
from .mixing import MixerConfig, StreamMixer
from .quantize import IntModel, load_int_model
from .runner import Lockstep, Prefix, SegmentRows, prefill, score_chunks, score_segment
from .tokens import ByteTokenizer

#: The levels' settings are part of the format (container.LEVELS: a header stores
#: only the level). Levels 1-7 cut a block into segments decoded side by side (each
#: a cold start); 8 and 9 make a block one segment, past the model's trained
#: positions (the prefix moves along, runner.sink_base), and decode it one token at
#: a time.
DEFAULT_LEVEL = 6
#: Rows the decoder advances together (several streams at once); its own choice.
DECODE_ROWS = {"cpu": 64, "cuda": 1024}
#: The decoder gathers consecutive LM blocks until their segments fill its rows or
#: their bytes reach this (what it holds before writing; levels 8 and 9: a block is
#: one segment, so a big file still decodes many rows at a time).
GATHER_BYTES = 256 << 20
ZSTD_LEVEL = 19
#: Above this many symbols per byte the data is not text the model can help
#: with (text is ~0.27); skip the slow LM pass and store it with zstd or raw.
BINARY_SYMBOLS_PER_BYTE = 0.6
#: Segments of up to this many rows are scored in one go before coding (9.5 MB of
#: rows for 8,192); longer ones chunk by chunk as the coder reaches them.
EAGER_ROWS = 1 << 16
#: Rows (steps x lanes) of a stream whose LM gaps the encoder computes at once: one
#: head GEMM per chunk, and a bound on the [rows, alphabet] int64 tensor
#: (512 x 49,408 x 8 bytes = 202 MB): 8 steps of 64 lanes, 512 steps of one.
STEP_ROWS = 512

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
    """Compression parameters.

    A ``level`` (1..9, default :data:`DEFAULT_LEVEL`) sets the segment length,
    context and online models; any of them given explicitly overrides it (the
    archive then records level 0, "custom").  The coding layout (level,
    context, segment tokens, lanes, mixer, block size) is recorded in the
    archive; device, threads and decode rows are this machine's business only
    (results do not depend on them).
    """

    device: str = "auto"
    threads: int | None = None
    segment_tokens: int | None = None
    context: int | None = None
    lanes: int = DEFAULT_LANES
    block_size: int = DEFAULT_BLOCK_SIZE
    method: str = "auto"  # auto | lm | zstd | raw
    decode_rows: int | None = None
    mixer: int | None = None     # online models mixed with the LM (lmcodec.mixing.MixerConfig mask)
    level: int | None = None

    def resolved(self) -> "Settings":
        """Every field filled in and checked; ``level`` is 0 when an explicit field overrides it."""
        level = DEFAULT_LEVEL if self.level is None else self.level
        if level not in LEVELS:
            raise UsageError(f"level must be 1..{max(LEVELS)}, not {level}")
        base = LEVELS[level]
        seg = base.segment_tokens if self.segment_tokens is None else self.segment_tokens
        context = base.context if self.context is None else self.context
        mixer = base.mixer if self.mixer is None else self.mixer
        if (seg, context, mixer) != (base.segment_tokens, base.context, base.mixer):
            level = 0
        device = pick_device(self.device)
        threads = self.threads or max(1, min(torch.get_num_threads(), 8))
        if self.method not in ("auto", "lm", "zstd", "raw"):
            raise UsageError(f"method must be auto, lm, zstd or raw, not {self.method!r}")
        if not 1 <= threads <= 256:
            raise UsageError("threads must be 1..256")
        if not MIN_CONTEXT <= context <= MAX_CONTEXT or not 1 <= seg <= 1 << 30:
            raise UsageError(f"context must be {MIN_CONTEXT}..{MAX_CONTEXT} tokens and segment tokens >= 1")
        if not 1 <= self.lanes <= MAX_LANES:
            raise UsageError(f"lanes must be 1..{MAX_LANES}")
        if not 4096 <= self.block_size <= 64 << 20:
            raise UsageError("block size must be 4 KiB..64 MiB")
        try:
            MixerConfig(mixer)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        rows = self.decode_rows or DECODE_ROWS[device]
        return Settings(device, threads, seg, context, self.lanes, self.block_size, self.method, max(1, rows),
                        mixer, level)


@dataclass
class Stats:
    """What a compression run measured.

    ``model_bits`` is the exact code length of the coded symbols under the
    engine's integer frequencies (-log2 of stage 1 times stage 2): the size
    the range coder approaches, up to its few words per stream.
    """

    input_bytes: int = 0
    output_bytes: int = 0
    tokens: int = 0
    lm_bytes: int = 0          # input bytes coded by the model (not stored by fallback)
    lm_payload_bytes: int = 0  # range-coder payload bytes of those blocks
    model_bits: float = 0.0    # sum of -log2 (coding probability) over the coded symbols
    escapes: int = 0
    seconds: float = 0.0
    methods: list[str] = field(default_factory=list)

    @property
    def bpb(self) -> float:
        """Archive bits per input byte, every byte of the archive counted."""
        return 8 * self.output_bytes / self.input_bytes if self.input_bytes else 0.0

    @property
    def model_bpb(self) -> float:
        """The model's code length in bits per byte over the LM-coded bytes."""
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
        self._models: dict[str, tuple[IntModel, ByteTokenizer, str]] = {}
        self._engines: dict[tuple, Engine] = {}
        self._prefixes: dict[tuple, list[int]] = {}
        #: Set to a dict to keep segments' hidden rows between calls (benchmarks).
        self.score_memo: dict | None = None

    def _tick(self, nbytes: int) -> None:
        if self.progress is not None and nbytes:
            self.progress(nbytes)

    def _start_block(self, nbytes: int, ntokens: int) -> None:
        """Progress inside a block is reported in input bytes, spread evenly over its tokens."""
        self._progress_state = [nbytes, max(1, ntokens), 0, 0]

    def _tick_tokens(self, n: int) -> None:
        nbytes, ntokens, done, reported = self._progress_state
        done += n
        now = nbytes * min(done, ntokens) // ntokens
        self._tick(now - reported)
        self._progress_state = [nbytes, ntokens, done, now]

    # -- model plumbing ---------------------------------------------------------------
    def _load(self, spec: str | os.PathLike | None) -> tuple[IntModel, ByteTokenizer, str]:
        """(integer model, tokenizer, display name) of a model argument, loaded once."""
        key = str(spec) if spec is not None else models.DEFAULT_MODEL
        if key not in self._models:
            m = models.load(spec)
            tok = ByteTokenizer(m.tokenizer, m.arch.vocab_size)
            self._models[key] = (load_int_model(m, tok.fingerprint), tok, m.name)
        return self._models[key]

    def _engine(self, model: IntModel, device: str) -> Engine:
        key = (model.fingerprint, device)
        if key not in self._engines:
            self._engines[key] = Engine(model, device)
        return self._engines[key]

    def _model_for(self, header: Header) -> tuple[IntModel, ByteTokenizer]:
        spec = self._model_arg
        if spec is None:
            if header.model_name not in models.REGISTRY:
                raise ModelMismatchError(
                    f"archive was made with model {header.model_name!r} "
                    f"(fingerprint {header.model_fingerprint.hex()[:16]}), which is not registered; "
                    "pass it with --model PATH")
            spec = header.model_name
        model, tok, name = self._load(spec)
        stored = header.model_fingerprint   # v4: its first 8 bytes; v3: all 16
        if model.fingerprint[:len(stored)] != stored:
            tfp = header.tokenizer_fingerprint  # v3 only: names a tokenizer mismatch
            if tfp and tok.fingerprint[:len(tfp)] != tfp:
                raise ModelMismatchError(
                    f"wrong model: archive needs {header.model_name!r} (tokenizer "
                    f"{tfp.hex()[:16]}), {name!r} has tokenizer {tok.fingerprint.hex()[:16]}")
            raise ModelMismatchError(
                f"wrong model: archive needs {header.model_name!r} "
                f"(fingerprint {stored.hex()[:16]}), "
                f"got {name!r} (fingerprint {model.fingerprint.hex()[:16]})")
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

    # -- segment layout ---------------------------------------------------------------
    layout = staticmethod(segment_layout)

    def _check_memory(self, model: IntModel, rows: int, slots: int) -> None:
        need = kv_bytes(model.arch, rows, slots)
        if need > max_kv_bytes():
            raise ResourceLimitError(
                f"coding needs {need / 2**30:.1f} GiB of KV cache ({rows} rows x {slots} slots), over the "
                f"{max_kv_bytes() / 2**30:.1f} GiB limit (LMCODEC_MAX_KV_GIB)")

    # -- compression ------------------------------------------------------------------
    def _header(self, s: Settings, prompt: bytes | None) -> Header:
        model, tok, name = self._load(self._model_arg)
        return Header(name, model.fingerprint[:MODEL_CHECK_BYTES], b"", prompt_check(prompt), prompt is not None,
                      s.context, s.segment_tokens, s.lanes, s.block_size, s.level, s.mixer)

    def _lm_block(self, raw: bytes, symbols: np.ndarray, prompt: bytes | None,
                  s: Settings) -> tuple[Block, float]:
        """Code ``symbols`` with the model; return the block and its exact code length in bits.

        Each stream carries ``lanes`` segments.  Its segments are scored in one
        parallel pass each (the encoder knows their tokens), then coded in the
        decoder's order: step by step, every live segment of the stream at
        once (:meth:`_encode_stream`).
        """
        model, tok, _ = self._load(self._model_arg)
        engine = self._engine(model, s.device)
        lengths = self.layout(len(symbols), s.segment_tokens)
        offsets = np.cumsum([0] + lengths)
        inputs = tok.model_inputs(symbols)
        payloads, bits = [], 0.0
        self._start_block(len(raw), len(symbols))
        with torch_threads(s.threads), torch.inference_mode():
            prefix = self._prefix(tok, prompt, s.context)
            pre = prefill(engine, prefix)
            for group in stream_groups(len(lengths), s.lanes):
                segs = [slice(offsets[g], offsets[g + 1]) for g in group]
                hidden = [self._score(engine, prefix, pre, inputs[seg][:-1], s.context) for seg in segs]
                payload, b = self._encode_stream(engine, hidden, [symbols[seg] for seg in segs],
                                                 tok.alphabet_size, MixerConfig(s.mixer))
                payloads.append(payload)
                bits += b
        return Block.build(Method.LM, raw, payloads, lengths), bits

    def _score(self, engine: Engine, prefix: list[int], pre: Prefix, inputs: np.ndarray,
               context: int) -> SegmentRows:
        """A segment's hidden rows (the parallel pass), memoised when :attr:`score_memo` is a dict.

        Segments of up to :data:`EAGER_ROWS` are scored at once; longer ones chunk by
        chunk as the coder reaches them (their rows would not fit, their caches do).
        The memo lets a benchmark code the same text under several online-model
        settings with one LM pass (the rows do not depend on the mixer).
        """
        if self.score_memo is None:
            if len(inputs) + 1 > EAGER_ROWS:
                return SegmentRows(score_chunks(engine, pre, inputs, context))
            return SegmentRows(iter([score_segment(engine, pre, inputs, context)]))
        key = (engine.fingerprint, tuple(prefix), context,
               hashlib.blake2b(np.ascontiguousarray(inputs).tobytes(), digest_size=16).digest())
        if key not in self.score_memo:
            self.score_memo[key] = score_segment(engine, pre, inputs, context)
        return SegmentRows(iter([self.score_memo[key]]))

    def _encode_stream(self, engine: Engine, hidden: list[SegmentRows],
                       symbols: list[np.ndarray], alphabet: int, mixer: MixerConfig) -> tuple[bytes, float]:
        """One stream's payload from its segments' hidden rows, in step-major order.

        At step t the stage-1 symbols of every live segment, then their stage-2
        symbols -- the order the decoder meets them (:meth:`_decode_streams`).
        Returns the payload and the exact code length in bits.
        """
        enc = StreamEncoder()
        mix = StreamMixer(mixer, len(symbols), alphabet)
        lengths = [len(x) for x in symbols]
        bits = 0.0
        steps = max(1, STEP_ROWS // len(symbols))
        for t0 in range(0, max(lengths), steps):
            t1 = min(t0 + steps, max(lengths))
            # The LM's token gaps of a chunk of steps at once (one head GEMM), then step by step.
            part = [hidden[i].take(t0, min(t1, n)) if t0 < n else None for i, n in enumerate(lengths)]
            rows = [(i, t - t0) for t in range(t0, t1) for i in range(len(symbols)) if t < lengths[i]]
            h = torch.stack([part[i][0][t] for i, t in rows])
            e = torch.stack([part[i][1][t] for i, t in rows])
            gaps = engine.gaps(h, e)
            at = 0
            for t in range(t0, t1):
                live = [i for i in range(len(symbols)) if t < lengths[i]]
                sym = np.array([symbols[i][t] for i in live], dtype=np.int64)
                tables = CodingTables(mix.mix(live, gaps[at:at + len(live)]), alphabet)
                at += len(live)
                b, j = tables.split(sym)
                rows1, rows2 = tables.stage1(), tables.stage2(b)
                enc.encode(b, rows1)
                enc.encode(j, rows2)
                idx = np.arange(len(live))
                bits += float(2 * PRECISION * len(live) - np.log2(rows1[idx, b].astype(np.float64)).sum()
                              - np.log2(rows2[idx, j].astype(np.float64)).sum())
                mix.update(sym.tolist())
                self._tick_tokens(len(live))
        return enc.finish(), bits

    def _encode_block(self, raw: bytes, prompt: bytes | None, s: Settings, stats: Stats) -> Block:
        """The smallest of the allowed methods for this block (``auto``: all three)."""
        candidates = []
        if s.method in ("auto", "raw"):
            candidates.append(Block.build(Method.RAW, raw, [raw], []))
        if s.method in ("auto", "zstd"):
            packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
            candidates.append(Block.build(Method.ZSTD, raw, [packed], []))
        lm = None
        if s.method in ("auto", "lm"):
            _, tok, _ = self._load(self._model_arg)
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
            header = Header("", b"", b"", prompt_check(prompt), prompt is not None,
                            s.context, s.segment_tokens, s.lanes, s.block_size, s.level, s.mixer)
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

    def _decode_lm(self, blocks: list[Block], header: Header, prompt: bytes | None) -> list[bytes]:
        """The tokens of one or more LM blocks, decoded side by side; their bytes, unchecked.

        Blocks are independent, so consecutive blocks' streams can share lockstep
        batches: levels 8 and 9 make each block one segment, and without this a
        many-block file would decode one row at a time.
        """
        model, tok = self._model_for(header)
        s = self.settings.resolved()
        lengths: list[int] = []
        groups: list[range] = []
        payloads: list[bytes] = []
        for block in blocks:
            first = len(lengths)
            mine = stream_groups(len(block.tokens), header.lanes)
            # Every token costs at least MIN_TOKEN_BITS (stage 1 keeps a floor of mass
            # off the top bucket), so a stream's payload bounds its token count; a
            # forged count cannot make the model run for hours.
            for i, (g, e) in enumerate(zip(mine, block.streams)):
                if sum(block.tokens[j] for j in g) * MIN_TOKEN_BITS > 8 * e.payload_len + 64:
                    raise CorruptArchiveError(f"LM stream {i} declares more tokens than its "
                                              f"{e.payload_len}-byte payload can hold")
            lengths += block.tokens
            groups += [range(first + g.start, first + g.stop) for g in mine]
            payloads += block.payloads
        engine = self._engine(model, s.device)
        symbols = [np.zeros(n, dtype=np.int64) for n in lengths]
        self._start_block(sum(b.raw_len for b in blocks), sum(lengths))
        # The decoder's own choice: as many whole streams per lockstep batch as fit its row budget.
        batches, cur = [], []
        for i, g in enumerate(groups):
            if cur and sum(len(groups[j]) for j in cur) + len(g) > max(s.decode_rows, header.lanes):
                batches.append(cur)
                cur = []
            cur.append(i)
        batches.append(cur)
        with torch_threads(s.threads), torch.inference_mode():
            pre = prefill(engine, self._prefix(tok, prompt, header.context))
            for batch in batches:
                self._decode_streams(engine, pre, [groups[i] for i in batch],
                                     [StreamDecoder(payloads[i]) for i in batch], lengths, symbols,
                                     header.context, tok, MixerConfig(header.mixer))
        out, at = [], 0
        for block in blocks:
            try:
                out.append(b"".join(tok.decode(x) for x in symbols[at:at + len(block.tokens)]))
            except ValueError as exc:
                raise CorruptArchiveError(f"decoded an impossible symbol ({exc})") from exc
            at += len(block.tokens)
        return out

    def _decode_streams(self, engine: Engine, pre: Prefix, groups: list[range], decoders: list[StreamDecoder],
                        lengths: list[int], symbols: list[np.ndarray], context: int, tok: ByteTokenizer,
                        mixer: MixerConfig) -> None:
        """Decode several streams in one lockstep batch (rows = their segments)."""
        segs = [g for group in groups for g in group]
        longest = max(lengths[g] for g in segs)
        self._check_memory(engine.model, len(segs), min(context, pre.length + longest))
        run = Lockstep(engine, pre, len(segs), context, longest)
        feed = np.full(len(segs), tok.placeholder, dtype=np.int64)
        alphabet = tok.alphabet_size
        mixers = [StreamMixer(mixer, len(group), alphabet) for group in groups]
        first = np.cumsum([0] + [len(group) for group in groups])   # row of each stream's first segment
        for t in range(longest):
            # Per stream: its live lanes (segment order) and their rows in the batch.
            live = [[i for i, g in enumerate(group) if t < lengths[g]] for group in groups]
            rows = [first[k] + i for k, lanes in enumerate(live) for i in lanes]
            gaps = engine.gaps(run.h[rows], run.e[rows])
            mixed, at = [], 0
            for m, lanes in zip(mixers, live):
                mixed.append(m.mix(lanes, gaps[at:at + len(lanes)]))
                at += len(lanes)
            tables = CodingTables(torch.cat(mixed), alphabet)
            stage1 = tables.stage1()
            spans = np.cumsum([0] + [len(lanes) for lanes in live])
            buckets = np.zeros(len(rows), dtype=np.int64)
            for k, dec in enumerate(decoders):
                buckets[spans[k]:spans[k + 1]] = dec.decode(stage1[spans[k]:spans[k + 1]])
            stage2 = tables.stage2(buckets)
            for k, (group, dec, lanes) in enumerate(zip(groups, decoders, live)):
                sym = buckets[spans[k]:spans[k + 1]] * tables.width + dec.decode(stage2[spans[k]:spans[k + 1]])
                if (sym >= alphabet).any():
                    raise CorruptArchiveError("decoded a symbol outside the alphabet")
                for i, x in zip(lanes, sym.tolist()):
                    symbols[group[i]][t] = x
                    feed[first[k] + i] = x if x < tok.vocab_size else tok.placeholder
                mixers[k].update(sym.tolist())
            self._tick_tokens(len(rows))
            if t + 1 < longest:
                run.advance(feed)

    def _decode_blocks(self, blocks: list[Block], header: Header, prompt: bytes | None) -> list[bytes]:
        """The checked bytes of consecutive blocks (LM blocks decoded together, see _decode_lm)."""
        if len(blocks) == 1 and blocks[0].method != Method.LM:
            raws = [self._unpack(blocks[0])]
        else:
            raws = self._decode_lm(blocks, header, prompt)
        for block, raw in zip(blocks, raws):
            if len(raw) != block.raw_len or digest(raw) != block.check:
                hint = (" -- the engine computed different numbers than the encoder's; run "
                        "'lmcodec selftest' on both machines") if block.method == Method.LM else ""
                raise ChecksumError(f"decoded data does not match the original's checksum{hint}")
            if block.method != Method.LM:
                self._tick(len(raw))
        return raws

    @staticmethod
    def _unpack(block: Block) -> bytes:
        if block.method == Method.RAW:
            return block.payloads[0]
        try:
            return zstandard.ZstdDecompressor().decompress(block.payloads[0], max_output_size=block.raw_len)
        except zstandard.ZstdError as exc:
            raise CorruptArchiveError(f"zstd block is corrupted ({exc})") from exc

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
        rows = self.settings.resolved().decode_rows
        pending: list[Block] = []     # consecutive LM blocks waiting to be decoded together

        def flush() -> None:
            nonlocal total, n_blocks
            if not pending:
                return
            for raw in self._decode_blocks(pending, header, prompt):
                dst.write(raw)
                total += len(raw)
                check.update(raw)
                n_blocks += 1
            pending.clear()

        try:
            while True:
                rec = reader.next(header)
                if isinstance(rec, End):
                    flush()
                    break
                if rec.method != Method.LM:
                    flush()
                    pending.append(rec)
                    flush()
                    continue
                pending.append(rec)
                if (sum(len(b.tokens) for b in pending) >= rows
                        or sum(b.raw_len for b in pending) >= GATHER_BYTES):
                    flush()
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
