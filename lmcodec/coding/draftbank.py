"""The decoder's drafts (:mod:`lmcodec.coding.draft`) as numba code on arrays: every lane of one decode in
one :class:`DraftBank`, each method one compiled call for all the lanes it is given.

:class:`~lmcodec.coding.draft.LaneDraft` (with :class:`~lmcodec.coding.draft.PrefixIndex` and
:class:`~lmcodec.coding.draft.Acceptance`) is the definition and the tests' oracle: :meth:`DraftBank.propose`
returns its tokens and match lengths, :meth:`DraftBank.push` and :meth:`DraftBank.watch` score the same
proposals into the same ``tried``/``held`` counts.  Guesses never change a decoded symbol, only how many
passes a decode makes; the bank exists because the Python classes spend several microseconds a token on
bookkeeping (tuples keyed into dicts, the prefix copied per lane).

A lane's sequence is ``prefix + its symbols``; positions count from the prefix's first token, as
``LaneDraft.seq`` does.  A run is ``n`` tokens (:data:`~lmcodec.coding.draft.SHORTEST` <= n <=
:data:`~lmcodec.coding.draft.LONGEST`) ending just before position ``e``; an index maps a run to the
latest such ``e`` (what followed it).

Indexes: open-addressing tables (linear probing, powers of two) of uint64 entries, 0 = empty, else
``check << 32 | rel << 3 | (n - 2)``: ``check`` the top 32 bits of the run's 64-bit hash, ``rel`` its end
(the prefix's table: ``e``; a lane's: ``e - P + 1``, ``P`` the prefix's length; both >= 1).  A hit is
never trusted on the hash: the entry's ``n`` and check bits must agree and then the ``n`` tokens before its
end are compared with the run looked for.  An insert overwrites the entry of the same run (the latest
end wins, as ``dict`` assignment does).  Sizes: a position adds at most ``LONGEST - SHORTEST + 1 = 7``
runs, so a table holds at most 7 entries per position it indexes, and is sized to twice that (load <= 1/2;
it never grows or fills): the prefix's ``next_pow2(14 P)`` entries, a lane's ``next_pow2(14 room)``.

Layout (``slots`` lanes at most at a time, each at most ``room`` symbols; ``R`` the watch ring, ``M``
the most guesses):

=========  ===========================  =================================================================
name       shape, dtype                 contents
=========  ===========================  =================================================================
pre        [P] int32                    the prefix's tokens (:class:`PrefixTable`, shared, built once)
ptab       [Sp] uint64                  the prefix's runs (:class:`PrefixTable`)
ltok       [slots * room] int32         lane ``s``'s symbols at ``ltok[s * room:]``
ltab       [slots * Sl] uint64          lane ``s``'s runs at ``ltab[s * Sl:]`` (its first ``mask + 1``)
lst        [slots, 4] int64             per slot: symbols so far, its table's mask, its room, watched
ring       [slots, R, 3 + M] int64      per slot its watched proposals, oldest first: (start, guesses,
                                        match length, the guesses ...)
acc        [2, LONGEST + 1, M + 1]      tried, held (:class:`~lmcodec.coding.draft.Acceptance`'s arrays;
           int64                        one table for the decode, every lane's proposals counted in it)
cfg        [6] int64                    P, the prefix table's mask, room, Sl, collide (tests: 4 hashes), M
=========  ===========================  =================================================================

The watch ring's bound: a proposal watched at ``start`` (the lane's length then) with ``g <= M`` guesses
stays alive only while places 1 .. ``end - start`` held and ``end - start < g`` (``end`` the lane's length
now; :meth:`LaneDraft._score` drops it at a miss or its last place), so every live one has ``end - M <
start <= end``: ``M`` starts at most.  Two live proposals share a start only when a lane is watched twice
without a symbol between, which the decoder never does (``Rows._guess`` watches each live lane once a
pass, and every pass decodes at least one symbol of every live lane); ``R = M + 1`` leaves room for one
such, and a watch past ``R`` raises ``ValueError`` rather than forgetting a proposal.

Symbols are kept as int32 (any symbol of an alphabet below 2^31).  Speed (2-core EPYC, 64 lanes of
2,048 symbols, a 1,000-token prefix, one push call per column and one propose(watch) + stream_chances call
per pass): 0.8-1.1 us a token for push + propose + watch + chances, against 10-19 us for LaneDraft; a call
costs 1.5-2 us (push) and 4-5 us (propose + watch) however few its lanes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..engine.cpu.jit import JIT, njit
from .draft import LONGEST, SHORTEST, Acceptance, PrefixIndex
from .settings import MOST_GUESSES

_RUNS = LONGEST - SHORTEST + 1      # runs a position adds to an index
_MOST_POSITIONS = (1 << 29) - 2     # rel fits 29 bits
_H0 = np.uint64(0x243F6A8885A308D3)
_HM = np.uint64(0x9E3779B97F4A7C15)
_F1 = np.uint64(0xBF58476D1CE4E5B9)
_F2 = np.uint64(0x94D049BB133111EB)
_LOW = np.uint64(0xFFFFFFFF)
_ONE = np.uint64(1)

# lst's columns
_LEN = 0
_MASK = 1
_ROOM = 2
_WATCHED = 3


def _table_size(positions: int) -> int:
    """Entries of a table indexing ``positions`` positions (load <= 1/2)."""
    need = max(2, 2 * _RUNS * positions)
    return 1 << (need - 1).bit_length()


# -- compiled ---------------------------------------------------------------------------------------------


@njit(inline="always", **JIT)
def _tok(pre, ltok, P, base, p):  # pragma: no cover - compiled
    """Token ``p`` of the lane whose symbols start at ``ltok[base]``: the prefix's below ``P``."""
    if p < P:
        return pre[p]
    return ltok[base + p - P]


