"""The proof that archives are portable: the engine equals the plain reference, bit for bit.

``lmcodec.engine.spec.reference`` implements docs/ENGINE.md in plain int64 numpy, one token
at a time.  Here the real default model runs through the engine in every way
the codec uses it -- one parallel pass (also in chunks over a sliding cache),
step by step, batch 1 and batch 3, the rows in another order, 1 and 2
threads, the numba kernels, the tensor-operation backend and, on a CUDA
machine, the Triton kernels --
and every logit and every coding frequency must equal the reference's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmcodec.coding import runner, selftest, steps
from lmcodec.coding.frequencies import CodingTables
from lmcodec.engine import ops_torch
from lmcodec.engine.engine import Engine, torch_threads
from lmcodec.engine.model.quantize import load_int_model
from lmcodec.engine.spec.reference import reference_run, reference_tables

TEXT = b"Alice was beginning to get very tired of sitting by her sister, \xff on the bank."
PROMPT = b"A story:"
CONTEXT = 9          # prefix 3 + a window of 6: the window slides within the text


@pytest.fixture(scope="module")
def int_model(loaded_model, tokenizer):
    return load_int_model(loaded_model, tokenizer.fingerprint)


@pytest.fixture(scope="module")
def case(tokenizer):
    prefix = [tokenizer.start_token] + tokenizer.model_inputs(tokenizer.encode(PROMPT)).tolist()[-2:]
    symbols = tokenizer.encode(TEXT)[:14]
    inputs = tokenizer.model_inputs(symbols)
    return prefix, symbols, inputs


@pytest.fixture(scope="module")
def reference(int_model, case):
    """Reference logits of the positions predicting each symbol (prefix's last, then the inputs)."""
    prefix, symbols, inputs = case
    ids = prefix + inputs[:-1].tolist()
    lam, exp = reference_run(int_model, ids, len(prefix), CONTEXT)
    first = len(prefix) - 1
    return lam[first:], exp[first:]


#: Backends: numba kernels and tensor operations on CPU; the Triton kernels on CUDA only (on CPU
#: tests/test_ops_triton.py runs them under the interpreter, on a tiny model).
OPS = ["cpu", "torch", pytest.param("triton", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the Triton backend runs on CUDA (on CPU: tests/test_ops_triton.py)"))]


def make_engine(int_model, ops: str) -> Engine:
    if ops == "triton":
        return Engine(int_model, "cuda")          # engine._backend("cuda") is lmcodec.engine.triton.ops
    return Engine(int_model, "cpu", ops=None if ops == "cpu" else ops_torch)


def engine_logits(engine, h, e):
    lg = engine.logits(h, e)
    return lg.lam.cpu().numpy(), lg.exp.cpu().numpy().reshape(-1)


def assert_equal_to_reference(engine, h, e, reference, symbols, alphabet):
    lam, exp = engine_logits(engine, h, e)
    ref_lam, ref_exp = reference
    assert np.array_equal(exp, ref_exp)
    assert np.array_equal(lam, ref_lam)
    weights = engine.weights(h, e, alphabet)
    # The coding path takes the gaps (Engine.gaps) and builds the weights itself (mixing.py).
    assert torch.equal(weights, ops_torch.weights_from_gaps(engine.gaps(h, e), alphabet, weights.shape[2]))
    weights = weights.cpu()
    tables = CodingTables(weights, alphabet)
    s1 = tables.stage1()
    b, _ = tables.split(symbols)
    s2 = {bucket: tables.stage2(np.full(len(symbols), bucket)) for bucket in (0, 255)}
    s2_own = tables.stage2(b)
    for i in range(len(symbols)):
        r1, r2 = reference_tables(ref_lam[i], int(ref_exp[i]), alphabet)
        assert np.array_equal(s1[i], r1), f"stage 1 differs at position {i}"
        assert np.array_equal(s2_own[i], r2[b[i]]), f"stage 2 differs at position {i}"
        for bucket, rows in s2.items():
            assert np.array_equal(rows[i], r2[bucket])


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("threads", [1, 2])
def test_parallel_pass_equals_reference(int_model, tokenizer, case, reference, ops, threads, monkeypatch):
    prefix, symbols, inputs = case
    engine = make_engine(int_model, ops)
    # Chunks of 4 positions: the pass also slides its cache the way long segments do.
    monkeypatch.setattr(runner, "SCORE_CHUNK", 4)
    with torch_threads(threads), torch.inference_mode():
        pre = runner.prefill(engine, prefix)
        h, e = runner.score_segment(engine, pre, inputs[:-1], CONTEXT)
    assert_equal_to_reference(engine, h, e, reference, symbols, tokenizer.alphabet_size)


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("row", [0, 2])
def test_steps_in_a_batch_equal_reference(int_model, tokenizer, case, reference, ops, row):
    """Step by step, our sequence in row ``row`` of 3 (the others are other texts)."""
    prefix, symbols, inputs = case
    engine = make_engine(int_model, ops)
    rng = np.random.default_rng(row)
    n = len(symbols)
    hs, es = [], []
    with torch_threads(2), torch.inference_mode():
        pre = runner.prefill(engine, prefix)
        run = steps.Lockstep(engine, pre, 3, CONTEXT, n)
        for t in range(n):
            hs.append(run.h[row:row + 1].clone())
            es.append(run.e[row:row + 1].clone())
            feed = rng.integers(0, tokenizer.vocab_size, 3)
            feed[row] = inputs[t]
            run.advance(feed)
    assert_equal_to_reference(engine, torch.cat(hs), torch.cat(es), reference, symbols, tokenizer.alphabet_size)


def test_golden_digest(int_model, tokenizer):
    """The built-in text's frequencies hash to the recorded constant (also `lmcodec selftest`)."""
    res = selftest.run(Engine(int_model, "cpu"), tokenizer)
    assert res.steps_agree
    assert res.golden is not None, f"no golden digest recorded for fingerprint {res.fingerprint}"
    assert res.digest == res.golden


def test_golden_digest_on_the_tensor_backend(int_model, tokenizer):
    res = selftest.run(Engine(int_model, "cpu", ops=ops_torch), tokenizer)
    assert res.ok and res.digest == selftest.GOLDEN[res.fingerprint]


def test_another_model_shape_equals_reference(tiny_model_dir):
    """A 2-layer model with head dim 16 (another softmax scale): pass and steps equal the reference."""
    from lmcodec.coding.tokens import ByteTokenizer
    from lmcodec.engine.model import registry as models

    loaded = models.load(tiny_model_dir)
    tok = ByteTokenizer(loaded.tokenizer, loaded.arch.vocab_size)
    im = load_int_model(loaded, tok.fingerprint)
    assert im.arch.head_dim == 16
    prefix = [tok.start_token]
    symbols = tok.encode(b"Some other words, and 42 numbers.")[:10]
    inputs = tok.model_inputs(symbols)
    lam, exp = reference_run(im, prefix + inputs[:-1].tolist(), 1, 6)
    engine = Engine(im, "cpu")
    with torch.inference_mode():
        pre = runner.prefill(engine, prefix)
        h, e = runner.score_segment(engine, pre, inputs[:-1], 6)
        run = steps.Lockstep(engine, pre, 2, 6, len(symbols))
        stepped = []
        for t in range(len(symbols)):
            stepped.append(engine.logits(run.h[1:2], run.e[1:2]).lam.numpy()[0])
            run.advance(np.array([0, inputs[t]]))
    lg = engine.logits(h, e)
    assert np.array_equal(lg.lam.numpy(), lam) and np.array_equal(lg.exp.numpy().reshape(-1), exp)
    assert np.array_equal(np.stack(stepped), lam)
