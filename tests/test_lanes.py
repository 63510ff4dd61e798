"""The decoder's pass bookkeeping as arrays (coding.lanes) and the output step's masses (tables_cpu), each
against a plain Python statement of the same thing: the scheduler's Running objects, the runner's
next_sink_move, the full weight rows.  The real decoder's round trips (test_rowdecode, test_guess_decode)
run them end to end."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcodec.coding.frequencies import bucket_width
from lmcodec.coding.lanes import RunningLanes, fed_guesses, guess_limits
from lmcodec.coding.passes import OutputRows
from lmcodec.coding.runner import next_sink_move, sink_step
from lmcodec.coding.schedule import Scheduler
from lmcodec.coding.steps import rooms, skip_decoded
from lmcodec.coding.tables_cpu import bucket_weights, masses_rows, token_weights
from lmcodec.engine.cpu.jit import njit
from lmcodec.engine.spec.constants import BUCKETS, ESCAPES, OUT_U_CAP
from lmcodec.engine.spec.fixedmath import exp2_table


@pytest.mark.parametrize("alphabet", [512 + ESCAPES, 49_152 + ESCAPES, 262_144 + ESCAPES])
def test_masses_and_remade_buckets_are_the_full_rows(alphabet):
    """masses_rows keeps token_weights' masses and totals; bucket_weights remakes any bucket's weights
    (tokens, escapes, padding) from the gaps: the full row the encoder codes with, never stored."""
    rng = np.random.default_rng(alphabet)
    vocab, n = alphabet - ESCAPES, 4
    u = rng.integers(0, OUT_U_CAP + 1, size=(n, vocab), dtype=np.int64) >> rng.integers(0, 6, size=(n, 1))
    u[np.arange(n), rng.integers(0, vocab, size=n)] = 0
    p, mass, totals = OutputRows(alphabet)(u)
    width, exp2 = bucket_width(alphabet), exp2_table()
    got_mass, got_totals = np.zeros((n, BUCKETS), np.int64), np.zeros(n, np.int64)
    masses_rows(u, exp2, width, got_mass, got_totals)
    assert np.array_equal(got_mass, mass) and np.array_equal(got_totals, totals)
    out = np.zeros(width, np.int64)
    for r in range(n):
        for b in [0, 1, int(rng.integers(0, BUCKETS)), vocab // width, (vocab + ESCAPES - 1) // width, BUCKETS - 1]:
            bucket_weights(u[r], b, width, totals[r], exp2, out)
            assert np.array_equal(out, p[r, b * width:(b + 1) * width]), (r, b)


@njit
def _token_weights(u, bias, has_bias, frac, exp2, width, p, mass):
    return token_weights(u, bias, has_bias, frac, exp2, width, p, mass)


@settings(max_examples=40, deadline=None)
@given(vocab=st.integers(1, 300), seed=st.integers(0, 2**32 - 1), has_bias=st.booleans(),
       bias_type=st.sampled_from([np.int32, np.int64]), frac=st.sampled_from([0, 10]))
def test_token_weights_are_the_statement(vocab, seed, has_bias, bias_type, frac):
    """token_weights (8 tokens a gather, gather.py, then the tail one at a time) is, token by token,
    exp2[e & 1023] >> (e >> 10) of e = u, or of min(u - (bias >> frac) - low, OUT_U_CAP) with the bias;
    escapes max(1, total >> 24); padding 0; bucket masses their sums."""
    rng = np.random.default_rng(seed)
    alphabet = vocab + ESCAPES
    width, exp2 = bucket_width(alphabet), exp2_table()
    u = rng.integers(0, OUT_U_CAP + 1, size=vocab, dtype=np.int64) >> int(rng.integers(0, 6))
    u[rng.integers(0, vocab, size=3)] = rng.choice([0, OUT_U_CAP], size=3)
    bias = rng.integers(-(16 << 20), (16 << 20) + 1, size=vocab).astype(bias_type)
    p, mass = np.full(BUCKETS * width, -1, np.int32), np.zeros(BUCKETS, np.int64)
    total = _token_weights(u, bias, has_bias, frac, exp2, width, p, mass)
    e = u
    if has_bias:
        g = u - (bias.astype(np.int64) >> frac)
        e = np.minimum(g - g.min(), OUT_U_CAP)
    want = np.zeros(BUCKETS * width, np.int64)
    want[:vocab] = exp2[e & 1023] >> (e >> 10)
    assert total == want.sum()
    want[vocab:alphabet] = max(1, int(total) >> 24)
    assert np.array_equal(p, want)
    assert np.array_equal(mass, want.reshape(BUCKETS, width).sum(axis=1))


@settings(max_examples=60, deadline=None)
@given(P=st.integers(1, 40), trained=st.integers(1, 200), longest=st.integers(1, 400), spare=st.integers(0, 8),
       offsets=st.lists(st.integers(0, 399), min_size=1, max_size=8))
def test_room_keeps_a_pass_below_the_bound_and_the_prefix_move(P, trained, longest, spare, offsets):
    bound = P + longest
    position = np.array([P + min(o, longest - 1) for o in offsets], np.int64)
    got = rooms(position, np.arange(len(position)), P, sink_step(trained), bound, spare)
    for pos, k in zip(position.tolist(), got.tolist()):
        want = min(max(min(bound - 1 - pos, next_sink_move(pos, P, trained) - 1 - pos), 0), spare)
        assert k == want


streams_st = st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=4), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(lengths=streams_st, rows=st.integers(4, 12), moves=st.lists(st.integers(0, 3), min_size=6, max_size=6),
       widths=st.lists(st.integers(1, 4), min_size=12, max_size=12), most=st.integers(0, 8))
def test_running_lanes_are_the_schedulers_streams(lengths, rows, moves, widths, most):
    """Every running stream, moved by different steps: the gaps' index, a column's lanes and the guess
    limits read from the arrays equal what the Running objects say."""
    sched = Scheduler(lengths, rows)
    sched.admit()
    for run, n in zip(list(sched.running), moves):
        sched.jump(run, min(run.step + n, max(run.lengths)))
    sched.admit()
    if not sched.running:
        return
    groups = [range(10 * s, 10 * s + len(lens)) for s, lens in enumerate(lengths)]
    lanes = RunningLanes(sched.running, groups)
    width = np.array(widths[:rows], np.int64)
    T = 4
    where = np.full((rows, 4), -1, np.int64)
    idx = lanes.gaps(width, T, where)
    want = [r * T + j for run in sched.running for r in run.live_rows for j in range(width[r])]
    assert idx.tolist() == want
    assert all(idx[where[r, j]] == r * T + j for run in sched.running for r in run.live_rows for j in range(width[r]))
    active = np.arange(len(lanes))[::2].copy()
    at, spans, lane, row = lanes.column(active, 0, where)
    picked = [sched.running[k] for k in active]
    assert lane.tolist() == [i for run in picked for i in run.live]
    assert row.tolist() == [r for run in picked for r in run.live_rows]
    assert np.diff(spans).tolist() == [len(run.live) for run in picked]
    assert at.tolist() == [where[r, 0] for r in row]
    position = np.arange(rows, dtype=np.int64) * 7 + 3
    live, spans, limit = guess_limits(lanes.rows, lanes.lengths, lanes.step, position, 3, 16, 90, 8, most)
    room = rooms(position, np.arange(rows), 3, 16, 90, 8)
    assert live.tolist() == [r for run in sched.running for r in run.live_rows]
    for k, run in enumerate(sched.running):
        lim = min(min(int(room[r]) for r in run.live_rows), min(run.lengths[i] - run.step for i in run.live) - 1, most)
        assert limit[spans[k]:spans[k + 1]].tolist() == [max(0, lim)] * len(run.live)


@settings(max_examples=60, deadline=None)
@given(lengths=streams_st, rows=st.integers(4, 12), steps=st.lists(st.integers(0, 4), min_size=6, max_size=6))
def test_a_jump_frees_what_single_steps_free(lengths, rows, steps):
    one, many = Scheduler(lengths, rows), Scheduler(lengths, rows)
    one.admit()
    many.admit()
    for a, b, n in zip(list(one.running), list(many.running), steps):
        n = min(n, max(a.lengths) - a.step)
        freed = sum((one.advance_stream(a) for _ in range(n)), [])
        assert sorted(many.jump(b, b.step + n)) == sorted(freed)
        assert a.step == b.step and a.done == b.done
    assert one.free_rows == many.free_rows and one.finished == many.finished
    for run in many.running:
        with pytest.raises(ValueError):
            many.jump(run, run.step - 1)


def test_skip_decoded_moves_rows_by_the_guesses_that_held():
    decoded = np.array([0, 1, 3, 0, 2], np.int64)
    position = np.array([10, 11, 12, 13, 14], np.int64)
    live = np.zeros(5, bool)
    assert skip_decoded(decoded, position, live) == 6
    assert position.tolist() == [10, 11, 14, 13, 15] and live.tolist() == [False, True, True, False, True]
    assert not decoded.any()            # ready for the next pass


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 9)), min_size=1, max_size=40))
def test_fed_guesses_are_the_live_rows_widths(rows):
    live = np.array([a for a, _ in rows], bool)
    width = np.array([w for _, w in rows], np.int64)
    out = np.full(len(rows), -1, np.int64)
    assert fed_guesses(live, width, out) == live.sum()
    assert np.array_equal(out, np.where(live, width - 1, 0))
