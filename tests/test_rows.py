"""Rows at their own positions in one step (Engine.forward with [B, T] positions, RowStep)
equal the plain reference bit for bit.

The scheduled decoder (lmcodec.schedule) runs rows that started at different
steps, refills a row when its segment ends, and leaves free rows idle: here a
2-layer model trained on 16 positions (so the prefix moves every 4 positions)
runs four sequences through three rows that way, on both backends, and every
prediction of every sequence must equal reference_run of that sequence alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmcodec import ops_torch, runner
from lmcodec.engine import Engine, KVCache
from lmcodec.quantize import load_int_model
from lmcodec.reference import reference_run
from lmcodec.tokens import ByteTokenizer

from conftest import make_tiny_llama

CONTEXT = 9        # prefix 3 + a window of 6: rings wrap within a few steps
TRAINED = 16


@pytest.fixture(scope="module")
def short(tmp_path_factory, loaded_model):
    from lmcodec import models

    d = make_tiny_llama(tmp_path_factory.mktemp("rows-llama"), loaded_model, max_positions=TRAINED, seed=2)
    loaded = models.load(d)
    tok = ByteTokenizer(loaded.tokenizer, loaded.arch.vocab_size)
    return load_int_model(loaded, tok.fingerprint), tok


def reference_logits(im, prefix, inputs):
    """Reference lam/exp of the positions predicting each token of a sequence fed ``inputs``."""
    lam, exp = reference_run(im, prefix + list(inputs[:-1]), len(prefix), CONTEXT, trained=TRAINED)
    return lam[len(prefix) - 1:], exp[len(prefix) - 1:]


@pytest.mark.parametrize("ops", ["cpu", "torch"])
def test_rows_started_at_different_steps_and_refilled_equal_reference(short, ops):
    im, tok = short
    rng = np.random.default_rng(7)
    prefix = [tok.start_token, 11, 12]
    seqs = [rng.integers(0, im.arch.vocab_size, n) for n in (27, 9, 14, 6)]
    # (sequence, row, first step): row 1 is refilled by sequence 3 when sequence 1 ends;
    # row 2 idles for five steps, row 1 for two.
    plan = [(0, 0, 0), (1, 1, 2), (2, 2, 5), (3, 1, 11)]
    engine = Engine(im, "cpu", ops=None if ops == "cpu" else ops_torch)
    got = {s: ([], []) for s in range(len(seqs))}
    with torch.inference_mode():
        pre = runner.prefill(engine, prefix)
        run = runner.RowStep(engine, pre, 3, CONTEXT, max(len(s) for s in seqs))
        where = {}                                   # row -> (sequence, tokens fed)
        for step in range(30):
            for s, row, first in plan:
                if first == step:
                    run.start([row])
                    where[row] = (s, 0)
            feed = rng.integers(0, im.arch.vocab_size, 3)   # idle rows: any token
            live = np.zeros(3, dtype=bool)
            lg = engine.logits(run.h, run.e)
            for row, (s, k) in list(where.items()):
                got[s][0].append(lg.lam[row].numpy())
                got[s][1].append(int(lg.exp[row]))
                feed[row] = seqs[s][k]
                live[row] = True
                if k + 1 == len(seqs[s]):
                    del where[row]
                else:
                    where[row] = (s, k + 1)
            run.advance(feed, live)
    assert not where
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