@njit(inline="always", **JIT)
def _hashes(pre, ltok, P, base, end, hs, q, collide):  # pragma: no cover - compiled
    """``hs[n]``: the hash of the run of ``n`` tokens ending before ``end``, n = 2 .. top; ``q[k]``: the
    token at ``end - k``, k = 1 .. top (what a hit is compared with); returns top."""
    top = min(LONGEST, end)
    h = _H0
    lane = end - top >= P
    for k in range(1, top + 1):
        t = ltok[base + end - P - k] if lane else _tok(pre, ltok, P, base, end - k)
        q[k] = t
        h = (h ^ (np.uint64(t) + _ONE)) * _HM
        if k >= SHORTEST:
            z = h ^ (h >> np.uint64(30))
            z *= _F1
            z ^= z >> np.uint64(27)
            z *= _F2
            z ^= z >> np.uint64(31)
            if collide:
                z &= np.uint64(3)
            hs[k] = z
    return top


@njit(inline="always", **JIT)
def _find(tab, off, mask, z, n, shift, q, pre, ltok, P, base):  # pragma: no cover - compiled
    """Where in ``tab`` (a table at ``off``, ``mask``) the run ``q[n], .., q[1]`` (hash ``z``) is (its
    entry), else the empty entry where it would go; and its end there (-1 if none).  An entry's end is its
    ``rel + shift``, its tokens those of the lane at ``base`` (or the prefix); compared token by token."""
    s = np.int64(z & np.uint64(mask))
    chk = z >> np.uint64(32)
    code = np.uint64(n - SHORTEST)
    while True:
        v = tab[off + s]
        if v == 0:
            return off + s, np.int64(-1)
        if (v >> np.uint64(32)) == chk and (v & np.uint64(7)) == code:
            e = np.int64((v & _LOW) >> np.uint64(3)) + shift
            same = True
            if e - n >= P:      # all in the lane (read straight: the branchy _tok costs 4x here)
                a = base + e - P
                for k in range(1, n + 1):
                    if ltok[a - k] != q[k]:
                        same = False
                        break
            elif e <= P:        # all in the prefix
                for k in range(1, n + 1):
                    if pre[e - k] != q[k]:
                        same = False
                        break
            else:
                for k in range(1, n + 1):
                    if _tok(pre, ltok, P, base, e - k) != q[k]:
                        same = False
                        break
            if same:
                return off + s, e
        s = (s + 1) & mask


