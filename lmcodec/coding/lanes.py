"""The decoder's running streams as arrays: a pass's bookkeeping in a few compiled calls, not a loop per lane.

A pass of the scheduled decoder (:class:`~lmcodec.coding.rowdecode.Rows`) does, for every live lane of
every running stream: find where each output of its row is among the gaps, pick the lanes of the
streams that decode column ``j``, record the decoded symbols (the segment's symbol, the token fed
next, whether the guess after it held), then limit and write the next pass's guesses.  Done with
Python objects per stream and lane that was hundreds of microseconds a pass; here each step is one
call over these arrays, whatever the number of streams.

:class:`RunningLanes` holds the scheduler's running streams (in its order) as a struct of arrays:

==========  ==============  ==================================================================
name        shape           contents
==========  ==============  ==================================================================
stream      [n]             the stream's index (its payload, its coder's row in the bank)
rows        [n, L]          lane i's batch row (-1: an empty segment, never live)
lengths     [n, L]          lane i's tokens
segs        [n, L]          lane i's segment (where its symbols go)
step        [n]             tokens each live lane has decoded (lane i is live while step < its length)
==========  ==============  ==================================================================

``step`` is the truth while streams run; the scheduler's :class:`~lmcodec.coding.schedule.Running`
objects are told (:meth:`~lmcodec.coding.schedule.Scheduler.jump`) only when a lane ends, which is
when rows are freed.  The arrays are rebuilt when a stream starts or finishes.  Nothing here
decides a symbol: the coders do, in the same order as before (a stream's live lanes in lane order,
column by column).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..engine.cpu.jit import JIT, njit
from .schedule import Running
from .steps import room_of


class RunningLanes:
    """The running streams of a :class:`~lmcodec.coding.schedule.Scheduler` as arrays (module docstring)."""

    def __init__(self, running: Sequence[Running], groups: Sequence[range]):
        self.runs = list(running)
        n = len(self.runs)
        L = max((len(r.lengths) for r in self.runs), default=1)
        self.stream = np.array([r.stream for r in self.runs], dtype=np.int64)
        self.rows = np.full((n, L), -1, dtype=np.int64)
        self.lengths = np.zeros((n, L), dtype=np.int64)
        self.segs = np.zeros((n, L), dtype=np.int64)
        self.step = np.array([r.step for r in self.runs], dtype=np.int64)
        for k, r in enumerate(self.runs):
            m = len(r.lengths)
            self.rows[k, :m] = r.rows
            self.lengths[k, :m] = r.lengths
            self.segs[k, :m] = np.asarray(groups[r.stream], dtype=np.int64)
        self.every = np.arange(n, dtype=np.int64)
        self.ended = np.zeros(n, dtype=bool)        # streams a lane of which ended this pass

    def sync(self) -> None:
        """Write each stream's step back to its ``Running`` (before the arrays are rebuilt from them); a
        stream whose lane ended must have been :meth:`~lmcodec.coding.schedule.Scheduler.jump`'ed first."""
        for k, run in enumerate(self.runs):
            run.step = int(self.step[k])

    def __len__(self) -> int:
        return len(self.runs)

    def gaps(self, width: np.ndarray, T: int, where: np.ndarray) -> np.ndarray:
        """The rows of the last pass's outputs that live lanes may use, ``row * T + j`` for
        ``j < width[row]``, in stream, lane, column order; ``where[row, j]`` gets each one's index."""
        return gap_index(self.rows, self.lengths, self.step, width, T, where)

    def column(self, active: np.ndarray, j: int, where: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The live lanes of the streams ``active`` (indexes into the arrays) at output ``j``:
        (their gaps' indexes, each stream's span of them, the lane of each, its row)."""
        return column(active, j, self.rows, self.lengths, self.step, where)


@njit(**JIT)
def gap_index(rows, lengths, step, width, T, where):  # pragma: no cover - compiled
    m = 0
    for k in range(rows.shape[0]):
        for i in range(rows.shape[1]):
            if step[k] < lengths[k, i]:
                m += width[rows[k, i]]
    idx = np.empty(m, np.int64)
    m = 0
    for k in range(rows.shape[0]):
        for i in range(rows.shape[1]):
            if step[k] < lengths[k, i]:
                r = rows[k, i]
                for j in range(width[r]):
                    where[r, j] = m
                    idx[m] = r * T + j
                    m += 1
    return idx


@njit(**JIT)
def column(active, j, rows, lengths, step, where):  # pragma: no cover - compiled
    m = 0
    for a in range(active.shape[0]):
        k = active[a]
        for i in range(rows.shape[1]):
            if step[k] < lengths[k, i]:
                m += 1
    at = np.empty(m, np.int64)
    lane = np.empty(m, np.int64)
    row = np.empty(m, np.int64)
    spans = np.empty(active.shape[0] + 1, np.int64)
    spans[0] = 0
    m = 0
    for a in range(active.shape[0]):
        k = active[a]
        for i in range(rows.shape[1]):
            if step[k] < lengths[k, i]:
                r = rows[k, i]
                at[m] = where[r, j]
                lane[m] = i
                row[m] = r
                m += 1
        spans[a + 1] = m
    return at, spans, lane, row


#: A pass's record (``out``, int64): guesses tried, held, symbols logged, status (-1, or the stream whose
#: payload failed), lanes ended.  :func:`settle_stream` adds to it.
TRIED, HELD, LOGGED, STATUS, ENDED = range(5)


def new_record() -> np.ndarray:
    return np.array([0, 0, 0, -1, 0], dtype=np.int64)


@njit(inline="always", **JIT)
def record(x, r, at, j, flat, feed, width, decoded, vocab, placeholder):  # pragma: no cover - compiled
    """One lane's decoded symbol ``x`` (row ``r``, output ``j``): the segment's symbol (``flat[at]``), the
    token fed next (column 0 of the row), the row's decoded count.  Returns 0 where no guess was fed
    after output ``j``, 1 where it held, 2 where it missed."""
    flat[at] = x
    fed = x if x < vocab else placeholder
    feed[r, 0] = fed
    decoded[r] += 1
    if j + 1 >= width[r]:
        return 0
    return 1 if feed[r, j + 1] == fed else 2


@njit(inline="always", **JIT)
def goes_on(k, lengths, step):  # pragma: no cover - compiled
    """Whether stream ``k`` has a lane live at its step."""
    for i in range(lengths.shape[1]):
        if step[k] < lengths[k, i]:
            return True
    return False


@njit(inline="always", **JIT)
def settle_stream(k, symbols, lane, j, rows, segs, lengths, step, flat, base, feed, width, decoded, alphabet, vocab,
                  placeholder, ended, log, out):  # pragma: no cover - compiled
    """Record stream ``k``'s symbols of output ``j`` (``symbols[m]`` of its live lane ``lane[m]``, in lane order)
    with :func:`record`, and each (row, symbol) in ``log`` [2, *] after the ``out[LOGGED]`` already there;
    add the counts to ``out``, set ``ended[k]`` where a lane ended, move the stream's step on.  Returns 1
    where the stream decodes output ``j + 1`` next (every live lane's guess held and a lane goes on), 0
    where it does not, -1 for a symbol outside the alphabet (nothing recorded past it)."""
    t = step[k]
    every = True
    x = out[LOGGED]
    for m in range(symbols.shape[0]):
        y = symbols[m]
        if y < 0 or y >= alphabet:
            return -1
        i = lane[m]
        r = rows[k, i]
        h = record(y, r, base[segs[k, i]] + t, j, flat, feed, width, decoded, vocab, placeholder)
        out[TRIED] += h > 0
        out[HELD] += h == 1
        every &= h == 1
        if t + 1 >= lengths[k, i]:
            ended[k] = True
            out[ENDED] += 1
        log[0, x] = r
        log[1, x] = y
        x += 1
    out[LOGGED] = x
    step[k] = t + 1
    return 1 if every and goes_on(k, lengths, step) else 0


@njit(inline="always", **JIT)
def live_lanes(k, j, rows, lengths, step, where, at, lane):  # pragma: no cover - compiled
    """Stream ``k``'s live lanes at its step into ``lane``, and where output ``j`` of each one's row is among
    the gaps into ``at``; returns how many."""
    n = 0
    for i in range(rows.shape[1]):
        if step[k] < lengths[k, i]:
            at[n] = where[rows[k, i], j]
            lane[n] = i
            n += 1
    return n


@njit(**JIT)
def settle(symbols, active, spans, lane, stream, rows, segs, lengths, step, j, flat, base, feed, width, decoded,
           alphabet, vocab, placeholder, going, ended, log, out):  # pragma: no cover - compiled
    """:func:`settle_stream` for each of the streams ``active`` (stream ``active[a]``'s symbols and lanes are
    ``spans[a]:spans[a + 1]`` of ``symbols`` and ``lane``).  ``going`` receives the streams that decode
    output ``j + 1``; returns how many.  A symbol outside the alphabet sets ``out[STATUS]`` to its stream
    (``stream[k]``, its payload's index, as the decode passes set it)."""
    n = 0
    for a in range(active.shape[0]):
        k = active[a]
        lo, hi = spans[a], spans[a + 1]
        g = settle_stream(k, symbols[lo:hi], lane[lo:hi], j, rows, segs, lengths, step, flat, base, feed, width,
                          decoded, alphabet, vocab, placeholder, ended, log, out)
        if g < 0:
            out[STATUS] = stream[k]
            return 0
        if g:
            going[n] = k
            n += 1
    return n


@njit(**JIT)
def guess_limits(rows, lengths, step, position, P, q, bound, spare, most):  # pragma: no cover - compiled
    """Every running stream's live lanes (rows, in stream and lane order, with each stream's span) and
    the guesses each may take next pass: its stream's least room (:func:`~lmcodec.coding.steps.room_of`
    of the row's ``position`` and the step's limits), at most ``most``, and fewer than the tokens its
    shortest live lane has left (the lanes move together)."""
    n = rows.shape[0]
    m = 0
    for k in range(n):
        for i in range(rows.shape[1]):
            if step[k] < lengths[k, i]:
                m += 1
    live = np.empty(m, np.int64)
    limit = np.empty(m, np.int64)
    spans = np.empty(n + 1, np.int64)
    spans[0] = 0
    m = 0
    for k in range(n):
        lo = most
        first = m
        for i in range(rows.shape[1]):
            if step[k] < lengths[k, i]:
                r = rows[k, i]
                lo = min(lo, room_of(position[r], P, q, bound, spare), lengths[k, i] - step[k] - 1)
                live[m] = r
                m += 1
        for x in range(first, m):
            limit[x] = max(0, lo)
        spans[k + 1] = m
    return live, spans, limit


@njit(**JIT)
def fed_guesses(live, width, out):  # pragma: no cover - compiled
    """The guesses each row is fed next pass, ``out[r]`` = ``width[r] - 1`` where ``live[r]``, else 0 (what
    :meth:`~lmcodec.coding.steps.RowStep.advance` checks against its room); returns the live rows."""
    n = 0
    for r in range(live.shape[0]):
        out[r] = width[r] - 1 if live[r] else 0
        n += live[r]
    return n


@njit(**JIT)
def write_guesses(rows, spans, counts, guesses, T, feed, width, vocab, placeholder):  # pragma: no cover
    """Feed stream k's lanes (``rows[spans[k]:spans[k + 1]]``) their first ``min(T - 1, counts[k])``
    guesses (tokens outside the vocabulary as the placeholder) after column 0; set their widths."""
    for k in range(spans.shape[0] - 1):
        c = min(T - 1, counts[k])
        for m in range(spans[k], spans[k + 1]):
            r = rows[m]
            for q in range(c):
                g = guesses[m, q]
                feed[r, 1 + q] = g if g < vocab else placeholder
            width[r] = 1 + c
