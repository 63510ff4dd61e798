"""Decode LM streams with the batch kept full: the scheduler's rows through the model.

A batch of streams run in lockstep would leave idle the rows whose segments have
ended until its longest segment ends.  Instead :class:`~lmcodec.coding.schedule.Scheduler`
hands free rows to the next stream at once, and the model step runs rows at
their own positions (:class:`~lmcodec.coding.steps.RowStep`; on CUDA the captured
:class:`~lmcodec.coding.steps.GraphStep`).  All rows' gaps, mixtures and frequency
tables stay on the model's device; only each stream's stage-1 rows, then its
stage-2 rows, cross to the host for the range coder.

What a stream decodes to does not depend on which rows it gets, when it is
admitted or what shares its steps: its coder reads the same rows in the same
order (step-major, live lanes in lane order), and the engine's numbers for a
row depend only on that row (docs/ENGINE.md, "Rows at their own positions").
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch

from ..engine.engine import Engine
from ..errors import CorruptArchiveError
from .coder import StreamDecoder
from .draft import PassCost, choose_width
from .draftbank import DraftBank, PrefixTable
from .frequencies import CodingTables
from .mixedpass import MixedStream
from .mixing import MixerConfig, StreamMixer
from .passes import DecoderBank, OutputRows, decode_rows_plain, settle
from .runner import Prefix
from .schedule import Running, Scheduler
from .settings import DecodeStats
from .steps import GraphStep, RowStep
from .tokens import ByteTokenizer


def decode_streams(engine: Engine, pre: Prefix, groups: Sequence[range], payloads: Sequence[bytes],
                   lengths: Sequence[int], context: int, tok: ByteTokenizer, mixer: MixerConfig, rows: int,
                   order: Sequence[int] | None = None,
                   tick: Callable[[int], None] | None = None, halves: int = 1, guesses: int = 0,
                   stats: DecodeStats | None = None, draft: PrefixTable | None = None) -> list[np.ndarray]:
    """The symbols of every segment (``lengths[g]`` tokens each) of the streams ``groups``
    (stream k carries segments ``groups[k]`` in ``payloads[k]``), decoded in ``rows`` rows.

    ``order`` is the streams' admission order (default: as given); ``tick(n)`` is
    called with the tokens decoded at each step (progress).  ``halves=2`` deals
    the streams to two sets of rows (half the rows each) whose steps take turns,
    so that on CUDA one half's host work (coder, online models) overlaps the other
    half's model step (:class:`Overlap`); the symbols are the same.  ``guesses``: the most
    guessed tokens a row may be fed per pass (exact speculative decoding, :class:`Rows`; 0:
    one token a pass); the symbols are the same.  ``stats`` receives the passes made; ``draft``
    is what the guesses copy from before a segment (default: the prefix).
    """
    base = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.zeros(int(base[-1]), dtype=np.int64)      # every segment's symbols, segment g at base[g]
    symbols = [flat[base[g]:base[g + 1]] for g in range(len(lengths))]
    if not groups:
        return symbols
    order = list(range(len(groups))) if order is None else list(order)
    parts = split_streams(groups, lengths, order, halves if rows >= 2 * halves else 1)
    share = max(1, rows // len(parts))
    sets = [Rows(engine, pre, [groups[k] for k in part], [payloads[k] for k in part], lengths, context, tok, mixer,
                 share, (flat, base), guesses, stats, draft) for part in parts]
    if len(sets) == 1:
        one = sets[0]
        while one.code(tick):
            one.launch()
        return symbols
    with Overlap(engine.device, len(sets)) as lanes:
        active = list(range(len(sets)))
        while active:
            for k in list(active):
                with lanes.on(k):
                    if sets[k].code(tick):      # waits for this set's last step only
                        sets[k].launch()        # asynchronous on CUDA
                    else:
                        active.remove(k)
    return symbols


def split_streams(groups: Sequence[range], lengths: Sequence[int], order: Sequence[int], parts: int) -> list[list[int]]:
    """Deal the streams, in admission ``order``, to ``parts`` sets: each to the set with the
    fewest tokens so far (the first on a tie).  Deterministic; it changes no symbol."""
    if parts <= 1 or len(order) < 2:
        return [list(order)]
    out: list[list[int]] = [[] for _ in range(min(parts, len(order)))]
    load = [0] * len(out)
    for k in order:
        i = load.index(min(load))
        out[i].append(k)
        load[i] += sum(lengths[g] for g in groups[k])
    return out


class Rows:
    """Some streams in their own batch rows: a scheduler, a model step, the coders and mixers.

    :meth:`code` is the host's part of a pass (admit streams, decode the tokens of
    every live lane from the last model pass, retire finished streams, choose the
    next guesses); :meth:`launch` is the model's part (feed the decoded tokens
    and the guesses, compute the next hidden rows).  ``symbols`` (shared), a flat
    array and each segment's offset in it, receives each segment's tokens.

    With ``guesses`` > 0 (exact speculative decoding) a pass feeds a row its last
    token and up to that many guesses (:mod:`lmcodec.coding.draft`); the stream
    decodes output 0, then output j + 1 for as long as every live lane's token j
    equals the guess fed after it, each token coded, mixed and learned in order
    exactly as single steps would (the frequencies are the same bit for bit,
    :class:`~lmcodec.coding.steps.RowStep`).  A stream's lanes move together
    (the mixer's step-major order), so it moves by its shortest run of held
    guesses.  What a stream decodes to never depends on the guesses.
    """

    def __init__(self, engine: Engine, pre: Prefix, groups: Sequence[range], payloads: Sequence[bytes],
                 lengths: Sequence[int], context: int, tok: ByteTokenizer, mixer: MixerConfig, rows: int,
                 symbols: tuple[np.ndarray, np.ndarray], guesses: int = 0, stats: DecodeStats | None = None,
                 draft: PrefixTable | None = None):
        self.groups, self.payloads, self.tok, self.mixer = groups, payloads, tok, mixer
        self.flat, self.base = symbols      # segment g's symbols are flat[base[g]:base[g + 1]]
        rows = max(rows, max(len(g) for g in groups))
        self.sched = Scheduler([[lengths[g] for g in group] for group in groups], rows)
        longest = max((lengths[g] for group in groups for g in group), default=0)
        self.most = max(0, guesses)
        step = GraphStep if engine.device.type == "cuda" else RowStep    # CUDA: static shapes and graphs
        self.run = step(engine, pre, rows, context, longest, spare=self.most)
        self.feed = np.full((rows, 1 + self.most), tok.placeholder, dtype=np.int64)
        self.width = np.ones(rows, dtype=np.int64)      # outputs of each row's last pass in use: 1 + its guesses
        self.live = np.zeros(rows, dtype=bool)
        # On a CPU the coding is compiled (coding.passes): every stream's decoder is a row of one bank.
        self.compiled = engine.device.type == "cpu"
        self.bank = DecoderBank(list(payloads)) if self.compiled else None
        self.outputs = OutputRows(tok.alphabet_size) if self.compiled else None
        self.lengths = lengths
        self.coders: dict[int, StreamDecoder] = {}
        self.mixers: dict[int, StreamMixer] = {}
        self.mixed: dict[int, MixedStream] = {}
        self.rows_of: dict[int, np.ndarray] = {}     # per running stream: its lanes' rows, segments
        self.segs_of: dict[int, np.ndarray] = {}
        # Every lane's draft, in the slot of its row (one compiled call a column or pass for all of them).
        self.drafts = DraftBank(draft or PrefixTable(pre.ids), rows, max(1, longest), self.most) if self.most else None
        self.cost = PassCost()
        self.stats = stats if stats is not None else DecodeStats()
        self._pass: tuple[int, float] | None = None     # (queries, seconds) of the last pass, gaps still to add
        self._next = 1                                   # columns of the next pass (_guess chooses)

    def code(self, tick: Callable[[int], None] | None = None) -> bool:
        """Admit, decode every live lane's tokens from the last pass, retire; False once every stream is done."""
        for started in self.sched.admit():
            s = started.stream
            if self.compiled:
                self.bank.open(s)
            else:
                self.coders[s] = StreamDecoder(self.payloads[s])
            if not self.compiled:
                self.mixers[s] = StreamMixer(self.mixer, len(self.groups[s]), self.tok.alphabet_size)
            elif self.mixer.mask:
                self.mixed[s] = MixedStream(self.mixer, [self.lengths[g] for g in self.groups[s]],
                                            self.tok.alphabet_size)
            self.rows_of[s] = np.asarray(started.rows, np.int64)
            self.segs_of[s] = np.asarray(self.groups[s], np.int64)
            rows = [r for r in started.rows if r >= 0]
            if self.drafts is not None:
                self.drafts.open(np.asarray(rows, np.int64),
                                 np.asarray([n for n in started.lengths if n > 0], np.int64))
            self.run.start(rows)
            self.width[rows] = 1
        if not self.sched.running:
            return False
        t0 = time.perf_counter()
        u, where = self._gaps()
        if self.compiled:
            u = u.numpy()
        self.stats.model_seconds += time.perf_counter() - t0
        if self._pass is not None:
            queries, seconds = self._pass
            self.cost.record(queries, seconds + time.perf_counter() - t0)
            self._pass = None
        decoded = np.zeros(self.run.rows, dtype=np.int64)
        active, j = list(self.sched.running), 0
        while active:
            active = self._decode(active, j, u, where, decoded)
            j += 1
        moved = np.nonzero(decoded)[0]
        self.run.skip(moved, decoded[moved] - 1)        # the next pass's column 0 follows the last token
        self.live = decoded > 0
        self.stats.tokens += int(decoded.sum())
        if tick is not None:
            tick(int(decoded.sum()))
        self._guess()
        return not self.sched.done

    def _gaps(self) -> tuple[torch.Tensor, dict[tuple[int, int], int]]:
        """The LM's gaps of every output the live lanes may use (one head pass); where each is."""
        T, where, idx = self.run.T, {}, []
        for run in self.sched.running:
            for row in run.live_rows:
                for j in range(int(self.width[row])):
                    where[row, j] = len(idx)
                    idx.append(row * T + j)
        at = torch.as_tensor(idx, device=self.run.h.device)
        return self.run.engine.gaps(self.run.h[at], self.run.e[at]), where

    def _decode(self, streams: list[Running], j: int, u: torch.Tensor | np.ndarray, where: dict, decoded: np.ndarray
                ) -> list[Running]:
        """Decode one token of every live lane of ``streams`` from output ``j`` of its row; move
        each stream one step on; return the streams that decode output j + 1 next (every live
        lane's guess after this token held, and the stream goes on)."""
        tok = self.tok
        lanes = [r.live for r in streams]
        at = np.fromiter((where[r.rows[i], j] for r, ls in zip(streams, lanes) for i in ls), np.int64)
        spans = np.fromiter(itertools.accumulate((len(ls) for ls in lanes), initial=0), np.int64, len(lanes) + 1)
        if self.compiled and not self.mixer.mask:
            slots = np.fromiter((r.stream for r in streams), np.int64, len(streams))
            t0 = time.perf_counter()
            p, mass, _ = self.outputs(u, at)      # the output step: the model's time
            self.stats.model_seconds += time.perf_counter() - t0
            symbols = decode_rows_plain(self.bank, p, mass, spans, slots)
        elif self.compiled:
            parts = [self.mixed[r.stream].decode(u, at[spans[k]:spans[k + 1]], np.asarray(ls, np.int64),
                                                 self.bank.state, r.stream, self.bank.words)
                     for k, (r, ls) in enumerate(zip(streams, lanes))]
            symbols = np.concatenate(parts) if len(parts) > 1 else parts[0]
        else:
            symbols = self._decode_tensors(streams, lanes, u[torch.as_tensor(at, device=u.device)], spans)
        going = []
        for k, (r, ls) in enumerate(zip(streams, lanes)):
            sym = symbols[spans[k]:spans[k + 1]]
            pick = np.asarray(ls, np.int64)
            rows_k = self.rows_of[r.stream][pick]
            tried, held, every = settle(sym, rows_k, self.segs_of[r.stream][pick], r.step, j,
                                        self.flat, self.base, self.feed, self.width, decoded, tok.alphabet_size,
                                        tok.vocab_size, tok.placeholder)
            if tried < 0:
                raise CorruptArchiveError("decoded a symbol outside the alphabet")
            self.stats.tried += tried
            self.stats.held += held
            if self.drafts is not None:
                self.drafts.push(rows_k, sym)
            if r.stream in self.mixers:
                self.mixers[r.stream].update(sym.tolist())
            self.sched.advance_stream(r)
            if r.done:
                self.coders.pop(r.stream, None)
                self.mixers.pop(r.stream, None)
                self.mixed.pop(r.stream, None)
                self.rows_of.pop(r.stream)
                self.segs_of.pop(r.stream)
            elif every:
                going.append(r)
        return going

    def _decode_tensors(self, streams: list[Running], lanes: list[list[int]], gaps: torch.Tensor,
                        spans: np.ndarray) -> np.ndarray:
        """The symbols of one column through the tensor path (StreamMixer, CodingTables, StreamDecoder): on CUDA,
        where the rows stay on the device and only stage 1's and the chosen buckets' rows cross to the host."""
        mixed = [self.mixers[r.stream].mix(ls, gaps[spans[k]:spans[k + 1]])
                 for k, (r, ls) in enumerate(zip(streams, lanes))]
        tables = CodingTables(torch.cat(mixed), self.tok.alphabet_size)
        stage1 = tables.stage1()
        buckets = np.zeros(int(spans[-1]), dtype=np.int64)
        for k, r in enumerate(streams):
            buckets[spans[k]:spans[k + 1]] = self._coder(r.stream).decode(stage1[spans[k]:spans[k + 1]])
        stage2 = tables.stage2(buckets)
        symbols = np.zeros_like(buckets)
        for k, r in enumerate(streams):
            part = self._coder(r.stream).decode(stage2[spans[k]:spans[k + 1]])
            symbols[spans[k]:spans[k + 1]] = buckets[spans[k]:spans[k + 1]] * tables.width + part
        return symbols

    def _coder(self, stream: int) -> StreamDecoder:
        return self.coders[stream]

    def _guess(self) -> None:
        """Choose the next pass's guesses: each running stream's drafts, believed as far as they
        have held (:class:`Acceptance`), in as many columns as pay (:func:`choose_width`)."""
        self.width[:] = 1
        self._next = 1
        if not self.most or not self.sched.running:
            return
        plans, chances = [], []
        for r in self.sched.running:
            live = r.live
            rows = self.rows_of[r.stream][np.asarray(live, np.int64)]
            room = self.run.room(rows)
            most = int(min(room.min(), min(r.lengths[i] - r.step for i in live) - 1, self.most))
            # Proposed and watched: scored as the symbols come, fed or not.
            guesses, counts, lengths = self.drafts.propose(rows, max(0, most), watch=True)
            count = int(counts.min())
            if count == 0:
                continue
            plans.append((rows, guesses, count))
            chances.append(self.drafts.chances(lengths, count))
        if not plans:
            return
        live_rows = sum(len(r.live) for r in self.sched.running)
        T = choose_width(live_rows, self.run.rows, chances, self.cost, self.most)
        self._next = T
        for rows, guesses, count in plans:
            k = min(T - 1, count)
            g = guesses[:, :k]
            self.feed[rows, 1:1 + k] = np.where(g < self.tok.vocab_size, g, self.tok.placeholder)
            self.width[rows] = 1 + k

    def launch(self) -> None:
        """The model pass: the tokens just decoded and their guesses in, the next hidden rows out."""
        T = self._next
        t0 = time.perf_counter()
        self.run.advance(self.feed[:, :T], self.live, guesses=np.where(self.live, self.width - 1, 0))
        self._pass = (self.run.rows * T, time.perf_counter() - t0)
        self.stats.model_seconds += self._pass[1]
        self.stats.passes += 1
        self.stats.row_passes += int(self.live.sum())


class Overlap:
    """Takes turns between sets of rows so the host's work of one overlaps the model step of another.

    On CUDA each set has its own stream: a step is an asynchronous launch, and
    reading one set's rows to the host waits only for that set's kernels.  On a
    CPU a step runs when it is launched: the turns are the same, nothing
    overlaps.  (A step in a background thread was measured there: 50-53 s
    against 7.8 s for one set at 2 threads, the kernels' OpenMP threads and the
    coder's fighting over the 2 cores; docs/SPEED.md.)  The decoder takes two
    sets on CUDA only; on a CPU the tests use them to check the turns.
    """

    def __init__(self, device: torch.device, sets: int):
        self._streams = ([torch.cuda.Stream(device) for _ in range(sets)] if device.type == "cuda" else None)
        for st in self._streams or ():
            st.wait_stream(torch.cuda.current_stream(device))

    def on(self, k: int):
        """The context set ``k``'s host part and step run in (its stream on CUDA)."""
        return torch.cuda.stream(self._streams[k]) if self._streams else nullcontext()

    def __enter__(self) -> Overlap:
        return self

    def __exit__(self, *exc) -> None:
        for st in self._streams or ():
            torch.cuda.current_stream(st.device).wait_stream(st)


