"""Segments -> model passes: the shared prefix, parallel scoring, lockstep decoding.

Every segment is modelled after the same *prefix* (start token + prompt tokens),
whose keys and values are computed once.  The encoder knows a segment's tokens,
so it scores the whole segment in one parallel pass (:func:`score_segment`);
the decoder learns them one at a time, so it advances many segments in
lockstep, one token per step (:class:`Lockstep`).  The exact engine makes both
give the same logits bit for bit (docs/ENGINE.md), whatever the batch.

Key sets: position ``p`` sees the prefix ``[0, P)`` and the last ``C - P``
positions ``(p - (C - P), p]``, C being the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .engine import Engine, KVCache

#: Positions per parallel pass (bounds activation memory for long segments).
SCORE_CHUNK = 2048


@dataclass
class Prefix:
    """The prefix's cache (one row) and the final hidden state of its last position."""

    cache: KVCache
    length: int
    h: torch.Tensor      # [1, H]
    e: torch.Tensor      # [1, 1]


def prefill(engine: Engine, prefix: list[int]) -> Prefix:
    """Run the prefix once (causal, from an empty cache)."""
    if not prefix:
        raise ValueError("prefix must hold at least the start token")
    n = len(prefix)
    cache = KVCache.empty(engine.model, 1, n, engine.device)
    pos = torch.arange(n)
    zero = torch.zeros(n, dtype=torch.int64)
    h, e = engine.forward(torch.tensor([prefix]), pos, cache, pos, (zero, zero, pos + 1))
    return Prefix(cache, n, h[-1:], e[-1:])


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
    Long segments go in chunks of :data:`SCORE_CHUNK` positions over a sliding
    cache that keeps the prefix and the last ``context - P`` positions.
    """
    P, C, T = pre.length, context, len(inputs)
    window = C - P
    hs, es = [pre.h], [pre.e]
    slots_cap = P + max(0, window - 1) + min(SCORE_CHUNK, T)
    cache = KVCache.empty(engine.model, 1, slots_cap, engine.device)
    cache.copy_rows(pre.cache, P)
    base = P               # position held by slot P
    ids = torch.as_tensor(np.asarray(inputs, dtype=np.int64))
    for s0 in range(P, P + T, SCORE_CHUNK):
        s1 = min(s0 + SCORE_CHUNK, P + T)
        keep = max(P, s0 - window + 1)          # the earliest position this chunk's queries see
        if keep > base:                          # slide: move positions [keep, s0) down to slot P
            cache.move_slots(slice(P + keep - base, P + s0 - base), P)
            base = keep
        pos = torch.arange(s0, s1)
        slot = P + pos - base
        a = torch.full_like(pos, P)
        b = P + (pos - window + 1).clamp(min=P) - base
        h, e = engine.forward(ids[None, s0 - P:s1 - P], pos, cache, slot, (a, b, slot + 1))
        hs.append(h)
        es.append(e)
    return torch.cat(hs), torch.cat(es)


def ring_slot(pos: int, sink: int, capacity: int) -> int:
    """Cache slot of position ``pos``: linear until full, then a ring after the sink."""
    return pos if pos < capacity else sink + (pos - sink) % (capacity - sink)


class Lockstep:
    """``rows`` segments advancing together, one token per row per step.

    The cache holds ``min(context, P + longest)`` slots: the prefix, then a ring
    buffer of the latest positions.
    """

    def __init__(self, engine: Engine, pre: Prefix, rows: int, context: int, longest: int):
        self.engine = engine
        self.sink = pre.length
        self.capacity = min(context, pre.length + longest)
        self.cache = KVCache.empty(engine.model, rows, self.capacity, engine.device)
        self.cache.copy_rows(pre.cache, pre.length)
        self.h = pre.h.expand(rows, -1)
        self.e = pre.e.expand(rows, -1)
        self.position = pre.length
        self.rows = rows

    def advance(self, tokens: np.ndarray) -> None:
        """Feed one token per row; the next hidden rows land in ``self.h`` / ``self.e``."""
        pos = self.position
        slot = ring_slot(pos, self.sink, self.capacity)
        length = min(pos + 1, self.capacity)
        zero = torch.zeros(1, dtype=torch.int64)
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).view(self.rows, 1)
        self.h, self.e = self.engine.forward(ids, torch.tensor([pos]), self.cache, torch.tensor([slot]),
                                             (zero, zero, torch.tensor([length])))
        self.position = pos + 1
