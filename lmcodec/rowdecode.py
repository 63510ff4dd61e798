"""Decode LM streams with the batch kept full: the scheduler's rows through the model.

The lockstep decoder ran a batch of streams until its longest segment ended, so
rows whose segments had ended sat idle.  Here :class:`~lmcodec.schedule.Scheduler`
hands free rows to the next stream at once, and the model step runs rows at
their own positions (:class:`~lmcodec.runner.RowStep`; on CUDA the captured
:class:`~lmcodec.runner.GraphStep`).  All rows' gaps, mixtures and frequency
tables stay on the model's device; only each stream's stage-1 rows, then its
stage-2 rows, cross to the host for the range coder.

What a stream decodes to does not depend on which rows it gets, when it is
admitted or what shares its steps: its coder reads the same rows in the same
order (step-major, live lanes in lane order), and the engine's numbers for a
row depend only on that row (docs/ENGINE.md, "Rows at their own positions").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .coder import StreamDecoder
from .engine import Engine
from .errors import CorruptArchiveError
from .frequencies import CodingTables
from .mixing import MixerConfig, StreamMixer
from .runner import GraphStep, Prefix, RowStep
from .schedule import Running, Scheduler
from .tokens import ByteTokenizer


def decode_streams(engine: Engine, pre: Prefix, groups: Sequence[range], payloads: Sequence[bytes],
                   lengths: Sequence[int], context: int, tok: ByteTokenizer, mixer: MixerConfig, rows: int,
                   order: Sequence[int] | None = None,
                   tick: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """The symbols of every segment (``lengths[g]`` tokens each) of the streams ``groups``
    (stream k carries segments ``groups[k]`` in ``payloads[k]``), decoded in ``rows`` rows.

    ``order`` is the streams' admission order (default: as given); ``tick(n)`` is
    called with the tokens decoded at each step (progress).
    """
    symbols = [np.zeros(n, dtype=np.int64) for n in lengths]
    if not groups:
        return symbols
    rows = max(rows, max(len(g) for g in groups))
    sched = Scheduler([[lengths[g] for g in group] for group in groups], rows, order)
    longest = max(lengths, default=0)
    step_cls = GraphStep if engine.device.type == "cuda" else RowStep
    run = step_cls(engine, pre, rows, context, longest)
    alphabet = tok.alphabet_size
    feed = np.full(rows, tok.placeholder, dtype=np.int64)
    coders: dict[int, StreamDecoder] = {}
    mixers: dict[int, StreamMixer] = {}
    while True:
        for started in sched.admit():
            s = started.stream
            coders[s] = StreamDecoder(payloads[s])
            mixers[s] = StreamMixer(mixer, len(groups[s]), alphabet)
            run.start([r for r in started.rows if r >= 0])
        if not sched.running:
            break
        live_rows = _step(run, sched.running, coders, mixers, groups, symbols, feed, tok)
        if tick is not None:
            tick(len(live_rows))
        live = np.zeros(rows, dtype=bool)
        live[live_rows] = True
        for stream in _retired(sched):
            del coders[stream], mixers[stream]
        if sched.done:
            break
        run.advance(feed, live)
    return symbols


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
