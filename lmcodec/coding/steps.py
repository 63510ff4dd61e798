"""Decoding steps: the rows of a batch fed one token each (or a token and its guesses) per model pass.

The encoder scores a whole segment at once (:mod:`lmcodec.coding.runner`); the
decoder learns tokens as it decodes them, so it runs the model a step at a time
over a KV cache that holds the prefix (slots [0, P)), then the latest positions:
linear until the cache is full, then a ring after the prefix.
:class:`Lockstep` advances rows together; :class:`RowStep` keeps each row at its
own position (the scheduled decoder, :mod:`lmcodec.coding.rowdecode`), and a pass
may feed a row its last token plus guesses of the next ones
(:meth:`RowStep.advance` with ``guesses``); :class:`GraphStep` is its static-shape
twin for CUDA graphs.
"""

from __future__ import annotations

import numpy as np
import torch

from ..engine.engine import Engine, KVCache
from .runner import Prefix, next_sink_move, sink_base


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
        self.pre = pre
        self.sink = pre.length
        self.sink_at = 0           # where the prefix in slots [0, P) stands (sink_base)
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
        self.sink_at = self.pre.place(self.engine, self.cache, pos, self.sink_at)
        slot = ring_slot(pos, self.sink, self.capacity)
        length = min(pos + 1, self.capacity)
        zero = torch.zeros(1, dtype=torch.int64)
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).view(self.rows, 1)
        self.h, self.e = self.engine.forward(ids, torch.tensor([pos]), self.cache, torch.tensor([slot]),
                                             (zero, zero, torch.tensor([length])))
        self.position = pos + 1


