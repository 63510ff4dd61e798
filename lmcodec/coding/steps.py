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

from ..engine.cpu.jit import JIT, njit
from ..engine.engine import Engine
from ..engine.kvcache import KVCache
from .runner import Prefix, sink_base, sink_step


def cache_slots(arch, P: int, context: int, longest: int, spare: int = 0, capacity: int | None = None,
                own_local: bool = True) -> tuple[int, int | None]:
    """Slots of a :class:`RowStep`'s cache: ``(every layer's, the local layers' own or None)``.

    The prefix's P slots, the ring of the window's positions plus ``spare`` (guesses), and
    ``spare`` scratch slots for padding columns; a model with local layers (Gemma 3) gives
    those a ring of their own window's positions, W of them, when that is shorter.
    """
    capacity = capacity or min(context, P + longest)
    slots = capacity + 2 * spare
    w = arch.sliding_window
    if not (own_local and w and any(arch.is_local(i) for i in range(arch.num_layers))):
        return slots, None
    return slots, P + min(w, capacity - P) + 2 * spare


def ring_slot(pos: int, sink: int, capacity: int) -> int:
    """Cache slot of position ``pos``: linear until full, then a ring after the sink."""
    return pos if pos < capacity else sink + (pos - sink) % (capacity - sink)


@njit(inline="always", **JIT)
def room_of(pos, P, q, bound, spare):  # pragma: no cover - compiled
    """How many guesses a row at ``pos`` may take in the next pass: its positions pos .. pos + k below
    ``bound`` and on one side of a move of the prefix (:func:`~lmcodec.coding.runner.next_sink_move`,
    every ``q`` positions after P + 4q), k <= ``spare``."""
    moves = P + q * max(4, (pos - P) // q + 1)
    return min(max(min(bound - 1 - pos, moves - 1 - pos), 0), spare)


@njit(**JIT)
def rooms(position, rows, P, q, bound, spare):  # pragma: no cover - compiled
    out = np.empty(rows.shape[0], np.int64)
    for i in range(rows.shape[0]):
        out[i] = room_of(position[rows[i]], P, q, bound, spare)
    return out


@njit(**JIT)
def skip_decoded(decoded, position, live):  # pragma: no cover - compiled
    """Each row that decoded n > 0 tokens in the last pass moves n - 1 more positions on (its guesses that held;
    the pass moved it one) and is ``live``; returns the tokens decoded.  ``decoded`` is left zero for the next
    pass (one numpy call less a pass: after a model pass each costs several microseconds, docs/SPEED.md)."""
    count = 0
    for r in range(decoded.shape[0]):
        n = decoded[r]
        if n > 0:
            position[r] += n - 1
        live[r] = n > 0
        count += n
        decoded[r] = 0
    return count


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
    their own positions").  For that the ring has ``spare`` more slots than the
    window (W = context - P positions): query p+j writes the slot of position
    p+j-W-spare, older than anything the pass's earlier queries read, and each
    query reads its own window only (slots ``[0, a) + [b, c)``: the prefix and
    the window, which may wrap around the ring).  So the slots of rejected
    guesses hold positions no later query reads, and the next pass rewrites
    them.  A pass never crosses a move of the prefix (:meth:`room`).  Columns
    past a row's k are padding: they sit at p, write one of ``spare`` scratch
    slots past the ring and read slot 0 only; their outputs are never used.
    After a pass the row's outputs are ``h[r * T + j]``; :meth:`skip` moves a
    row on by the guesses that held.

    **Local layers** (Gemma 3: a query sees the last W positions): they keep a ring of
    their own, the prefix and ``min(W, window) + spare`` slots (:func:`cache_slots`),
    with their own slots and key sets, made by the same rule; which keys a query
    sees does not change (the window's test by key position still applies), only
    where they are kept.  ``own_local=False``: they share the global layers' slots.
    """

    def __init__(self, engine: Engine, pre: Prefix, rows: int, context: int, longest: int,
                 capacity: int | None = None, spare: int = 0, own_local: bool = True):
        self.engine = engine
        self.pre = pre
        self.rows = rows
        P = pre.length
        slots, local_slots = cache_slots(engine.arch, P, context, longest, spare, capacity, own_local)
        self.capacity = slots - 2 * spare
        self.window = context - P                  # positions after the prefix a query sees, itself included
        self.spare = spare                         # ring slots past the window, and scratch slots for padding
        self.ring = self.capacity - P + spare      # slots after the prefix: linear until used, then a ring
        # The local layers' own ring and window (None: they share the slots above).
        self.local_ring = None if local_slots is None else local_slots - P - spare
        self.local_window = None if local_slots is None else min(engine.arch.sliding_window, self.window)
        self.bound = P + longest                   # every position a row reaches is below this
        engine.reserve_positions(self.bound)
        self.cache = KVCache.empty(engine.model, rows, slots, engine.device, local_slots)
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
        """How many guesses each of ``rows`` may take in the next pass (:func:`room_of`)."""
        return rooms(self.position, np.asarray(rows, dtype=np.int64), *self.room_limits())

    def room_limits(self) -> tuple[int, int, int, int]:
        """What :func:`room_of` reads besides a row's position: P, the prefix's step, the bound, the spare."""
        return (self.pre.length, sink_step(self.engine.arch.max_position_embeddings), self.bound, self.spare)

    def _inputs(self, tokens: np.ndarray, guesses: np.ndarray | None = None) -> list[np.ndarray]:
        """This pass's [rows, T] host columns: ids, positions, slots, key sets (a, b, c), and
        the local layers' own slots and key sets when they have their own ring."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(self.rows, -1)
        T = tokens.shape[1]
        k = np.zeros(self.rows, dtype=np.int64) if guesses is None else np.asarray(guesses, dtype=np.int64)
        if T > self.spare + 1 or (k > T - 1).any():
            raise ValueError(f"a pass of {T} columns with {self.spare} spare slots and guesses {k.max()}")
        if (k > 0).any() and (k > self.room(np.arange(self.rows))).any():
            raise ValueError("a guess past the cache's linear phase, the bound or a move of the prefix")
        pos = self.position
        self._place(np.arange(self.rows))
        col = np.arange(T)
        real = col[None, :] <= k[:, None]
        at = np.where(real, pos[:, None] + col, pos[:, None])
        out = [tokens, at, *self._keys(at, real, self.ring, self.window)]
        if self.local_ring is not None:
            out += self._keys(at, real, self.local_ring, self.local_window)
        return out

    def _keys(self, at: np.ndarray, real: np.ndarray, ring: int, window: int) -> list[np.ndarray]:
        """Slots and key sets (a, b, c) of the queries at positions ``at`` in a ring of ``ring``
        slots after the prefix (positions >= P go to P + (pos - P) mod ring: linear until used).

        A query at q writes its own position's slot and reads the prefix [0, P) and the window's
        slots, positions max(P, q - window + 1) .. q; where those wrap around the ring,
        [0, hi] + [lo, P + ring).  A padding column writes a scratch slot past the ring and
        reads slot 0 only."""
        P = self.pre.length
        lo, hi = P + (np.maximum(P, at - window + 1) - P) % ring, P + (at - P) % ring
        wrap = lo > hi
        a, b, c = np.where(wrap, hi + 1, P), lo, np.where(wrap, P + ring, hi + 1)
        scratch = P + ring + np.arange(at.shape[1]) - 1
        slot = np.where(real, hi, scratch)
        a, b, c = np.where(real, a, 0), np.where(real, b, 0), np.where(real, c, 1)
        return [slot, a, b, c]

    def _forward(self, ids, pos, slot, a, b, c, *local) -> tuple[torch.Tensor, torch.Tensor]:
        """The engine's pass over this pass's columns (as tensors), the local layers' keys with them."""
        return self.engine.forward(ids, pos, self.cache, slot, (a, b, c), bound=self.bound,
                                   local=(local[0], tuple(local[1:])) if local else None)

    def _moved(self, live: np.ndarray | None) -> None:
        self.position = self.position + (1 if live is None else np.asarray(live, dtype=np.int64))

    def skip(self, rows, n) -> None:
        """Move ``rows`` on by ``n`` more positions each: the guesses of the last pass that held."""
        self.position[np.asarray(rows, dtype=np.int64)] += np.asarray(n, dtype=np.int64)

    def skip_decoded(self, decoded: np.ndarray, live: np.ndarray) -> int:
        """:meth:`skip` every row by the tokens it decoded from the last pass, less the one the pass moved it
        (``decoded`` [rows], left zero); ``live`` [rows] gets the rows that decoded any.  Returns the tokens
        decoded."""
        return skip_decoded(decoded, self.position, live)

    def advance(self, tokens: np.ndarray, live: np.ndarray | None = None, guesses: np.ndarray | None = None) -> None:
        """Feed one token per row (``tokens`` [rows] or [rows, T]: the token, then its guesses);
        the next hidden rows land in ``self.h`` / ``self.e`` (row r's column j at r * T + j).
        Rows where ``live`` is False keep their position (default: every row moves one on)."""
        inputs = [torch.from_numpy(v) for v in self._inputs(tokens, guesses)]
        self.h, self.e = self._forward(*inputs)
        self.T = inputs[0].shape[1]
        self._moved(live)


class GraphStep(RowStep):
    """:class:`RowStep` with static shapes, like gpt-fast's ``setup_caches``: the cache
    (``rows`` x ``context`` slots, plus ``spare`` for guesses) and the step's inputs are
    allocated once per pass width T (1 + guesses: one set of [rows, T] inputs and, on
    CUDA, one graph per width used); a step only ``copy_``s the host columns into them
    and, on CUDA, replays the CUDA graph of the forward pass captured at the width's first
    step (``graph=False``: eager, the same static-shape step; on CPU always).  Prefix
    moves (``_place``) are cache copies between replays.  ``.h`` / ``.e`` are the graph's
    static outputs: read them (or copy) before the next :meth:`advance`.
    """

    def __init__(self, engine: Engine, pre: Prefix, rows: int, context: int, longest: int,
                 graph: bool | None = None, spare: int = 0, own_local: bool = True):
        super().__init__(engine, pre, rows, context, longest, capacity=context, spare=spare, own_local=own_local)
        self.graph = (engine.device.type == "cuda") if graph is None else graph
        self._static: dict[int, list[torch.Tensor]] = {}     # per width T: RowStep._inputs' columns
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _buffers(self, T: int, n: int) -> list[torch.Tensor]:
        got = self._static.get(T)
        if got is None:
            dev = self.engine.device
            got = self._static[T] = [torch.zeros((self.rows, T), dtype=torch.int64, device=dev) for _ in range(n)]
        return got

    def _replay_forward(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._forward(*self._static[T])

    def _capture(self, T: int) -> None:
        """Warm up on a side stream (allocator, lazy tables), then capture one step of width T."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._replay_forward(T)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._outs[T] = self._replay_forward(T)
        self._graphs[T] = graph

    def advance(self, tokens: np.ndarray, live: np.ndarray | None = None, guesses: np.ndarray | None = None) -> None:
        """:meth:`RowStep.advance` on the static inputs of the pass's width."""
        inputs = self._inputs(tokens, guesses)
        T = inputs[0].shape[1]
        for buf, v in zip(self._buffers(T, len(inputs)), inputs, strict=True):
            buf.copy_(torch.from_numpy(v))
        if not self.graph:
            self.h, self.e = self._replay_forward(T)
        else:
            if T not in self._graphs:
                self._capture(T)     # its warm-up steps rewrite this step's slots with the same values
            self._graphs[T].replay()
            self.h, self.e = self._outs[T]
        self.T = T
        self._moved(live)