@njit(inline="always", **JIT)
def _touch(tab, off, mask, hs, top):  # pragma: no cover - compiled
    """Load the first entry each run's probe reads, all at once (independent loads: the misses overlap)."""
    acc = np.uint64(0)
    for n in range(SHORTEST, top + 1):
        acc ^= tab[off + np.int64(hs[n] & np.uint64(mask))]
    return acc


@njit(inline="always", **JIT)
def _entry(z, rel, n):  # pragma: no cover - compiled
    return ((z >> np.uint64(32)) << np.uint64(32)) | (np.uint64(rel) << np.uint64(3)) | np.uint64(n - SHORTEST)


@njit(**JIT)
def _build_prefix(pre, ptab, collide):  # pragma: no cover - compiled
    """PrefixIndex: every run ending before e = 0 .. P - 1, mapped to the latest e."""
    P = pre.shape[0]
    mask = ptab.shape[0] - 1
    hs = np.zeros(LONGEST + 1, np.uint64)
    run = np.zeros(LONGEST + 1, np.int64)
    for e in range(P):
        top = _hashes(pre, pre, P, 0, e, hs, run, collide)
        for n in range(SHORTEST, top + 1):
            at, _ = _find(ptab, 0, mask, hs[n], n, 0, run, pre, pre, P, 0)
            ptab[at] = _entry(hs[n], e, n)


@njit(**JIT)
def _open(ltab, lst, cfg, slots, rooms):  # pragma: no cover - compiled
    room, sl = cfg[2], cfg[3]
    for i in range(slots.shape[0]):
        s = slots[i]
        r = rooms[i]
        if s < 0 or s >= lst.shape[0]:
            raise ValueError("no such draft slot")
        if r < 0 or r > room:
            raise ValueError("a lane's room is over the bank's")
        size = np.int64(2)
        while size < 2 * (LONGEST - SHORTEST + 1) * r:
            size *= 2
        size = min(size, sl)
        lst[s, _LEN] = 0
        lst[s, _MASK] = size - 1
        lst[s, _ROOM] = r
        lst[s, _WATCHED] = 0
        off = s * sl
        ltab[off:off + size] = 0


@njit(**JIT)
def _push(pre, ltok, ltab, lst, ring, acc, cfg, slots, symbols):  # pragma: no cover - compiled
    """LaneDraft.push for each (slot, symbol) in order: index the runs ending at the lane's end, append the
    symbol, score the watched proposals that reach it (keeping those that go on, oldest first)."""
    P, room, sl, collide = cfg[0], cfg[2], cfg[3], cfg[4]
    hs = np.zeros(LONGEST + 1, np.uint64)
    run = np.zeros(LONGEST + 1, np.int64)
    for i in range(slots.shape[0]):
        s = slots[i]
        x = symbols[i]
        if s < 0 or s >= lst.shape[0]:
            raise ValueError("no such draft slot")
        L = lst[s, _LEN]
        if L >= lst[s, _ROOM]:
            raise ValueError("a lane pushed past its room")
        base = s * room
        at = P + L
        top = _hashes(pre, ltok, P, base, at, hs, run, collide)
        off, mask = s * sl, lst[s, _MASK]
        hs[0] ^= _touch(ltab, off, mask, hs, top)
        for n in range(SHORTEST, top + 1):
            where, _ = _find(ltab, off, mask, hs[n], n, P - 1, run, pre, ltok, P, base)
            ltab[where] = _entry(hs[n], L + 1, n)
        ltok[base + L] = x
        lst[s, _LEN] = L + 1
        k = lst[s, _WATCHED]
        kept = 0
        for q in range(k):
            start, g, length = ring[s, q, 0], ring[s, q, 1], ring[s, q, 2]
            place = at - start + 1
            held = ring[s, q, 2 + place] == x
            acc[0, length, place] += 1
            if held:
                acc[1, length, place] += 1
                if place < g:
                    if kept != q:
                        ring[s, kept, :3 + g] = ring[s, q, :3 + g]
                    kept += 1
        lst[s, _WATCHED] = kept


