"""Segments -> model passes: the shared prefix and the parallel (scoring) pass.

Every segment is modelled after the same *prefix* (start token + prompt tokens),
whose keys and values are computed once.  The encoder knows a segment's tokens,
so it scores the whole segment in one parallel pass (:func:`score_segment`);
the decoder learns them one at a time and steps the model
(:mod:`lmcodec.coding.steps`).  The exact engine makes both
give the same logits bit for bit (docs/ENGINE.md), whatever the batch.

Key sets: position ``p`` sees the prefix ``[0, P)`` and the last ``C - P``
positions ``(p - (C - P), p]``, C being the context.

Segments may run past the model's trained positions M.  Attention only sees
relative positions (RoPE), and the window keeps every window key within C of
its query; only the prefix, the attention sink, would drift out of range.  So
past M the prefix is *moved*: a query at ``p`` sees the prefix as if it stood
at positions ``[D, D + P)``, ``D = sink_base(p, P, M)``, which steps up by M/4
every M/4 positions so the sink stays within M of every query.  Within M
nothing moves (``D = 0``), so segments of up to M tokens are what they were.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine.cpu.platform import release_free_memory
from ..engine.engine import Engine
from ..engine.kvcache import KVCache

#: Positions per parallel pass (bounds activation memory for long segments).
SCORE_CHUNK = 2048
#: A CPU's positions per pass, at most SCORE_CHUNK: 512 positions already make full GEMMs
#: there, and the pass's live arrays (the MLP's products: 12 MB, against 2,048's 50 MB)
#: stay small beside the model.  A GPU wants the longer chunk to fill its launches.
CPU_SCORE_CHUNK = 512


def score_chunk(device: torch.device) -> int:
    """Positions per parallel pass on ``device``."""
    return min(SCORE_CHUNK, CPU_SCORE_CHUNK) if device.type == "cpu" else SCORE_CHUNK


def sink_step(trained: int) -> int:
    """Positions between moves of the prefix: a quarter of the model's trained positions."""
    return max(1, trained // 4)


def sink_base(position: int, prefix_len: int, trained: int) -> int:
    """Where the prefix stands for a query at ``position``: 0 while ``position < P + 4q``
    (q = :func:`sink_step`), then ``q * (j - 3)`` in the j-th stretch of q positions, so a
    query is never more than ``P + 4q <= P + trained`` positions past the sink."""
    q = sink_step(trained)
    return q * max(0, (position - prefix_len) // q - 3)


def next_sink_move(position: int, prefix_len: int, trained: int) -> int:
    """The first position after ``position`` whose :func:`sink_base` differs."""
    q = sink_step(trained)
    return prefix_len + q * max(4, (position - prefix_len) // q + 1)


@dataclass
class Prefix:
    """The prefix's cache (one row) and the final hidden state of its last position."""

    cache: KVCache
    ids: list[int]
    h: torch.Tensor      # [1, H]
    e: torch.Tensor      # [1, 1]
    moved: dict[int, KVCache] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.ids)

    def place(self, engine: Engine, cache: KVCache, position: int, current: int) -> int:
        """Make slots [0, P) of every row of ``cache`` the prefix a query at ``position``
        sees (:func:`sink_base`), if it is not already at ``current``; return where it stands."""
        at = sink_base(position, self.length, engine.arch.max_position_embeddings)
        if at != current:
            cache.copy_rows(self.sink(engine, at), self.length)
        return at

    def sink(self, engine: Engine, base: int) -> KVCache:
        """The prefix's cache as run at positions ``[base, base + P)``.

        On a CPU the last two are kept.  On CUDA a new one is computed on one row
        set's stream and read from every set's (rowdecode.Overlap), so it is
        finished before it is handed out, and all are kept (one row of P tokens
        each), so that no stream's pending copy reads memory freed for reuse.
        """
        if base == 0:
            return self.cache
        if base not in self.moved:
            cuda = engine.device.type == "cuda"
            if len(self.moved) >= 2 and not cuda:
                self.moved.pop(next(iter(self.moved)))
            self.moved[base] = _run_prefix(engine, self.ids, base)[0]
            if cuda:
                torch.cuda.current_stream(engine.device).synchronize()
        return self.moved[base]


def _run_prefix(engine: Engine, prefix: list[int], base: int) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    n = len(prefix)
    cache = KVCache.empty(engine.model, 1, n, engine.device)
    slot = torch.arange(n)
    zero = torch.zeros(n, dtype=torch.int64)
    h, e = engine.forward(torch.tensor([prefix]), slot + base, cache, slot, (zero, zero, slot + 1))
    return cache, h, e


def prefill(engine: Engine, prefix: list[int]) -> Prefix:
    """Run the prefix once (causal, from an empty cache)."""
    if not prefix:
        raise ValueError("prefix must hold at least the start token")
    cache, h, e = _run_prefix(engine, prefix, 0)
    return Prefix(cache, list(prefix), h[-1:], e[-1:])


def score_ids(engine: Engine, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden rows of every position of ``ids`` [B, T] (positions 0..T-1, causal, no window).

    Row ``b * T + i`` predicts the token after position i.  Used to measure
    (probe, benchmarks); T is at most the engine's key limit.
    """
    B, T = ids.shape
    cache = KVCache.empty(engine.model, B, T, engine.device)
    pos = torch.arange(T)
    zero = torch.zeros(T, dtype=torch.int64)
    return engine.forward(ids, pos, cache, pos, (zero, zero, pos + 1))


def score_segment(engine: Engine, pre: Prefix, inputs: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden rows predicting each of a segment's ``len(inputs) + 1`` tokens, in one pass.

    ``inputs`` are the model inputs of the segment's tokens but the last.  Row
    0 is the prefix's last position; row i > 0 is the pass over input i - 1.
    """
    hs, es = zip(*score_chunks(engine, pre, inputs, context))
    return torch.cat(hs), torch.cat(es)


def score_chunks(engine: Engine, pre: Prefix, inputs: np.ndarray,
                 context: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`score_segment`'s rows, chunk by chunk as they are computed (bounded memory):
    :func:`score_batch` with a batch of one."""
    for (chunk,) in score_batch(engine, pre, [inputs], context):
        yield chunk


def score_batch(engine: Engine, pre: Prefix, inputs: Sequence[np.ndarray],
                context: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The rows of several segments (one per batch row), chunk by chunk: per chunk, each
    segment's rows of that chunk (empty once the segment has ended).

    Every segment starts at position P, so the rows of a batch share positions,
    slots and windows, and one pass serves them all; a shorter segment's row is
    padded past its end (causal: later positions never change earlier rows, and
    a row's numbers never depend on the other rows, docs/ENGINE.md), and those
    rows are dropped.  The pass goes in chunks of :func:`score_chunk`
    positions over a sliding cache that keeps the prefix and the last
    ``context - P`` positions; a chunk never straddles a move of the prefix.
    Each segment's first chunk starts with row 0 (the prefix's last position).
    """
    P, C = pre.length, context
    chunk = score_chunk(engine.device)
    lengths = [len(x) for x in inputs]
    B, T = len(inputs), max(lengths, default=0)
    trained = engine.arch.max_position_embeddings
    window = C - P
    slots_cap = P + min(T, max(0, window - 1) + min(chunk, T))     # a short segment never slides
    cache = KVCache.empty(engine.model, B, slots_cap, engine.device)
    cache.copy_rows(pre.cache, P)
    base = P               # position held by slot P
    sink = 0               # where the prefix in slots [0, P) stands
    ids = np.zeros((B, T), dtype=np.int64)          # padding: token 0, past each segment's end
    for b, x in enumerate(inputs):
        ids[b, :len(x)] = x
    ids_t = torch.from_numpy(ids)
    s0 = P
    while s0 < P + T:
        s1 = min(s0 + chunk, P + T, next_sink_move(s0, P, trained))
        keep = max(P, s0 - window + 1)          # the earliest position this chunk's queries see
        if keep > base:                          # slide: move positions [keep, s0) down to slot P
            cache.move_slots(slice(P + keep - base, P + s0 - base), P)
            base = keep
        sink = pre.place(engine, cache, s0, sink)
        pos = torch.arange(s0, s1)
        slot = P + pos - base
        a = torch.full_like(pos, P)
        b = P + (pos - window + 1).clamp(min=P) - base
        h, e = engine.forward(ids_t[:, s0 - P:s1 - P], pos, cache, slot, (a, b, slot + 1), release=True)
        if engine.device.type == "cpu":
            release_free_memory()       # the chunk's freed arrays, before the next chunk or the coder
        n = s1 - s0
        out = []
        for row, length in enumerate(lengths):
            keep_rows = max(0, min(n, P + length - s0))     # this segment's rows of the chunk
            hb, eb = h[row * n: row * n + keep_rows], e[row * n: row * n + keep_rows]
            out.append((torch.cat([pre.h, hb]), torch.cat([pre.e, eb])) if s0 == P else (hb, eb))
        yield out
        s0 = s1
    if T == 0:
        yield [(pre.h, pre.e)] * B


def batch_rows(chunks: Iterator[list[tuple[torch.Tensor, torch.Tensor]]], n: int) -> list["SegmentRows"]:
    """One :class:`SegmentRows` per segment of a :func:`score_batch`: each pulls the shared
    pass on when it needs a chunk no segment has pulled yet (the others' are kept for them)."""
    queues: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(n)]

    def one(i: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            if not queues[i]:
                got = next(chunks, None)
                if got is None:
                    return
                for q, c in zip(queues, got):
                    q.append(c)
            yield queues[i].pop(0)

    return [SegmentRows(one(i)) for i in range(n)]


class SegmentRows:
    """A segment's hidden rows as the coder reaches them: chunks are pulled from
    :func:`score_chunks` when first needed and dropped once passed, so the encoder
    holds a few chunks per segment, not the whole segment (levels 8 and 9 make a
    4 MiB block one segment: its rows would take 1.3 GB)."""

    def __init__(self, chunks: Iterator[tuple[torch.Tensor, torch.Tensor]]):
        self._chunks = chunks
        self._buf: list[tuple[int, torch.Tensor, torch.Tensor]] = []    # (first row, h, e)
        self._end = 0

    def take(self, t0: int, t1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [t0, t1), t0 < t1; later calls must not ask for rows before t0."""
        if not 0 <= t0 < t1:
            raise ValueError(f"row range [{t0}, {t1}) is empty")
        while self._end < t1:
            h, e = next(self._chunks)
            self._buf.append((self._end, h, e))
            self._end += len(h)
        while self._buf and self._buf[0][0] + len(self._buf[0][1]) <= t0:
            self._buf.pop(0)
        first = self._buf[0][0]
        h = self._buf[0][1] if len(self._buf) == 1 else torch.cat([b[1] for b in self._buf])
        e = self._buf[0][2] if len(self._buf) == 1 else torch.cat([b[2] for b in self._buf])
        return h[t0 - first:t1 - first], e[t0 - first:t1 - first]
