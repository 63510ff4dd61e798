"""Rows at their own positions in one step (Engine.forward with [B, T] positions, RowStep)
equal the plain reference bit for bit.

The scheduled decoder (lmcodec.coding.schedule) runs rows that started at different
steps, refills a row when its segment ends, and leaves free rows idle: here a
2-layer model trained on 16 positions (so the prefix moves every 4 positions)
runs four sequences through three rows that way, on both backends, and every
prediction of every sequence must equal reference_run of that sequence alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_tiny, make_tiny_llama, rows_by_plan

from lmcodec.coding import runner, steps
from lmcodec.engine import ops_torch
from lmcodec.engine.engine import Engine
from lmcodec.engine.kvcache import KVCache
from lmcodec.engine.spec.reference import reference_run

CONTEXT = 9        # prefix 3 + a window of 6: rings wrap within a few steps
TRAINED = 16


@pytest.fixture(scope="module")
def short(tmp_path_factory, loaded_model):
    return load_tiny(make_tiny_llama(tmp_path_factory.mktemp("rows-llama"), loaded_model, max_positions=TRAINED,
                                     seed=2))


def reference_logits(im, prefix, inputs):
    """Reference lam/exp of the positions predicting each token of a sequence fed ``inputs``."""
    lam, exp = reference_run(im, prefix + list(inputs[:-1]), len(prefix), CONTEXT, trained=TRAINED)
    return lam[len(prefix) - 1:], exp[len(prefix) - 1:]


@pytest.mark.parametrize("ops,step", [("cpu", "RowStep"), ("torch", "RowStep"), ("cpu", "GraphStep")])
def test_rows_started_at_different_steps_and_refilled_equal_reference(short, ops, step):
    im, tok = short
    rng = np.random.default_rng(7)
    prefix = [tok.start_token, 11, 12]
    seqs = [rng.integers(0, im.arch.vocab_size, n) for n in (27, 9, 14, 6)]
    # (sequence, row, first step): row 1 is refilled by sequence 3 when sequence 1 ends;
    # row 2 idles for five steps, row 1 for two.
    plan = [(0, 0, 0), (1, 1, 2), (2, 2, 5), (3, 1, 11)]
    engine = Engine(im, "cpu", ops=None if ops == "cpu" else ops_torch)
    with torch.inference_mode():
        pre = runner.prefill(engine, prefix)
        run = getattr(steps, step)(engine, pre, 3, CONTEXT, max(len(s) for s in seqs))
        got = rows_by_plan(engine, run, seqs, plan, 30, rng)   # idle rows fed random tokens
    for s, seq in enumerate(seqs):
        lam, exp = reference_logits(im, prefix, seq)
        assert np.array_equal(np.stack(got[s][0]), lam), f"sequence {s}"
        assert np.array_equal(np.array(got[s][1]), exp), f"sequence {s}"


def test_per_row_positions_equal_shared_positions(short):
    """[B, T] positions that happen to agree give what [T] gives (the same step, two spellings)."""
    im, tok = short
    engine = Engine(im, "cpu", ops=ops_torch)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    pos = torch.arange(3)
    zero = torch.zeros(3, dtype=torch.int64)
    outs = []
    for shape in ((3,), (2, 3)):
        cache = KVCache.empty(im, 2, 3, "cpu")
        p = pos.expand(shape)
        z = zero.expand(shape)
        outs.append((engine.forward(ids, p, cache, p, (z, z, p + 1)), cache))
    (h1, e1), c1 = outs[0]
    (h2, e2), c2 = outs[1]
    assert torch.equal(h1, h2) and torch.equal(e1, e2)
    assert all(torch.equal(a, b) for a, b in zip(c1.k + c1.v + c1.kmax + c1.vmax, c2.k + c2.v + c2.kmax + c2.vmax))
    with pytest.raises(ValueError):
        engine.forward(ids, pos.expand(2, 3), KVCache.empty(im, 2, 3, "cpu"), pos, (zero, zero, pos + 1))


def test_graph_step_equals_lockstep(short):
    """The static-shape step (eager on CPU) gives Lockstep's rows, step by step, for a lockstep batch."""
    im, tok = short
    rng = np.random.default_rng(3)
    engine = Engine(im, "cpu")
    feeds = rng.integers(0, im.arch.vocab_size, (12, 4))
    with torch.inference_mode():
        pre = runner.prefill(engine, [tok.start_token])
        lock = steps.Lockstep(engine, pre, 4, CONTEXT, 12)
        graph = steps.GraphStep(engine, pre, 4, CONTEXT, 12)
        assert graph.capacity == CONTEXT and graph.cache.k[0].shape[-1] == CONTEXT
        for t in range(12):
            assert torch.equal(lock.h, graph.h) and torch.equal(lock.e, graph.e), f"step {t}"
            lock.advance(feeds[t])
            graph.advance(feeds[t])
        assert torch.equal(lock.h, graph.h) and torch.equal(lock.e, graph.e)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu/check.sh runs it)")
def test_graph_replay_on_cuda_equals_cpu(short):
    """The captured CUDA graph, replayed with rows refilled at other positions, gives the CPU's bits."""
    im, tok = short
    rng = np.random.default_rng(5)
    feeds = rng.integers(0, im.arch.vocab_size, (20, 4))
    outs = {}
    for device, graph in (("cpu", False), ("cuda", True)):
        engine = Engine(im, device)
        hs = []
        with torch.inference_mode():
            pre = runner.prefill(engine, [tok.start_token, 11])
            run = steps.GraphStep(engine, pre, 4, CONTEXT, 20, graph=graph)
            for t in range(20):
                if t in (6, 13):
                    run.start([t % 4])
                hs.append((run.h.cpu().clone(), run.e.cpu().clone()))
                run.advance(feeds[t], live=np.array([1, 1, t % 3 != 0, 1], dtype=bool))
        outs[device] = hs
    for (h1, e1), (h2, e2) in zip(outs["cpu"], outs["cuda"]):
        assert torch.equal(h1, h2) and torch.equal(e1, e2)
