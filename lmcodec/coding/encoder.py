"""Raw bytes of one block -> a :class:`~lmcodec.format.container.Block`: the encoder's half of the codec.

Each stream carries ``lanes`` segments.  Its segments are scored in one
parallel pass each (the encoder knows their tokens), then coded in the
decoder's order: step by step, every live segment of the stream at once.
Blocks are independent, so any worker may encode any block
(:mod:`lmcodec.executors`) and the archive is the same.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from ..engine.cpu.platform import release_free_memory
from ..engine.engine import Engine, torch_threads
from ..format.container import Block, Method, segment_layout, stream_groups
from ..progress import Progress
from .coder import StreamEncoder
from .frequencies import PRECISION, CodingTables
from .mixedpass import MixedStream
from .mixing import MixerConfig, StreamMixer
from .modelcache import ModelCache
from .passes import EncoderBuffer, OutputRows, encode_plain
from .runner import (
    Prefix,
    SegmentRows,
    batch_rows,
    score_batch,
    score_chunk,
    score_segment,
)
from .settings import Settings

ZSTD_LEVEL = 19
#: Above this many symbols per byte the data is not text the model can help
#: with (text is ~0.27); skip the slow LM pass and store it with zstd or raw.
BINARY_SYMBOLS_PER_BYTE = 0.6
#: Segments of up to this many rows are scored in one go before coding (9.5 MB of
#: rows for 8,192); longer ones chunk by chunk as the coder reaches them.
EAGER_ROWS = 1 << 16
#: Positions one parallel pass may hold (segments side by side x chunk length), in chunks
#: (runner.score_chunk) by device.  On a GPU a stream's segments are scored together to
#: fill it (a 2,048-row GEMM of a 576-wide model is launch-bound there); on a CPU a chunk
#: is already a full GEMM, so only short segments are batched, and each batched segment's
#: cache costs memory.  Results do not depend on it (runner.score_batch).
SCORE_CHUNKS = {"cpu": 1, "cuda": 32}
#: Rows (steps x lanes) of a stream whose LM gaps the encoder computes at once, by device:
#: one head GEMM per chunk, and a bound on the [rows, alphabet] int64 tensors the head makes
#: (its int32 product, the logits and the gaps: 64 rows of SmolLM2's 49,408 symbols are
#: 25 MB each on a CPU, whose GEMMs are already full at 64 rows; a GPU wants more rows a launch).
STEP_ROWS = {"cpu": 64, "cuda": 512}


@dataclass
class EncodedBlock:
    """A block as the encoder made it, with what it measured (added into :class:`~lmcodec.coding.settings.Stats`)."""

    block: Block
    lm: bool = False           # coded by the model (its bits count in the stats)
    model_bits: float = 0.0    # exact code length of its symbols
    escapes: int = 0
    model_seconds: float = 0.0  # in the model: parallel passes and output heads
    passes: int = 0             # parallel passes


class BlockEncoder:
    """Encodes blocks with one model, settings and prompt (``settings`` resolved): chooses each
    block's method, and for an LM block runs the parallel pass (:class:`SegmentScorer`) and
    codes its streams (:func:`encode_stream`).  ``score_memo``: see :class:`SegmentScorer`."""

    def __init__(self, models: ModelCache, settings: Settings, prompt: bytes | None,
                 score_memo: dict | None = None):
        self.models = models
        self.settings = settings
        self.prompt = prompt
        self.score_memo = score_memo

    def encode(self, raw: bytes, progress: Progress | None = None) -> EncodedBlock:
        """The smallest of the allowed methods for this block (``auto``: all three)."""
        s, progress = self.settings, progress or Progress()
        candidates = []
        if s.method in ("auto", "raw"):
            candidates.append(EncodedBlock(Block.build(Method.RAW, raw, [raw], [])))
        if s.method in ("auto", "zstd"):
            packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
            candidates.append(EncodedBlock(Block.build(Method.ZSTD, raw, [packed], [])))
        if s.method in ("auto", "lm"):
            _, tok, _ = self.models.coding_model()
            symbols = tok.encode(raw)
            if s.method == "lm" or len(symbols) <= BINARY_SYMBOLS_PER_BYTE * len(raw):
                clock = ModelClock()
                block, bits = self._lm_block(raw, symbols, progress, clock)
                candidates.append(EncodedBlock(block, True, bits, int((symbols >= tok.vocab_size).sum()),
                                               clock.seconds, clock.passes))
        if not any(c.lm for c in candidates):
            progress.bytes(len(raw))
        return min(candidates, key=lambda c: len(c.block.pack()))

    def _lm_block(self, raw: bytes, symbols: np.ndarray, progress: Progress,
                  clock: ModelClock) -> tuple[Block, float]:
        """Code ``symbols`` with the model; return the block and its exact code length in bits
        (the time in the model and its passes counted on ``clock``)."""
        s = self.settings
        model, tok, _ = self.models.coding_model()
        engine = self.models.engine(model, s.device)
        lengths = segment_layout(len(symbols), s.segment_tokens)
        offsets = np.cumsum([0] + lengths)
        inputs = tok.model_inputs(symbols)
        payloads, bits = [], 0.0
        progress.start_block(len(raw), len(symbols))
        with torch_threads(s.threads), torch.inference_mode():
            prefix = self.models.prefix(tok, self.prompt, s.context)
            with clock.timing():
                pre = self.models.prefill(engine, prefix)
            streams = [[slice(offsets[g], offsets[g + 1]) for g in group]
                       for group in stream_groups(len(lengths), s.lanes)]
            scorer = SegmentScorer(engine, prefix, pre, s.context, self.score_memo)

            def score(segs: list[slice]) -> list[SegmentRows]:
                return scorer([inputs[seg][:-1] for seg in segs])

            ahead = PassAhead(engine.device)
            pending = ahead.start(score, streams[0]) if streams else None
            for k, segs in enumerate(streams):
                with clock.timing():
                    hidden = pending()
                if k + 1 < len(streams):       # the next stream's pass runs while this one is coded (CUDA)
                    pending = ahead.start(score, streams[k + 1])
                payload, b = encode_stream(engine, hidden, [symbols[seg] for seg in segs],
                                           tok.alphabet_size, MixerConfig(s.mixer), progress, clock)
                payloads.append(payload)
                bits += b
            clock.passes += scorer.passes
        return Block.build(Method.LM, raw, payloads, lengths), bits


class ModelClock:
    """The time a block spends in the model (its parallel passes, prefill and output heads) and
    its parallel passes: ``-v``'s split of a run into model and coding (Stats.model_seconds)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.passes = 0

    @contextmanager
    def timing(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0


class SegmentScorer:
    """Segments' model inputs -> their hidden rows, every segment after the same prefill ``pre``
    of ``prefix`` with ``context`` tokens of context.  ``memo``: None, or a dict that keeps the
    rows between calls, keyed by model, prefix, context and the segment's tokens."""

    def __init__(self, engine: Engine, prefix: list[int], pre: Prefix, context: int, memo: dict | None = None):
        self.engine, self.prefix, self.pre, self.context, self.memo = engine, prefix, pre, context, memo
        self.passes = 0     # parallel passes run (chunks of runner.score_chunk positions, side by side)

    def __call__(self, inputs: list[np.ndarray]) -> list[SegmentRows]:
        """A stream's segments' hidden rows (the parallel pass), memoised when ``memo`` is a dict.

        Segments are scored side by side, up to :data:`SCORE_CHUNKS` chunks a
        pass.  Segments of up to :data:`EAGER_ROWS` are scored at once (their
        caches freed); longer ones chunk by chunk as the coder reaches them (their
        rows would not fit, their caches do).  The memo lets a benchmark code the
        same text under several online-model settings with one LM pass (the rows
        do not depend on the mixer).
        """
        engine, prefix, pre, context, memo = self.engine, self.prefix, self.pre, self.context, self.memo
        if memo is not None:
            out = []
            for x in inputs:
                key = (engine.fingerprint, tuple(prefix), context,
                       hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).digest())
                if key not in memo:
                    memo[key] = score_segment(engine, pre, x, context)
                    self.passes += -(-len(x) // score_chunk(engine.device))
                out.append(SegmentRows(iter([memo[key]])))
            return out
        longest = max(len(x) for x in inputs) + 1
        chunk = score_chunk(engine.device)
        per_pass = max(1, SCORE_CHUNKS.get(engine.device.type, 1) * chunk // min(chunk, longest))
        out = []
        for b0 in range(0, len(inputs), per_pass):
            batch = inputs[b0:b0 + per_pass]
            if longest > EAGER_ROWS:
                out += batch_rows(score_batch(engine, pre, batch, context), len(batch))
                self.passes += -(-longest // chunk)
                continue
            chunks = list(score_batch(engine, pre, batch, context))
            self.passes += len(chunks)
            for i in range(len(batch)):
                h, e = (torch.cat([c[i][k] for c in chunks]) for k in (0, 1))
                out.append(SegmentRows(iter([(h, e)])))
        return out


def encode_stream(engine: Engine, hidden: list[SegmentRows], symbols: list[np.ndarray], alphabet: int,
                  mixer: MixerConfig, progress: Progress, clock: ModelClock | None = None) -> tuple[bytes, float]:
    """One stream's payload from its segments' hidden rows, in step-major order.

    At step t the stage-1 symbols of every live segment, then their stage-2
    symbols -- the order the decoder meets them (:mod:`lmcodec.coding.decoder`).
    Returns the payload and the exact code length in bits; the model's share of the time
    (long segments' later chunks, the output head) is counted on ``clock``.
    """
    clock = clock or ModelClock()
    lengths = [len(x) for x in symbols]
    steps = max(1, STEP_ROWS.get(engine.device.type, STEP_ROWS["cpu"]) // len(symbols))
    compiled = engine.device.type == "cpu"     # the coding layer as compiled code (coding.passes, mixedpass)
    coder = EncoderBuffer() if compiled else StreamEncoder()
    mix = None if compiled else StreamMixer(mixer, len(symbols), alphabet)
    online = MixedStream(mixer, lengths, alphabet) if compiled and mixer.mask else None
    outputs = OutputRows(alphabet) if compiled and online is None else None
    bits = 0.0
    for t0 in range(0, max(lengths), steps):
        t1 = min(t0 + steps, max(lengths))
        # The LM's token gaps of a chunk of steps at once (one head GEMM), then step by step.
        with clock.timing():
            part = [hidden[i].take(t0, min(t1, n)) if t0 < n else None for i, n in enumerate(lengths)]
            rows = [(i, t - t0) for t in range(t0, t1) for i in range(len(symbols)) if t < lengths[i]]
            h = torch.stack([part[i][0][t] for i, t in rows])
            e = torch.stack([part[i][1][t] for i, t in rows])
            gaps = engine.gaps(h, e)
            if outputs is not None:
                p, mass, _ = outputs(gaps.numpy())     # the output step, for every row of the chunk
        live = [[i for i, n in enumerate(lengths) if t < n] for t in range(t0, t1)]
        if compiled:
            spans = np.cumsum([0] + [len(lanes) for lanes in live])
            sym = np.array([symbols[i][t0 + t] for i, t in rows], dtype=np.int64)
            if online is not None:
                bits += online.encode(gaps.numpy(), spans, np.array([i for i, _ in rows], dtype=np.int64), sym,
                                      coder)
            else:
                coder.room(2 * len(sym))
                coder.n, b = encode_plain(p, mass, spans, sym, coder.state, 0, coder.out, coder.n, outputs.width)
                bits += b
            progress.tokens(len(sym))
            del gaps
            release_free_memory()       # the head's [rows, alphabet] arrays of this chunk (platform.py)
            continue
        at = 0
        for t, lanes in zip(range(t0, t1), live):
            n_live = len(lanes)
            sym = np.array([symbols[i][t] for i in lanes], dtype=np.int64)
            tables = CodingTables(mix.mix(lanes, gaps[at:at + n_live]), alphabet)
            at += n_live
            b, j = tables.split(sym)
            rows1, rows2 = tables.stage1(), tables.stage2(b)
            coder.encode(b, rows1)
            coder.encode(j, rows2)
            idx = np.arange(n_live)
            bits += float(2 * PRECISION * n_live - np.log2(rows1[idx, b].astype(np.float64)).sum()
                          - np.log2(rows2[idx, j].astype(np.float64)).sum())
            mix.update(sym.tolist())
            progress.tokens(n_live)
    return coder.finish(), bits


class PassAhead:
    """Starts the next stream's parallel pass before this stream is coded.

    On CUDA the pass is launched on a side stream, so the GPU computes it while
    the host runs this stream's coder; calling what :meth:`start` returns makes
    the coding stream wait for it (an event, not a host sync) and gives the
    rows.  Those tensors are freed only after their stream is coded, whose every
    step reads results back to the host, so the side stream never reuses memory
    the coding stream still reads.  On a CPU nothing would overlap, so the pass
    runs when its rows are asked for (one stream's rows in memory at a time, as
    before).  Long segments' lazy chunks (``EAGER_ROWS``) are computed as the
    coder pulls them, on the coding stream.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None
        if self._side is not None:
            self._side.wait_stream(torch.cuda.current_stream(device))

    def start(self, fn, arg):
        """``fn(arg)`` started; returns a call that gives its result, readable on the coding stream."""
        if self._side is None:
            return lambda: fn(arg)
        with torch.cuda.stream(self._side):
            out = fn(arg)
            done = torch.cuda.Event()
            done.record(self._side)

        def finish():
            torch.cuda.current_stream(self.device).wait_event(done)
            return out

        return finish