@njit(inline="always", **JIT)
def _occurs(pre, ptab, ltok, ltab, off, mask, pmask, hs, n, run, P, base):  # pragma: no cover - compiled
    """Where the run of ``n`` tokens ending the lane last ended: the lane's latest, else the prefix's; -1."""
    _, e = _find(ltab, off, mask, hs[n], n, P - 1, run, pre, ltok, P, base)
    if e < 0:
        _, e = _find(ptab, 0, pmask, hs[n], n, 0, run, pre, ltok, P, base)
    return e


@njit(inline="always", **JIT)
def _watch_one(lst, ring, P, s, guesses, i, g, length):  # pragma: no cover - compiled
    """LaneDraft.watch: keep row ``i`` of ``guesses`` (``g`` > 0 of them, from a match of ``length``)."""
    if g > ring.shape[2] - 3 or g > guesses.shape[1] or length < 0 or length > LONGEST:
        raise ValueError("a watched proposal outside the acceptance table")
    k = lst[s, _WATCHED]
    if k >= ring.shape[1]:
        raise ValueError("a lane watched more proposals than its ring holds")
    ring[s, k, 0] = P + lst[s, _LEN]
    ring[s, k, 1] = g
    ring[s, k, 2] = length
    for j in range(g):
        ring[s, k, 3 + j] = guesses[i, j]
    lst[s, _WATCHED] = k + 1


@njit(**JIT)
def _propose(pre, ptab, ltok, ltab, lst, ring, cfg, slots, most, guesses, out, watch):  # pragma: no cover
    """LaneDraft.propose for each slot (then LaneDraft.watch where ``watch``): the longest run (LONGEST
    down to SHORTEST) ending the lane that occurred before, the lane's latest occurrence before the
    prefix's; up to ``most[i]`` (``most[0]`` for every row if it has one value) tokens after it, their count
    in ``out[0, i]``, the run's length in ``out[1, i]``.

    The longest run is found by bisection: a run that occurred (ending at ``e``, indexed) has its
    suffixes indexed at ``e`` too (an index holds every run of ``SHORTEST .. min(LONGEST, e)`` tokens ending
    at each of its positions), so "some occurrence of the last ``n`` tokens" holds for every ``n`` up to
    the longest and none above: the longest is tried first (records repeat whole), then the rest bisected:
    4 lookups (each the lane's table, then the prefix's) at most instead of 7."""
    P, pmask, room, sl, collide, top_most = cfg[0], cfg[1], cfg[2], cfg[3], cfg[4], cfg[5]
    hs = np.zeros(LONGEST + 1, np.uint64)
    run = np.zeros(LONGEST + 1, np.int64)
    one = most.shape[0] == 1
    for i in range(slots.shape[0]):
        s = slots[i]
        m = most[0] if one else most[i]
        out[0, i] = 0
        out[1, i] = 0
        if s < 0 or s >= lst.shape[0]:
            raise ValueError("no such draft slot")
        if m > top_most:
            raise ValueError("more guesses asked than the bank keeps")
        if m <= 0:
            continue
        base = s * room
        end = P + lst[s, _LEN]
        top = _hashes(pre, ltok, P, base, end, hs, run, collide)
        if top < SHORTEST:
            continue
        off, mask = s * sl, lst[s, _MASK]
        hs[0] ^= _touch(ltab, off, mask, hs, top) ^ _touch(ptab, 0, pmask, hs, top)
        e = np.int64(-1)
        lo, hi, n = SHORTEST - 1, top + 1, top     # the longest that occurs is >= lo (< SHORTEST: none), < hi
        while hi - lo > 1:
            f = _occurs(pre, ptab, ltok, ltab, off, mask, pmask, hs, n, run, P, base)
            if f >= 0:
                lo, e = n, f
            else:
                hi = n
            n = (lo + hi) // 2
        n = lo
        if e < 0:
            continue
        c = min(m, end - e)
        if e >= P:
            a = base + e - P
            for j in range(c):
                guesses[i, j] = ltok[a + j]
        else:
            for j in range(c):
                guesses[i, j] = _tok(pre, ltok, P, base, e + j)
        out[0, i] = c
        out[1, i] = n
        if watch:
            _watch_one(lst, ring, P, s, guesses, i, c, n)


