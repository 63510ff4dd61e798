"""Guesses for exact speculative decoding: what to guess, how far, and when it pays.

The decoder (:mod:`lmcodec.coding.rowdecode`) may feed a row its last decoded
token plus k guessed tokens in one model pass; the exact engine gives the
same frequencies as k + 1 single steps (docs/ENGINE.md), so every guess that
holds saves a pass and a wrong one costs only its share of the pass.  Guesses
never enter the archive: nothing here changes a decoded symbol, only how many
passes the decoder makes, so these heuristics may use floats and timings.

* :class:`LaneDraft` proposes the tokens that followed the longest earlier
  occurrence (2 to :data:`LONGEST` tokens) of a lane's last tokens, in the
  prefix (start token, prompt or dictionary primer) or the lane itself:
  records, code and repeated passages repeat; prose rarely does.
* :class:`Acceptance` counts how often a guess held, by the match length and
  the guess's place, so a draft is only believed as far as it has been right.
  Every proposal is scored against the tokens decoded after it, fed or not
  (:meth:`LaneDraft.watch`): counting only the guesses fed would be a trap, one
  early miss making a draft look too poor to be fed again, and so never again
  measured (records decoded at 1.1 tokens a pass where their drafts hold 86-98%).
* :class:`PassCost` times the passes by their width, and
  :func:`choose_width` picks the columns per pass that decode the most tokens
  per second by those two measurements: a row guesses only where the expected
  gain beats the pass's measured extra cost, so prose is not made slower.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .settings import MOST_GUESSES

SHORTEST = 2        # tokens of context a draft's match needs
LONGEST = 8         # longer matches are looked for up to this many tokens
#: The prompt's bytes a draft copies from (its last ones; the model sees fewer).
DRAFT_PROMPT_BYTES = 1 << 20


class PrefixIndex:
    """Where each run of 2..:data:`LONGEST` tokens of the prefix last occurred (built once a decode)."""

    def __init__(self, ids: Sequence[int]):
        self.ids = [int(x) for x in ids]
        self.index: dict[int, dict[tuple, int]] = {n: {} for n in range(SHORTEST, LONGEST + 1)}
        for e in range(len(self.ids)):
            _note(self.index, self.ids, e)

    def lane(self, accept: "Acceptance | None" = None) -> "LaneDraft":
        return LaneDraft(self, accept)


def _note(index: dict[int, dict[tuple, int]], seq: list[int], e: int) -> None:
    """Index the runs that end just before position ``e``: each maps to ``e`` (what followed)."""
    for n in range(SHORTEST, min(LONGEST, e) + 1):
        index[n][tuple(seq[e - n:e])] = e


class LaneDraft:
    """One lane's draft: the prefix and the lane's symbols so far, indexed by their runs (the
    lane's own runs here, the prefix's shared: a long primer is not copied per lane).
    ``accept``, where given, scores every watched proposal as the lane's symbols arrive."""

    def __init__(self, prefix: PrefixIndex, accept: "Acceptance | None" = None):
        self.prefix, self.accept = prefix, accept
        self.seq = list(prefix.ids)
        self.index: dict[int, dict[tuple, int]] = {n: {} for n in prefix.index}
        self.watched: list[tuple[int, list[int], int]] = []    # (where it starts, guesses, match length)

    def push(self, symbol: int) -> None:
        """The lane decoded ``symbol``: score the watched proposals that reach it."""
        at, x = len(self.seq), int(symbol)
        _note(self.index, self.seq, at)
        self.seq.append(x)
        if self.watched:
            self.watched = [w for w in self.watched if self._score(w, at, x)]

    def watch(self, guesses: Sequence[int], length: int) -> None:
        """Score ``guesses`` (a proposal for the lane's next symbols, whether fed or not, from a
        match of ``length``) against the symbols to come: place j counts as tried when
        places 1 .. j - 1 held, as :class:`Acceptance` defines its rates."""
        if self.accept is not None and len(guesses):
            self.watched.append((len(self.seq), [int(g) for g in guesses], length))

    def _score(self, watched: tuple[int, list[int], int], at: int, x: int) -> bool:
        """Record the place of ``watched`` that the symbol ``x`` at ``at`` decides; True while it goes on."""
        start, guesses, length = watched
        place = at - start + 1
        held = guesses[place - 1] == x
        self.accept.record(length, place, held)
        return held and place < len(guesses)

    def propose(self, most: int) -> tuple[list[int], int]:
        """Up to ``most`` symbols that followed the longest earlier occurrence of the lane's
        last tokens (the latest such, the lane's own before the prefix's), and that
        occurrence's length (0 and no symbols without one)."""
        seq, end = self.seq, len(self.seq)
        if most <= 0:
            return [], 0
        for n in range(min(LONGEST, end), SHORTEST - 1, -1):
            key = tuple(seq[end - n:])
            at = self.index[n].get(key)
            if at is None:
                at = self.prefix.index[n].get(key)
            if at is not None:
                return seq[at:at + most], n
        return [], 0


