"""The decode scheduler without a model: every stream once, rows never shared, the batch kept full."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcodec.coding.schedule import Scheduler

streams_st = st.lists(st.lists(st.integers(0, 12), min_size=1, max_size=4), min_size=0, max_size=12)


def simulate(lengths, rows, order=None):
    """Run the scheduler to the end; per step the (stream, lane) -> row map and what waited."""
    sched = Scheduler(lengths, rows, order)
    steps, starts, decoded = [], {}, {}
    while not sched.done:
        for run in sched.admit():
            assert run.stream not in starts, "admitted twice"
            starts[run.stream] = len(steps)
        # After admission the head of the queue (if any) does not fit: FIFO, never idle by choice.
        if sched._waiting:
            head = sched.lengths[sched._waiting[0]]
            assert sum(1 for n in head if n > 0) > len(sched._free)
        live = {(r.stream, i): r.rows[i] for r in sched.running for i in r.live}
        assert len(set(live.values())) == len(live), "a row carries two lanes"
        assert all(0 <= row < rows for row in live.values())
        assert len(live) == rows - len(sched._free) == sched.busy_rows(), "a held row idles"
        for key in live:
            decoded[key] = decoded.get(key, 0) + 1
        steps.append(live)
        sched.advance()
    return sched, steps, starts, decoded


@settings(max_examples=200, deadline=None)
@given(streams_st, st.integers(4, 10), st.randoms(use_true_random=False))
def test_every_stream_once_rows_never_shared_lanes_get_their_steps(lengths, rows, rnd):
    order = list(range(len(lengths)))
    rnd.shuffle(order)
    sched, steps, starts, decoded = simulate(lengths, rows, order)
    assert sorted(sched.finished) == list(range(len(lengths)))
    for s, lens in enumerate(lengths):
        for i, n in enumerate(lens):
            assert decoded.get((s, i), 0) == n
        if max(lens) > 0:  # a stream's lanes start together and keep their rows
            rows_of = {i: {step[(s, i)] for step in steps if (s, i) in step} for i in range(len(lens))}
            assert all(len(r) <= 1 for r in rows_of.values())
            first = [min(t for t, step in enumerate(steps) if (s, i) in step) for i, n in enumerate(lens) if n]
            assert set(first) == {starts[s]}
    # Admission follows the order given (FIFO).
    admitted = sorted((t, order.index(s)) for s, t in starts.items())
    assert [o for _, o in admitted] == sorted(o for _, o in admitted)


@settings(max_examples=50, deadline=None)
@given(streams_st, st.integers(4, 10))
def test_deterministic(lengths, rows):
    a, b = simulate(lengths, rows), simulate(lengths, rows)
    assert a[1] == b[1] and a[0].finished == b[0].finished


def test_freed_rows_are_refilled_at_once():
    """Two rows, streams of one segment: when the short one ends its row takes the next stream."""
    sched, steps, starts, _ = simulate([[2], [5], [3], [1]], 2)
    assert starts == {0: 0, 1: 0, 2: 2, 3: 5}
    assert steps[2] == {(1, 0): 1, (2, 0): 0}
    assert len(steps) == 6 and all(len(s) == 2 for s in steps[:5])


def test_a_stream_waits_for_rows_for_all_its_segments():
    sched, steps, starts, _ = simulate([[3], [2, 2, 2]], 3)
    assert starts == {0: 0, 1: 3}     # two rows were free from step 0, but the stream needs three


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        Scheduler([[1, 1, 1]], 2)
    with pytest.raises(ValueError):
        Scheduler([[1], [1]], 2, order=[0, 0])


def test_the_scheduler_is_host_only():
    """schedule.py imports no torch: it deals in row numbers, the decoder in tensors."""
    import ast

    import lmcodec.coding.schedule as mod

    tree = ast.parse(open(mod.__file__).read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(n.split(".")[0] in ("torch", "numpy") for n in names) and not any(n.startswith(".") for n in names)