@njit(**JIT)
def _watch(lst, ring, cfg, slots, guesses, counts, lengths):  # pragma: no cover - compiled
    """LaneDraft.watch for each slot with guesses: keep the proposal (from the lane's end) to be scored."""
    P = cfg[0]
    for i in range(slots.shape[0]):
        s = slots[i]
        if counts[i] <= 0:
            continue
        if s < 0 or s >= lst.shape[0]:
            raise ValueError("no such draft slot")
        _watch_one(lst, ring, P, s, guesses, i, counts[i], lengths[i])


@njit(**JIT)
def _chances(acc, lengths, spans, counts, out):  # pragma: no cover - compiled
    """Per stream k (lanes spans[k] .. spans[k + 1]): ``out[k, :counts[k]]`` = the product over its lanes of
    Acceptance.chances(length, counts[k]), times its lanes (Rows._guess's sum; the same float operations:
    each length's cumulative product once, then the lanes' in order)."""
    top = 0
    for k in range(counts.shape[0]):
        top = max(top, counts[k])
    cum = np.empty((LONGEST + 1, max(top, 1)), np.float64)
    for n in range(LONGEST + 1):
        run = 1.0
        for j in range(top):
            rate = (acc[1, n, j + 1] + 1) / (acc[0, n, j + 1] + 2)
            run = rate if j == 0 else run * rate
            cum[n, j] = run
    for k in range(spans.shape[0] - 1):
        c = counts[k]
        if c <= 0:
            continue
        for j in range(c):
            out[k, j] = 1.0
        for i in range(spans[k], spans[k + 1]):
            n = lengths[i]
            if n < 0 or n > LONGEST:
                raise ValueError("a match length outside the acceptance table")
            for j in range(c):
                out[k, j] = out[k, j] * cum[n, j]
        lanes = spans[k + 1] - spans[k]
        for j in range(c):
            out[k, j] = out[k, j] * lanes


@njit(**JIT)
def _plan(pre, ptab, ltok, ltab, lst, ring, acc, cfg, pushed, symbols, slots, spans, most
          ):  # pragma: no cover - compiled
    """The decoder's drafts after a pass, in one call: :func:`_push` of the pass's symbols (``pushed[i]``'s
    lane decoded ``symbols[i]``, in order), then :func:`_propose` with watch for every live lane (``slots``,
    each with its ``most``), then each stream's count (its lanes' least: they move together; stream k's
    lanes are ``slots[spans[k]:spans[k + 1]]``) and :func:`_chances` for those counts.  Returns
    (guesses [n, max most], (counts, match lengths) [2, n], each stream's count, chances [streams, max most]),
    made here: after a model pass each numpy call from Python costs several microseconds (docs/SPEED.md)."""
    n = slots.shape[0]
    width = 0
    for i in range(n):
        width = max(width, most[i])
    if width > cfg[5]:
        raise ValueError("more guesses asked than the bank keeps")
    guesses = np.zeros((n, width), np.int64)
    out = np.zeros((2, n), np.int64)
    counts = np.zeros(max(0, spans.shape[0] - 1), np.int64)
    table = np.zeros((counts.shape[0], width), np.float64)
    _push(pre, ltok, ltab, lst, ring, acc, cfg, pushed, symbols)
    _propose(pre, ptab, ltok, ltab, lst, ring, cfg, slots, most, guesses, out, True)
    for k in range(spans.shape[0] - 1):
        c = np.int64(1) << 62
        for i in range(spans[k], spans[k + 1]):
            c = min(c, out[0, i])
        counts[k] = c if spans[k + 1] > spans[k] else 0
    _chances(acc, out[1], spans, counts, table)
    return guesses, out, counts, table


# -- Python -------------------------------------------------------------------------------------------------


def _int64(a: np.ndarray) -> np.ndarray:
    """``a`` as int64 (the compiled calls' one signature); the decoder's arrays already are, and pass as they are."""
    return a if isinstance(a, np.ndarray) and a.dtype == np.int64 else np.asarray(a, dtype=np.int64)


