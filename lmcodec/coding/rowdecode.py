"""Decode LM streams with the batch kept full: the scheduler's rows through the model.

A batch of streams run in lockstep would leave idle the rows whose segments have
ended until its longest segment ends.  Instead :class:`~lmcodec.coding.schedule.Scheduler`
hands free rows to the next stream at once, and the model step runs rows at
their own positions (:class:`~lmcodec.coding.steps.RowStep`; on CUDA the captured
:class:`~lmcodec.coding.steps.GraphStep`).  The running streams are arrays
(:class:`~lmcodec.coding.lanes.RunningLanes`), so a pass's bookkeeping is a few compiled
calls: on a CPU the coding is compiled too (:class:`~lmcodec.coding.passes.PlainPasses`,
a whole pass in one call without online models; :class:`~lmcodec.coding.mixedpass.MixedStream`
per stream and step with them); on CUDA the gaps stay on the device and only bucket-sized
rows cross to the host (:class:`~lmcodec.coding.devicepass.DevicePasses`; with online
models, the tensor path's stage-1 rows, then its stage-2 rows).

What a stream decodes to does not depend on which rows it gets, when it is
admitted or what shares its steps: its coder reads the same rows in the same
order (step-major, live lanes in lane order), and the engine's numbers for a
row depend only on that row (docs/ENGINE.md, "Rows at their own positions").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch

from ..engine.engine import Engine
from ..errors import CorruptArchiveError
from .coder import StreamDecoder
from .devicepass import DevicePasses
from .draft import PassCost, choose_width
from .draftbank import DraftBank, PrefixTable
from .frequencies import CodingTables
from .lanes import LOGGED, STATUS, RunningLanes, fed_guesses, guess_limits, new_record, settle, write_guesses
from .mixedpass import MixedStream
from .mixing import MixerConfig, StreamMixer
from .passes import DecoderBank, PlainPasses
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

    #: Streams without online models decode through coding.devicepass on a CPU too (the tests' switch:
    #: CUDA's path, with CPU tensors, against the CPU's).
    device_plain = False

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
        # On a CPU the coding is compiled (coding.passes, coding.mixedpass): every stream's decoder is a row
        # of one bank.  Levels 1-3 (no online models) use the bank on CUDA too: the gaps stay on the device
        # and only bucket-sized rows cross (coding.devicepass); with online models CUDA runs the tensor path.
        self.compiled = engine.device.type == "cpu"
        plain = not mixer.mask
        self.bank = DecoderBank(list(payloads)) if self.compiled or plain else None
        on_device = plain and (not self.compiled or self.device_plain)
        self.plain = (DevicePasses if on_device else PlainPasses)(tok.alphabet_size, self.bank) if plain else None
        self.host_gaps = self.compiled and not on_device         # the gaps as a numpy array
        self.lengths = lengths
        self.coders: dict[int, StreamDecoder] = {}
        self.mixers: dict[int, StreamMixer] = {}
        self.mixed: dict[int, MixedStream] = {}
        # Every lane's draft, in the slot of its row (one compiled call a column or pass for all of them).
        self.drafts = DraftBank(draft or PrefixTable(pre.ids), rows, max(1, longest), self.most) if self.most else None
        self.lanes = RunningLanes([], groups)
        self.where = np.zeros((rows, 1 + self.most), dtype=np.int64)     # row r's output j is gaps row where[r, j]
        self.decoded = np.zeros(rows, dtype=np.int64)                    # tokens each row decoded this pass
        self.log = np.zeros((2, 0), dtype=np.int64)                      # the pass's (row, symbol)s, in order
        self.record = new_record()                                       # the pass's counts (lanes.settle)
        self._fresh = new_record()                                       # what a pass's record starts from
        self.fed = np.zeros(rows, dtype=np.int64)                        # the guesses each row is fed next pass
        self.cost = PassCost()
        self.stats = stats if stats is not None else DecodeStats()
        self._pass: tuple[int, float] | None = None     # (queries, seconds) of the last pass, gaps still to add
        self._next = 1                                   # columns of the next pass (_guess chooses)

    def code(self, tick: Callable[[int], None] | None = None) -> bool:
        """Admit, decode every live lane's tokens from the last pass, retire; False once every stream is done."""
        started = self.sched.admit()
        for run in started:
            self._start(run)
        if started:
            self.lanes.sync()
            self.lanes = RunningLanes(self.sched.running, self.groups)
        if not self.sched.running:
            return False
        t0 = time.perf_counter()
        u = self._gaps()
        self.stats.model_seconds += time.perf_counter() - t0
        if self._pass is not None:
            queries, seconds = self._pass
            self.cost.record(queries, seconds + time.perf_counter() - t0)
            self._pass = None
        record = self.record          # (``decoded`` was left zero by the last pass's skip_decoded)
        record[:] = self._fresh
        tok = self.tok
        if self.plain is not None:
            self.plain.decode(u, self.lanes, self.where, (self.flat, self.base), self.feed, self.width, self.decoded,
                              tok.vocab_size, tok.placeholder, self.log, record)
        elif self.compiled:             # one call a stream: its columns, then the next stream's
            for k, s in enumerate(self.lanes.stream.tolist()):
                self.mixed[s].decode_pass(u, self.lanes, k, self.where, self.bank, (self.flat, self.base), self.feed,
                                          self.width, self.decoded, tok.vocab_size, tok.placeholder, self.log, record)
        else:
            active, j = self.lanes.every, 0
            while len(active):
                active = self._decode(active, j, u)
                j += 1
        tried, held, _, _, ends = record.tolist()
        self.stats.tried += tried
        self.stats.held += held
        if ends:
            self._retire()
        # The next pass's column 0 follows each row's last token (its guesses that held moved it on).
        count = self.run.skip_decoded(self.decoded, self.live)
        self.stats.tokens += count
        if tick is not None:
            tick(count)
        self._guess()
        return not self.sched.done

    def _start(self, run: Running) -> None:
        """A stream admitted: its coder (a row of the bank; constriction on CUDA with online models), its online
        models and drafts; its rows at the prefix."""
        s = run.stream
        if self.bank is not None:
            self.bank.open(s)
        if self.plain is None and self.compiled:
            self.mixed[s] = MixedStream(self.mixer, [self.lengths[g] for g in self.groups[s]], self.tok.alphabet_size)
        elif self.plain is None:
            self.coders[s] = StreamDecoder(self.payloads[s])
            self.mixers[s] = StreamMixer(self.mixer, len(self.groups[s]), self.tok.alphabet_size)
        rows = np.asarray([r for r in run.rows if r >= 0], np.int64)
        if self.drafts is not None:
            self.drafts.open(rows, np.asarray([n for n in run.lengths if n > 0], np.int64))
        self.run.start(rows)
        self.width[rows] = 1

    def _retire(self) -> None:
        """Tell the scheduler of the streams whose lanes ended this pass (their rows are free for the
        next admission); drop the finished streams' coders and mixers."""
        lanes, finished = self.lanes, False
        ended = np.nonzero(lanes.ended)[0]
        lanes.ended[:] = False
        for k in ended:
            run = lanes.runs[k]
            self.sched.jump(run, int(lanes.step[k]))
            if run.done:
                finished = True
                for per in (self.coders, self.mixers, self.mixed):
                    per.pop(run.stream, None)
        if finished:
            lanes.sync()
            self.lanes = RunningLanes(self.sched.running, self.groups)

    def _gaps(self) -> torch.Tensor | np.ndarray:
        """The LM's gaps of every output the live lanes may use (one head pass; ``self.where`` says where
        each row's outputs are); a numpy array on a CPU."""
        idx = self.lanes.gaps(self.width, self.run.T, self.where)
        at = torch.from_numpy(idx).to(self.run.h.device)
        if self.log.shape[1] < len(idx):
            self.log = np.empty((2, len(idx)), dtype=np.int64)     # at most a symbol per output
        u = self.run.engine.gaps(self.run.h[at], self.run.e[at])
        if self.host_gaps:
            u = u.numpy()
        if self.plain is not None:
            self.plain.masses(u)        # the output step's vocabulary pass: the model's time
        return u

    def _decode(self, active: np.ndarray, j: int, u: torch.Tensor | np.ndarray) -> np.ndarray:
        """Decode one token of every live lane of the streams ``active`` (indexes into ``self.lanes``) from
        output ``j`` of its row; move each stream one step on; return the streams that decode output
        j + 1 next (every live lane's guess after this token held, and the stream goes on).  The tensor
        path's (CUDA, streams with online models): a column at a time."""
        lanes, tok = self.lanes, self.tok
        at, spans, lane, rows = lanes.column(active, j, self.where)
        streams = lanes.stream[active]
        symbols = self._decode_tensors(streams, lane, u[torch.as_tensor(at, device=u.device)], spans)
        going = np.empty(len(active), dtype=np.int64)
        n = settle(symbols, active, spans, lane, lanes.stream, lanes.rows, lanes.segs, lanes.lengths, lanes.step, j,
                   self.flat, self.base, self.feed, self.width, self.decoded, tok.alphabet_size, tok.vocab_size,
                   tok.placeholder, going, lanes.ended, self.log, self.record)
        if self.record[STATUS] >= 0:
            raise CorruptArchiveError(f"stream {int(self.record[STATUS])} decoded a symbol outside the alphabet")
        for a, s in enumerate(streams if self.mixers else ()):
            self.mixers[int(s)].update(symbols[spans[a]:spans[a + 1]].tolist())
        return going[:n]

    def _decode_tensors(self, streams: np.ndarray, lane: np.ndarray, gaps: torch.Tensor, spans: np.ndarray
                        ) -> np.ndarray:
        """The symbols of one column through the tensor path (StreamMixer, CodingTables, StreamDecoder): on CUDA,
        where the rows stay on the device and only stage 1's and the chosen buckets' rows cross to the host."""
        mixed = [self.mixers[int(s)].mix(lane[spans[a]:spans[a + 1]].tolist(), gaps[spans[a]:spans[a + 1]])
                 for a, s in enumerate(streams)]
        tables = CodingTables(torch.cat(mixed), self.tok.alphabet_size)
        stage1 = tables.stage1()
        buckets = np.zeros(int(spans[-1]), dtype=np.int64)
        for a, s in enumerate(streams):
            buckets[spans[a]:spans[a + 1]] = self.coders[int(s)].decode(stage1[spans[a]:spans[a + 1]])
        stage2 = tables.stage2(buckets)
        symbols = np.zeros_like(buckets)
        for a, s in enumerate(streams):
            part = self.coders[int(s)].decode(stage2[spans[a]:spans[a + 1]])
            symbols[spans[a]:spans[a + 1]] = buckets[spans[a]:spans[a + 1]] * tables.width + part
        return symbols

    def _guess(self) -> None:
        """Choose the next pass's guesses: each running stream's drafts, believed as far as they
        have held (:class:`Acceptance`), in as many columns as pay (:func:`choose_width`)."""
        self.width[:] = 1
        self._next = 1
        lanes = self.lanes
        if not self.most:
            return
        if not self.sched.running:
            logged = self.record[LOGGED]
            self.drafts.push(self.log[0, :logged], self.log[1, :logged])     # (their rows are free now)
            return
        rows, spans, limit = guess_limits(lanes.rows, lanes.lengths, lanes.step, self.run.position,
                                          *self.run.room_limits(), self.most)
        # The pass's symbols in, then every live lane's proposal, watched: scored as the symbols come,
        # fed or not.  A stream's lanes move together, so it takes its lanes' least count.
        logged = self.record[LOGGED]
        guesses, _, count, table = self.drafts.plan(self.log[0, :logged], self.log[1, :logged], rows, spans, limit)
        chances = [table[k, :c] for k, c in enumerate(count.tolist()) if c]
        if not chances:
            return
        T = choose_width(len(rows), self.run.rows, chances, self.cost, self.most)
        self._next = T
        write_guesses(rows, spans, count, guesses, T, self.feed, self.width, self.tok.vocab_size,
                      self.tok.placeholder)

    def launch(self) -> None:
        """The model pass: the tokens just decoded and their guesses in, the next hidden rows out."""
        T = self._next
        live = fed_guesses(self.live, self.width, self.fed)
        t0 = time.perf_counter()
        self.run.advance(self.feed[:, :T], self.live, guesses=self.fed)
        self._pass = (self.run.rows * T, time.perf_counter() - t0)
        self.stats.model_seconds += self._pass[1]
        self.stats.passes += 1
        self.stats.row_passes += live


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


