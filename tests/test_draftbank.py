"""lmcodec.coding.draftbank (the drafts as numba code on arrays) against LaneDraft, PrefixIndex and Acceptance,
the oracle: the same proposals (tokens, match lengths) and the same tried/held counts throughout a decode
driven as Rows drives its drafts (propose + watch for every live lane after a pass, push per decoded token,
column by column, lanes ending and their slots reused)."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcodec.coding.draft import Acceptance, LaneDraft, PrefixIndex
from lmcodec.coding.draftbank import DraftBank, PrefixTable


def sequence(rng: np.random.Generator, n: int, vocab: int, pool: np.ndarray | None = None) -> np.ndarray:
    """Tokens that repeat: motifs from a small pool, with some noise (runs of every length recur)."""
    if pool is None:
        pool = rng.integers(0, vocab, size=int(rng.integers(1, 8)))
    parts, total = [], 0
    while total < n:
        motif = rng.choice(pool, size=int(rng.integers(1, 10)))
        part = np.resize(motif, int(rng.integers(1, 30)))
        noise = rng.random(len(part)) < rng.choice([0.0, 0.05, 0.3])
        part[noise] = rng.integers(0, vocab, size=int(noise.sum()))
        parts.append(part)
        total += len(part)
    return (np.concatenate(parts)[:n] if parts else np.zeros(0)).astype(np.int64)


def drive(seed: int, prefix_len: int, lanes: int, slots: int, most: int, collide: bool, passes_per_check: int = 1
          ) -> None:
    rng = np.random.default_rng(seed)
    vocab = int(rng.choice([2, 3, 5, 12, 300]))
    pool = rng.integers(0, vocab, size=int(rng.integers(1, 8)))
    prefix = sequence(rng, prefix_len, vocab, pool)
    segs = [sequence(rng, int(rng.integers(0, 120)), vocab, pool if rng.random() < 0.7 else None)
            for _ in range(lanes)]
    room = max((len(s) for s in segs), default=0)
    index = PrefixIndex(prefix.tolist())
    accept = Acceptance(most)
    bank = DraftBank(PrefixTable(prefix, collide=collide), slots, room, most)
    free = list(range(slots))
    waiting = list(range(lanes))
    live: dict[int, tuple[int, int, LaneDraft]] = {}    # slot -> (segment, decoded, oracle)
    passes = 0
    while waiting or live:
        while free and waiting:     # admit: a fresh lane in a free slot (ones that ended are reused)
            g = waiting.pop(0)
            s = free.pop(int(rng.integers(0, len(free))))
            rooms = len(segs[g]) if rng.random() < 0.5 else None
            bank.open(np.array([s]), rooms)
            live[s] = (g, 0, index.lane(accept))
        # decode: each live lane 1 .. a few tokens (a pass whose guesses held), pushed column by column
        # (or, fused, all of them pushed by the plan after the pass: DraftBank.plan, as Rows._guess calls it)
        order = list(live)
        fused, log = rng.random() < 0.4, ([], [])
        want = {s: min(len(segs[live[s][0]]) - live[s][1], int(rng.choice([1, 1, 2, 3, 9]))) for s in order}
        for j in range(max(want.values(), default=0)):
            col = [s for s in order if want[s] > j]
            xs = [int(segs[live[s][0]][live[s][1] + j]) for s in col]
            for s, x in zip(col, xs):
                live[s][2].push(x)
            if fused:
                log[0].extend(col)
                log[1].extend(xs)
            else:
                bank.push(np.array(col, dtype=np.int64), np.array(xs, dtype=np.int64))
        for s in order:
            g, done, lane = live[s]
            live[s] = (g, done + want[s], lane)
            if done + want[s] >= len(segs[g]):
                del live[s]
                free.append(s)
        # guess: propose + watch for every live lane, as Rows._guess
        order = list(live)
        if fused and not order:
            bank.push(np.array(log[0], dtype=np.int64), np.array(log[1], dtype=np.int64))
        if order:
            mosts = np.array([min(most, len(segs[live[s][0]]) - live[s][1] - 1, int(rng.integers(-1, most + 1)))
                              for s in order], dtype=np.int64)
            if rng.random() < 0.3:     # one most for every lane (an int)
                mosts[:] = mosts.min()
            most_arg = int(mosts[0]) if rng.random() < 0.3 and (mosts == mosts[0]).all() else mosts
            cuts = sorted(set(rng.integers(1, len(order) + 1, size=3).tolist()) | {len(order)})
            spans = np.array([0] + cuts, dtype=np.int64)
            if fused:
                guesses, counts, cnt, table = bank.plan(np.array(log[0], dtype=np.int64),
                                                        np.array(log[1], dtype=np.int64), np.array(order), spans,
                                                        np.maximum(mosts, 0))
                lengths = None
            elif rng.random() < 0.5:
                guesses, counts, lengths = bank.propose(np.array(order), most_arg)
                bank.watch(np.array(order), guesses, counts, lengths)
            else:
                guesses, counts, lengths = bank.propose(np.array(order), most_arg, watch=True)
            for i, s in enumerate(order):
                lane = live[s][2]
                guess, n = lane.propose(int(mosts[i]))
                lane.watch(guess, n)
                assert counts[i] == len(guess) and (fused or lengths[i] == n), (s, guess, n, counts[i])
                assert guesses[i, :counts[i]].tolist() == guess
                assert not guesses[i, counts[i]:].any()
            # the streams' chances (lanes grouped at random), as Rows._guess computes them
            if fused:
                lengths = np.array([live[s][2].propose(int(m))[1] for s, m in zip(order, mosts)], dtype=np.int64)
            else:
                cnt = np.array([counts[a:b].min() for a, b in pairwise(spans)], dtype=np.int64)
                table = bank.stream_chances(lengths, spans, cnt)
            assert cnt.tolist() == [counts[a:b].min() for a, b in pairwise(spans)]
            for k, (a, b) in enumerate(pairwise(spans)):
                c = int(cnt[k])
                assert not table[k, c:].any()
                if c == 0:
                    continue
                ref = np.prod([accept.chances(int(n), c) for n in lengths[a:b]], axis=0) * (b - a)
                assert np.array_equal(table[k, :c], ref)
                assert np.array_equal(bank.chances(lengths[a:b], c), ref)
        passes += 1
        if passes % passes_per_check == 0 or not (waiting or live):
            assert np.array_equal(bank.tried, accept.tried)
            assert np.array_equal(bank.held, accept.held)
            assert np.array_equal(bank.accept.tried, accept.tried)
    assert np.array_equal(bank.tried, accept.tried) and np.array_equal(bank.held, accept.held)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), prefix_len=st.sampled_from([0, 1, 2, 3, 9, 40, 300]),
       lanes=st.integers(1, 10), slots=st.integers(1, 6), most=st.sampled_from([1, 2, 8]),
       collide=st.booleans())
def test_bank_matches_lane_drafts(seed, prefix_len, lanes, slots, most, collide):
    drive(seed, prefix_len, lanes, slots, most, collide)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_long_prefix(seed):
    """A ~5,000-token prefix (the prompt's: most matches come from it) and 64 lanes at once."""
    drive(seed, 5000, 80, 64, 8, False, passes_per_check=8)


def test_ring_and_room_limits():
    bank = DraftBank([1, 2, 3, 1, 2, 3, 1, 2], 2, 4, 2)
    bank.open(np.array([0, 1]))
    g, c, n = bank.propose(np.array([0]), 2)
    assert g.tolist() == [[3, 1]] and c.tolist() == [2] and n.tolist() == [5]    # "1 2 3 1 2" ends at 5 and 8
    for _ in range(3):                                  # M + 1 = 3 proposals without a symbol between fit
        bank.watch(np.array([0]), g, c, n)
    with pytest.raises(ValueError):
        bank.watch(np.array([0]), g, c, n)
    bank.push(np.array([1, 1, 1, 1]), np.array([5, 5, 5, 5]))
    with pytest.raises(ValueError):
        bank.push(np.array([1]), np.array([5]))
    with pytest.raises(ValueError):
        bank.propose(np.array([1]), 3)                  # past the acceptance table's places
    before = bank.lst.copy()
    with pytest.raises(ValueError):                     # the same bound through plan, before its push
        bank.plan(np.array([0]), np.array([7]), np.array([0]), np.array([0, 1]), np.array([3]))
    assert np.array_equal(bank.lst, before)
    bank.open(np.array([1]), 2)                         # the slot again, a shorter lane
    bank.push(np.array([1, 1]), np.array([1, 2]))
    with pytest.raises(ValueError):
        bank.push(np.array([1]), np.array([3]))