class PrefixTable:
    """:class:`~lmcodec.coding.draft.PrefixIndex` as arrays: the prefix's tokens and where each of its runs
    last ended.  Built once per prefix (or prompt) and shared by every :class:`DraftBank` made from it."""

    def __init__(self, ids: Sequence[int] | np.ndarray | PrefixIndex, *, collide: bool = False):
        if isinstance(ids, PrefixIndex):
            ids = ids.ids
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) > _MOST_POSITIONS:
            raise ValueError("a draft prefix too long to index")
        if len(ids) and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
            raise ValueError("draft tokens are kept as int32")
        self.ids = np.ascontiguousarray(ids.astype(np.int32))
        self.collide = bool(collide)
        self.table = np.zeros(_table_size(len(self.ids)), dtype=np.uint64)
        _build_prefix(self.ids, self.table, self.collide)

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.table.nbytes


class DraftBank:
    """Every lane's draft of one decode, struct of arrays (layout: the module's docstring).

    ``prefix``: a :class:`PrefixTable` (shared, not copied) or the prefix's ids; ``slots``: lanes alive at
    once at most; ``lane_room``: the most symbols a lane takes (the longest segment; :meth:`open` may give
    a lane less, which sizes and clears only that much of its table); ``most``: the most guesses a
    proposal holds (the acceptance table's places, :class:`~lmcodec.coding.draft.Acceptance`).
    :attr:`accept` is an ``Acceptance`` whose ``tried``/``held`` are the bank's counts.

    Memory: per slot ``4 room`` bytes of symbols and ``8 next_pow2(14 room)`` of table (1 MiB for 8,192
    symbols), plus ``8 (R (3 + M) + 4)`` of ring and state.
    """

    def __init__(self, prefix: PrefixTable | Sequence[int] | np.ndarray, slots: int, lane_room: int,
                 most: int = MOST_GUESSES, *, watch_room: int | None = None, collide: bool = False):
        if not isinstance(prefix, PrefixTable):
            prefix = PrefixTable(prefix, collide=collide)
        if lane_room < 0 or lane_room > _MOST_POSITIONS or slots < 0 or most < 0:
            raise ValueError("a draft bank's sizes out of range")
        self.prefix = prefix
        self.slots, self.room, self.most = int(slots), int(lane_room), int(most)
        sl = _table_size(self.room)
        self.ltok = np.zeros(self.slots * self.room, dtype=np.int32)
        self.ltab = np.zeros(self.slots * sl, dtype=np.uint64)
        self.lst = np.zeros((self.slots, 4), dtype=np.int64)
        R = self.most + 1 if watch_room is None else int(watch_room)
        self.ring = np.zeros((self.slots, R, 3 + self.most), dtype=np.int64)
        self.acc = np.zeros((2, LONGEST + 1, self.most + 1), dtype=np.int64)
        self.accept = Acceptance(self.most)
        self.accept.tried, self.accept.held = self.acc[0], self.acc[1]
        self.cfg = np.array([len(prefix.ids), len(prefix.table) - 1, self.room, sl, int(prefix.collide),
                             self.most], dtype=np.int64)

    @property
    def tried(self) -> np.ndarray:
        return self.acc[0]

    @property
    def held(self) -> np.ndarray:
        return self.acc[1]

    @property
    def nbytes(self) -> int:
        return self.ltok.nbytes + self.ltab.nbytes + self.lst.nbytes + self.ring.nbytes + self.acc.nbytes

    def open(self, slots: np.ndarray, rooms: np.ndarray | int | None = None) -> None:
        """Start a fresh lane (one segment: no symbols, nothing watched) in each of ``slots``, each taking
        at most ``rooms`` symbols (default the bank's ``lane_room``)."""
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        if rooms is None or np.isscalar(rooms):
            rooms = np.full(len(slots), self.room if rooms is None else rooms, dtype=np.int64)
        _open(self.ltab, self.lst, self.cfg, slots, np.ascontiguousarray(rooms, dtype=np.int64))

    def push(self, slots: np.ndarray, symbols: np.ndarray) -> None:
        """Each slot's lane decoded one more symbol (in order: a slot may appear several times)."""
        _push(self.prefix.ids, self.ltok, self.ltab, self.lst, self.ring, self.acc, self.cfg,
              np.ascontiguousarray(slots, dtype=np.int64), np.ascontiguousarray(symbols, dtype=np.int64))

    def propose(self, slots: np.ndarray, most: np.ndarray | int, *, watch: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What ``LaneDraft.propose(most)`` returns for each slot: ``guesses`` [n, largest most] (row i's
        first ``counts[i]`` entries; the rest 0), ``counts`` [n] and the match ``lengths`` [n] (0: none).
        ``watch``: also :meth:`watch` them (as the decoder does with every proposal), in the same call."""
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        n = len(slots)
        if np.ndim(most) == 0:
            width = max(0, int(most))
            most = np.array([most], dtype=np.int64)
        else:
            most = np.ascontiguousarray(most, dtype=np.int64)
            width = max(0, int(most.max())) if n else 0
        guesses = np.zeros((n, width), dtype=np.int64)
        out = np.zeros((2, n), dtype=np.int64)
        _propose(self.prefix.ids, self.prefix.table, self.ltok, self.ltab, self.lst, self.ring, self.cfg, slots,
                 most, guesses, out, watch)
        return guesses, out[0], out[1]

    def watch(self, slots: np.ndarray, guesses: np.ndarray, counts: np.ndarray, lengths: np.ndarray) -> None:
        """``LaneDraft.watch(guesses[i, :counts[i]], lengths[i])`` for each slot (counts 0: nothing)."""
        _watch(self.lst, self.ring, self.cfg, np.ascontiguousarray(slots, dtype=np.int64),
               np.ascontiguousarray(guesses, dtype=np.int64), np.ascontiguousarray(counts, dtype=np.int64),
               np.ascontiguousarray(lengths, dtype=np.int64))

    def plan(self, pushed: np.ndarray, symbols: np.ndarray, slots: np.ndarray, spans: np.ndarray, most: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """After a decoder pass, in one call: :meth:`push` (``pushed``, ``symbols``), :meth:`propose` with
        watch for ``slots`` (stream k's lanes ``slots[spans[k]:spans[k + 1]]``, lane i taking at most
        ``most[i]``), then each stream's count (its lanes' least, since they move together) and
        :meth:`stream_chances` for them.  Returns (guesses [n, max most], each lane's count, each stream's
        count, the chances [streams, max most])."""
        guesses, out, counts, table = _plan(self.prefix.ids, self.prefix.table, self.ltok, self.ltab, self.lst,
                                            self.ring, self.acc, self.cfg, _int64(pushed), _int64(symbols),
                                            _int64(slots), _int64(spans), _int64(most))
        return guesses, out[0], counts, table

    def chances(self, lengths: np.ndarray, count: int) -> np.ndarray:
        """``Rows._guess``'s chances of one stream whose lanes' proposals matched ``lengths``:
        ``np.prod([accept.chances(n, count) for n in lengths], axis=0) * len(lengths)`` ([count] float64)."""
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        return self.stream_chances(lengths, np.array([0, len(lengths)], dtype=np.int64), count)[0]

    def stream_chances(self, lengths: np.ndarray, spans: np.ndarray, counts: np.ndarray | int) -> np.ndarray:
        """:meth:`chances` of several streams at once: stream k's lanes are ``lengths[spans[k]:spans[k + 1]]``
        and its count ``counts[k]`` (one int: every stream's); row k of the result [streams, largest count]
        holds its chances (0 after its count)."""
        spans = np.ascontiguousarray(spans, dtype=np.int64)
        k = max(0, len(spans) - 1)
        if np.ndim(counts) == 0:
            width = max(0, int(counts))
            counts = np.full(k, width, dtype=np.int64)
        else:
            counts = np.ascontiguousarray(counts, dtype=np.int64)
            width = max(0, int(counts.max())) if k else 0
        if width > self.most:
            raise ValueError("more places than the acceptance table holds")
        out = np.zeros((k, width), dtype=np.float64)
        _chances(self.acc, np.ascontiguousarray(lengths, dtype=np.int64), spans, counts, out)
        return out