class Acceptance:
    """How often a guess held: per match length and place j (guess j is tried only when
    guesses 1 .. j-1 held, so these are conditional rates; Laplace's rule, 1/2 untried)."""

    def __init__(self, most: int = MOST_GUESSES):
        self.tried = np.zeros((LONGEST + 1, most + 1), dtype=np.int64)
        self.held = np.zeros_like(self.tried)

    def record(self, length: int, place: int, held: bool) -> None:
        self.tried[length, place] += 1
        self.held[length, place] += held

    def chances(self, length: int, count: int) -> np.ndarray:
        """The probability that guesses 1 .. j all hold, for j = 1 .. ``count``."""
        rate = (self.held[length, 1:count + 1] + 1) / (self.tried[length, 1:count + 1] + 2)
        return np.cumprod(rate)


class PassCost:
    """Seconds a pass takes by its queries (rows x columns), measured as the decode goes:
    a moving average per query count, and a line through them for counts not yet run.
    Before two counts have been seen, one more query is assumed to cost ``prior`` of a
    one-query pass. The prior is optimistic on purpose (measured with the fused step on a
    2-core EPYC: 0.42 with a few cached keys, 0.57 with 1,500): a width's cost is known only
    once a pass of it has run, and a pessimistic prior would keep passes at one column where
    guesses hold and wide passes pay (a tiny model's passes cost nearly the same at any width)."""

    def __init__(self, prior: float = 0.08, decay: float = 0.8):
        self.prior, self.decay = prior, decay
        self.seen: dict[int, float] = {}
        self._slope: float | None = None     # the line's slope, fitted again after a record

    def record(self, queries: int, seconds: float) -> None:
        old = self.seen.get(queries)
        self.seen[queries] = seconds if old is None else self.decay * old + (1 - self.decay) * seconds
        self._slope = None

    def estimate(self, queries: int) -> float:
        if queries in self.seen:
            return self.seen[queries]
        seen = self.seen
        if len(seen) >= 2:
            if self._slope is None:
                self._slope = max(0.0, _slope(seen))
            near = min(seen, key=lambda q: abs(q - queries))
            return max(1e-9, seen[near] + self._slope * (queries - near))
        if len(seen) == 1:
            (q, t), = seen.items()
            one = t / (1 + self.prior * (q - 1))
            return one * (1 + self.prior * (queries - 1))
        return 1 + self.prior * (queries - 1)


def _slope(points: dict[int, float]) -> float:
    """The least-squares slope of seconds against queries (a few points: plain floats, no array per pass)."""
    n = len(points)
    mq = sum(points) / n
    mt = sum(points.values()) / n
    var = sum((q - mq) ** 2 for q in points)
    return sum((q - mq) * (t - mt) for q, t in points.items()) / var if var else 0.0


def choose_width(live: int, rows: int, chances: Sequence[np.ndarray], cost: PassCost, most: int) -> int:
    """Columns for the next pass (1 = no guesses): the T that maximizes expected tokens
    decoded per second, ``(live + sum of every stream's chances up to T - 1) / cost(rows T)``.
    ``chances`` holds, per stream, the expected tokens each further guess adds (its lanes
    times the probability that its guesses up to there all hold); ``rows`` counts every
    row the pass computes, idle ones too."""
    longest = min(most, max((len(c) for c in chances), default=0))
    best, best_rate = 1, live / cost.estimate(rows)
    gained = float(live)
    for T in range(2, longest + 2):
        gained += sum(float(c[T - 2]) for c in chances if len(c) >= T - 1)
        rate = gained / cost.estimate(rows * T)
        if rate > best_rate:
            best, best_rate = T, rate
    return best