class RowStep:
    """``rows`` rows, each at its own position, one token per row per step (the
    scheduled decoder's step: :mod:`lmcodec.coding.schedule` hands rows to streams),
    or a token and its guesses (below).

    :meth:`start` begins a segment in some rows (position P, the prefix's last
    hidden row as their first prediction); :meth:`advance` feeds one token per
    row and moves the ``live`` rows on.  Rows that hold no segment are computed
    too (the batch keeps its shape) but stay where they are, rewriting one slot
    no query reads.  A row reused for a new segment needs no clearing: a query
    at position p reads only slots its own segment wrote (linear until the ring
    is full, then every ring slot is its own).  The prefix in slots [0, P) is
    placed per row (:func:`sink_base` of the row's position).  Eager: each step
    makes its own small tensors (:class:`GraphStep` is the static-shape twin).

    **Guesses** (exact speculative decoding, :mod:`lmcodec.coding.rowdecode`): a pass
    of T columns feeds row r its last token at its position p and ``guesses[r]``
    = k guessed tokens at p+1 .. p+k; output j of the row predicts the token
    after column j, bit for bit what single steps give (docs/ENGINE.md, "Rows at
    their own positions").  A guess is taken only in the cache's linear phase
    (p + k < capacity: there query p+j writes slot p+j, above every slot the
    row's earlier queries read, so the slots of rejected guesses are simply
    rewritten by the next pass; in the ring a later query would overwrite a slot
    an earlier one reads) and never across a move of the prefix (:meth:`room`).
    Columns past a row's k are padding: they sit at p, write one of ``spare``
    scratch slots past the capacity and read slot 0 only; their outputs are
    never used.  After a pass the row's outputs are ``h[r * T + j]``;
    :meth:`skip` moves a row on by the guesses that held.
    """

    def __init__(self, engine: Engine, pre: Prefix, rows: int, context: int, longest: int,
                 capacity: int | None = None, spare: int = 0):
        self.engine = engine
        self.pre = pre
        self.rows = rows
        self.capacity = capacity or min(context, pre.length + longest)
        self.spare = spare                         # scratch slots for padding columns: at most spare + 1 columns
        self.bound = pre.length + longest          # every position a row reaches is below this
        engine.reserve_positions(self.bound)
        self.cache = KVCache.empty(engine.model, rows, self.capacity + spare, engine.device)
        self.cache.copy_rows(pre.cache, pre.length)
        self.position = np.full(rows, pre.length, dtype=np.int64)
        self.sink_at = np.zeros(rows, dtype=np.int64)   # where each row's prefix stands (sink_base)
        self.T = 1                                       # columns of the last pass: h holds rows * T rows
        self.h = pre.h.expand(rows, -1).clone()
        self.e = pre.e.expand(rows, -1).clone()

    def start(self, rows) -> None:
        """Begin a segment in ``rows``: position P, predictions from the prefix (output 0)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        self.position[rows] = self.pre.length
        self._place(rows)
        idx = torch.as_tensor(rows * self.T, device=self.h.device)
        self.h[idx] = self.pre.h
        self.e[idx] = self.pre.e

    def _place(self, rows: np.ndarray) -> None:
        """Slots [0, P) of each of ``rows``: the prefix as a query at the row's position sees it."""
        P, trained = self.pre.length, self.engine.arch.max_position_embeddings
        want = np.array([sink_base(int(p), P, trained) for p in self.position[rows]], dtype=np.int64)
        move = want != self.sink_at[rows]
        for base in sorted(set(want[move].tolist())):
            pick = rows[move & (want == base)]
            self.cache.copy_rows(self.pre.sink(self.engine, base), P, pick)
            self.sink_at[pick] = base

    def room(self, rows) -> np.ndarray:
        """How many guesses each of ``rows`` may take in the next pass: its positions p .. p+k
        in the linear phase, below :attr:`bound`, on one side of a move of the prefix, and
        k <= :attr:`spare`."""
        pos = self.position[np.asarray(rows, dtype=np.int64)]
        P, trained = self.pre.length, self.engine.arch.max_position_embeddings
        moves = np.array([next_sink_move(int(p), P, trained) for p in pos], dtype=np.int64)
        k = np.minimum.reduce([self.capacity - 1 - pos, self.bound - 1 - pos, moves - 1 - pos])
        return np.clip(k, 0, self.spare)

    def _inputs(self, tokens: np.ndarray, guesses: np.ndarray | None = None) -> list[np.ndarray]:
        """This pass's [rows, T] host columns: ids, positions, slots, key-set ends."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(self.rows, -1)
        T = tokens.shape[1]
        k = np.zeros(self.rows, dtype=np.int64) if guesses is None else np.asarray(guesses, dtype=np.int64)
        if T > self.spare + 1 or (k > T - 1).any():
            raise ValueError(f"a pass of {T} columns with {self.spare} spare slots and guesses {k.max()}")
        if (k > 0).any() and (k > self.room(np.arange(self.rows))).any():
            raise ValueError("a guess past the cache's linear phase, the bound or a move of the prefix")
        pos = self.position
        P, cap = self.pre.length, self.capacity
        self._place(np.arange(self.rows))
        col = np.arange(T)
        real = col[None, :] <= k[:, None]
        at = np.where(real, pos[:, None] + col, pos[:, None])
        first = np.where(pos < cap, pos, P + (pos - P) % max(1, cap - P))
        slot = np.where(col == 0, first[:, None], np.where(real, at, cap + col - 1))
        end = np.where(real, np.minimum(at + 1, cap), 1)
        return [tokens, at, slot, end]

    def _moved(self, live: np.ndarray | None) -> None:
        self.position = self.position + (1 if live is None else np.asarray(live, dtype=np.int64))

    def skip(self, rows, n) -> None:
        """Move ``rows`` on by ``n`` more positions each: the guesses of the last pass that held."""
        self.position[np.asarray(rows, dtype=np.int64)] += np.asarray(n, dtype=np.int64)

    def advance(self, tokens: np.ndarray, live: np.ndarray | None = None, guesses: np.ndarray | None = None) -> None:
        """Feed one token per row (``tokens`` [rows] or [rows, T]: the token, then its guesses);
        the next hidden rows land in ``self.h`` / ``self.e`` (row r's column j at r * T + j).
        Rows where ``live`` is False keep their position (default: every row moves one on)."""
        ids, pos, slot, length = (torch.from_numpy(v) for v in self._inputs(tokens, guesses))
        zero = torch.zeros_like(pos)
        self.h, self.e = self.engine.forward(ids, pos, self.cache, slot, (zero, zero, length), bound=self.bound)
        self.T = ids.shape[1]
        self._moved(live)


class GraphStep(RowStep):
    """:class:`RowStep` with static shapes, like gpt-fast's ``setup_caches``: the cache
    (``rows`` x ``context`` slots) and the step's inputs are allocated once; a step
    only ``copy_``s the host columns into them and, on CUDA, replays a CUDA graph
    of the forward pass captured at the first step (``graph=False``: eager, the
    same static-shape step; on CPU always).  Prefix moves (``_place``) are cache
    copies between replays.  ``.h`` / ``.e`` are the graph's static outputs: read
    them (or copy) before the next :meth:`advance`.
    """

    def __init__(self, engine: Engine, pre: Prefix, rows: int, context: int, longest: int,
                 graph: bool | None = None):
        super().__init__(engine, pre, rows, context, longest, capacity=context)
        dev = engine.device
        self._static = [torch.zeros((rows, 1), dtype=torch.int64, device=dev) for _ in range(4)]
        self._zero = torch.zeros((rows, 1), dtype=torch.int64, device=dev)
        self.graph = (dev.type == "cuda") if graph is None else graph
        self._graph = None
        self._out: tuple[torch.Tensor, torch.Tensor] | None = None

    def _forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids, pos, slot, length = self._static
        return self.engine.forward(ids, pos, self.cache, slot, (self._zero, self._zero, length), bound=self.bound)

    def _capture(self) -> None:
        """Warm up on a side stream (allocator, lazy tables), then capture one step."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._out = self._forward()

    def advance(self, tokens: np.ndarray, live: np.ndarray | None = None, guesses: np.ndarray | None = None) -> None:
        """:meth:`RowStep.advance` with one column (no spare slots: a guess is refused)."""
        for buf, v in zip(self._static, self._inputs(tokens, guesses)):
            buf.copy_(torch.from_numpy(v))
        if not self.graph:
            self.h, self.e = self._forward()
        else:
            if self._graph is None:
                self._capture()     # its warm-up steps rewrite this step's slots with the same values
            self._graph.replay()
            self.h, self.e = self._out
        self._moved(live)
