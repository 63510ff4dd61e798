"""Decode LM streams with the batch kept full: the scheduler's rows through the model.

The lockstep decoder ran a batch of streams until its longest segment ended, so
rows whose segments had ended sat idle.  Here :class:`~lmcodec.coding.schedule.Scheduler`
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

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch

from ..engine.engine import Engine
from ..errors import CorruptArchiveError
from .coder import StreamDecoder
from .frequencies import CodingTables
from .mixing import MixerConfig, StreamMixer
from .runner import Prefix
from .schedule import Running, Scheduler
from .steps import GraphStep, RowStep
from .tokens import ByteTokenizer


def decode_streams(engine: Engine, pre: Prefix, groups: Sequence[range], payloads: Sequence[bytes],
                   lengths: Sequence[int], context: int, tok: ByteTokenizer, mixer: MixerConfig, rows: int,
                   order: Sequence[int] | None = None,
                   tick: Callable[[int], None] | None = None, halves: int = 1) -> list[np.ndarray]:
    """The symbols of every segment (``lengths[g]`` tokens each) of the streams ``groups``
    (stream k carries segments ``groups[k]`` in ``payloads[k]``), decoded in ``rows`` rows.

    ``order`` is the streams' admission order (default: as given); ``tick(n)`` is
    called with the tokens decoded at each step (progress).  ``halves=2`` deals
    the streams to two sets of rows (half the rows each) whose steps take turns,
    so that on CUDA one half's host work (coder, online models) overlaps the other
    half's model step (:class:`Overlap`); the symbols are the same.
    """
    symbols = [np.zeros(n, dtype=np.int64) for n in lengths]
    if not groups:
        return symbols
    order = list(range(len(groups))) if order is None else list(order)
    parts = split_streams(groups, lengths, order, halves if rows >= 2 * halves else 1)
    share = max(1, rows // len(parts))
    sets = [Rows(engine, pre, [groups[k] for k in part], [payloads[k] for k in part], lengths, context, tok, mixer,
                 share, symbols) for part in parts]
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

    :meth:`code` is the host's part of a step (admit streams, decode one token of
    every live lane from the last model step, retire finished streams);
    :meth:`launch` is the model's part (feed the decoded tokens, compute the next
    hidden rows).  ``symbols`` (shared) receives each segment's tokens.
    """

    def __init__(self, engine: Engine, pre: Prefix, groups: Sequence[range], payloads: Sequence[bytes],
                 lengths: Sequence[int], context: int, tok: ByteTokenizer, mixer: MixerConfig, rows: int,
                 symbols: list[np.ndarray]):
        self.groups, self.payloads, self.tok, self.mixer = groups, payloads, tok, mixer
        self.symbols = symbols
        rows = max(rows, max(len(g) for g in groups))
        self.sched = Scheduler([[lengths[g] for g in group] for group in groups], rows)
        longest = max((lengths[g] for group in groups for g in group), default=0)
        step_cls = GraphStep if engine.device.type == "cuda" else RowStep
        self.run = step_cls(engine, pre, rows, context, longest)
        self.feed = np.full(rows, tok.placeholder, dtype=np.int64)
        self.live = np.zeros(rows, dtype=bool)
        self.coders: dict[int, StreamDecoder] = {}
        self.mixers: dict[int, StreamMixer] = {}

    def code(self, tick: Callable[[int], None] | None = None) -> bool:
        """Admit, decode one token per live lane, retire; False once every stream is done."""
        for started in self.sched.admit():
            s = started.stream
            self.coders[s] = StreamDecoder(self.payloads[s])
            self.mixers[s] = StreamMixer(self.mixer, len(self.groups[s]), self.tok.alphabet_size)
            self.run.start([r for r in started.rows if r >= 0])
        if not self.sched.running:
            return False
        live_rows = _step(self.run, self.sched.running, self.coders, self.mixers, self.groups, self.symbols,
                          self.feed, self.tok)
        if tick is not None:
            tick(len(live_rows))
        self.live = np.zeros(self.run.rows, dtype=bool)
        self.live[live_rows] = True
        for stream in _retired(self.sched):
            del self.coders[stream], self.mixers[stream]
        return not self.sched.done

    def launch(self) -> None:
        """The model step: the tokens just decoded in, the next hidden rows out."""
        self.run.advance(self.feed, self.live)


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

    def __enter__(self) -> "Overlap":
        return self

    def __exit__(self, *exc) -> None:
        for st in self._streams or ():
            torch.cuda.current_stream(st.device).wait_stream(st)


def _retired(sched: Scheduler) -> list[int]:
    """Move every stream one step on; the streams that finished."""
    before = {r.stream for r in sched.running}
    sched.advance()
    return sorted(before - {r.stream for r in sched.running})


def _step(run: RowStep, running: list[Running], coders: dict, mixers: dict, groups, symbols, feed: np.ndarray,
          tok: ByteTokenizer) -> list[int]:
    """Decode one token of every live lane of the running streams; return their rows.

    Syncs: the stage-1 and stage-2 rows (``.stage1()``, ``.stage2()``) come to the host.
    """
    alphabet = tok.alphabet_size
    lanes = [r.live for r in running]
    rows = [r.rows[i] for r, ls in zip(running, lanes) for i in ls]
    idx = torch.as_tensor(rows, device=run.h.device)
    gaps = run.engine.gaps(run.h[idx], run.e[idx])
    mixed, at = [], 0
    for r, ls in zip(running, lanes):
        mixed.append(mixers[r.stream].mix(ls, gaps[at:at + len(ls)]))
        at += len(ls)
    tables = CodingTables(torch.cat(mixed), alphabet)
    stage1 = tables.stage1()
    spans = np.cumsum([0] + [len(ls) for ls in lanes])
    buckets = np.zeros(len(rows), dtype=np.int64)
    for k, r in enumerate(running):
        buckets[spans[k]:spans[k + 1]] = coders[r.stream].decode(stage1[spans[k]:spans[k + 1]])
    stage2 = tables.stage2(buckets)
    for k, (r, ls) in enumerate(zip(running, lanes)):
        sym = buckets[spans[k]:spans[k + 1]] * tables.width + coders[r.stream].decode(stage2[spans[k]:spans[k + 1]])
        if (sym >= alphabet).any():
            raise CorruptArchiveError("decoded a symbol outside the alphabet")
        for i, x in zip(ls, sym.tolist()):
            symbols[groups[r.stream][i]][r.step] = x
            feed[r.rows[i]] = x if x < tok.vocab_size else tok.placeholder
        mixers[r.stream].update(sym.tolist())
    return rows
