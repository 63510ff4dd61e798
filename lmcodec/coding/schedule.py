"""Which stream decodes in which batch row, step by step: keep the batch full.

The decoder advances ``rows`` batch rows together, one token per row per step
(or, verifying guesses, several: :meth:`Scheduler.advance_stream` moves one stream).
The unit it admits is a *stream* (container.stream_groups): its segments are
the lanes of one range-coded payload, and :class:`~lmcodec.coding.mixing.StreamMixer`
needs every live lane at step t before any lane takes step t + 1, so a
stream's lanes start together, each in its own row, and advance together.
When one of its segments ends, that segment's row is free at once; another
stream takes free rows as soon as there are enough for all its segments.
Streams from any blocks (and, through the caller, files) share the rows.

Host-only (no torch): the scheduler deals in row numbers and step counts, the
decoder in tensors.  Deterministic: the same lengths, rows and order give the
same assignment every time.  The order of admission never changes what a
stream decodes to (streams are independent), only how full the batch is.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Running:
    """A stream in the batch: ``rows[i]`` carries its lane i until ``lengths[i]`` steps are done."""

    stream: int
    lengths: tuple[int, ...]
    rows: tuple[int, ...]
    step: int = 0                      # tokens each live lane has decoded so far

    @property
    def live(self) -> list[int]:
        """Lanes that still decode a token at this step (in lane order: the mixer's order)."""
        return [i for i, n in enumerate(self.lengths) if self.step < n]

    @property
    def live_rows(self) -> list[int]:
        return [self.rows[i] for i in self.live]

    @property
    def done(self) -> bool:
        return self.step >= max(self.lengths, default=0)


@dataclass
class Scheduler:
    """Admits streams into ``rows`` batch rows in ``order`` (default: stream order), FIFO.

    ``lengths[s]`` are the token counts of stream s's segments (its lanes).  A
    stream waits until as many rows as it has segments are free; streams never
    overtake one another (first come, first served), so a wide stream is not
    starved by narrow ones.  Empty segments take no row; a stream with no tokens
    at all is finished at admission without taking any.
    """

    lengths: Sequence[Sequence[int]]
    rows: int
    order: Sequence[int] | None = None
    running: list[Running] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        order = list(range(len(self.lengths))) if self.order is None else list(self.order)
        if sorted(order) != list(range(len(self.lengths))):
            raise ValueError("order must be a permutation of the streams")
        for s, lens in enumerate(self.lengths):
            if sum(1 for n in lens if n > 0) > self.rows:
                raise ValueError(f"stream {s} has more segments than the {self.rows} rows")
            if any(n < 0 for n in lens):
                raise ValueError(f"stream {s} has a negative length")
        self._waiting = deque(order)
        self._free = list(range(self.rows - 1, -1, -1))    # a stack: the lowest row is handed out first

    @property
    def done(self) -> bool:
        return not self._waiting and not self.running

    @property
    def free_rows(self) -> list[int]:
        return sorted(self._free)

    def admit(self) -> list[Running]:
        """Start every waiting stream that fits now, in order; return the ones started.

        Call before each step: a started stream's rows begin at step 0 (the
        caller resets them to the prefix).
        """
        started = []
        while self._waiting:
            s = self._waiting[0]
            lens = tuple(int(n) for n in self.lengths[s])
            need = sum(1 for n in lens if n > 0)
            if need > len(self._free):
                break
            self._waiting.popleft()
            rows = tuple(self._free.pop() if n > 0 else -1 for n in lens)
            run = Running(s, lens, rows)
            if run.done:
                self.finished.append(s)
                continue
            self.running.append(run)
            started.append(run)
        return started

    def advance(self) -> list[int]:
        """Every running stream's live lanes took one step: free the rows of segments that
        ended and retire finished streams; return the rows freed."""
        freed = []
        for run in list(self.running):
            freed += self.advance_stream(run)
        return freed

    def advance_stream(self, run: Running) -> list[int]:
        """One stream's live lanes took one step (a guess-and-verify pass moves streams by
        different counts): free the rows of its segments that ended, retire it if it is
        done; return the rows freed."""
        return self.jump(run, run.step + 1)

    def jump(self, run: Running, step: int) -> list[int]:
        """One stream's live lanes are at ``step`` now (``run.step`` or later: the decoder keeps
        steps in arrays and reports a stream when one of its lanes ended): free the rows of its
        segments that ended since ``run.step``, retire it if it is done; return the rows freed."""
        if step < run.step:
            raise ValueError("a stream's step never goes back")
        freed = [run.rows[i] for i in run.live if step >= run.lengths[i]]
        run.step = step
        if run.done:
            self.running.remove(run)
            self.finished.append(run.stream)
        self._free.extend(freed)
        self._free.sort(reverse=True)
        return freed

    def busy_rows(self) -> int:
        """Rows carrying a live lane at this step (the batch's fill)."""
        return sum(len(r.live) for r in self.running)
