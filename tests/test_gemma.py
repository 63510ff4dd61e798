"""Gemma 3 in the exact engine (docs/ENGINE.md, "Gemma 3") equals the plain reference bit for bit.

A 3-layer random Gemma 3 (two local layers with a sliding window of 8, one global
layer; head dim 32, 4 query heads, 1 KV head, random RMSNorm weights) saved as
an HF directory and loaded through lmcodec's own loading path: one parallel pass,
in chunks, step by step in a batch, rows at their own positions, past the window
and past the model's trained positions (the moving prefix), and with weights
scaled so the clamps bind.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_tiny, make_tiny_gemma, rows_by_plan

from lmcodec.coding import runner, steps
from lmcodec.engine import ops_torch
from lmcodec.engine.cpu import ops as ops_cpu
from lmcodec.engine.engine import Engine
from lmcodec.engine.spec import fixedmath
from lmcodec.engine.spec.reference import reference_run
from lmcodec.errors import UsageError

CONTEXT = 14         # prefix 3 + a window of 11: both the engine's window and the local layers' (8) slide
TRAINED = 16


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, loaded_model):
    return make_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma"), loaded_model, max_positions=TRAINED, seed=3)


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    return load_tiny(gemma_dir)


def _seq(im, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, im.arch.vocab_size, n).tolist()


def _pass(engine, prefix, inputs, context, chunk=None, monkeypatch=None):
    if chunk is not None:
        monkeypatch.setattr(runner, "SCORE_CHUNK", chunk)
    with torch.inference_mode():
        pre = runner.prefill(engine, prefix)
        h, e = runner.score_segment(engine, pre, np.asarray(inputs[:-1]), context)
        lg = engine.logits(h, e)
    return lg.lam.numpy(), lg.exp.numpy().reshape(-1)


def _reference(im, prefix, inputs, context, trained=TRAINED):
    lam, exp = reference_run(im, prefix + list(inputs[:-1]), len(prefix), context, trained=trained)
    return lam[len(prefix) - 1:], exp[len(prefix) - 1:]


def test_arch_is_read_from_the_config(gemma):
    im, _ = gemma
    a = im.arch
    assert a.model_type == "gemma3_text" and a.hidden_act == "gelu_pytorch_tanh"
    assert a.embed_scale and a.norm_plus_one and a.qk_norm and a.post_norms
    assert (a.sliding_window, a.query_pre_attn_scalar, a.rope_theta, a.rope_local_theta) == (8, 24, 1e6, 1e4)
    assert [a.is_local(i) for i in range(3)] == [True, True, False]
    assert all(layer.q_gain is not None and layer.post_mlp_gain is not None for layer in im.layers)


def test_engine_runs_gemma_on_the_steps_that_compute_it(gemma):
    """numba's steps, the tensor steps and the Triton kernels compute Gemma's forms (GEMMA_STEPS; the
    Triton kernels are tested in test_ops_triton.py); an op set without them is refused."""
    import types

    im, _ = gemma
    assert Engine(im, "cpu").ops is ops_cpu and Engine(im, "cpu", ops=ops_torch).ops is ops_torch
    llama_only = types.ModuleType("llama_only")
    with pytest.raises(UsageError, match="llama_only"):
        Engine(im, "cpu", ops=llama_only)


def test_decoding_steps_take_the_fused_step(gemma, monkeypatch):
    """On numba, a step's few rows run Gemma's layers in the fused step (one kernel per layer, its
    q/k norms, windows and post norms; fused_cpu._layer): the reference tests below hold it exact."""
    from lmcodec.engine.cpu import fused as fused_cpu

    calls = []
    real = fused_cpu.forward_rows
    monkeypatch.setattr(fused_cpu, "forward_rows", lambda *args: calls.append(args[1].shape[0]) or real(*args))
    im, tok = gemma
    engine = Engine(im, "cpu")
    with torch.inference_mode():
        run = steps.RowStep(engine, runner.prefill(engine, [tok.start_token]), 2, CONTEXT, 8, spare=2)
        run.advance(np.array([[5, 6, 7], [8, 9, 10]]), guesses=np.array([2, 1]))
    assert calls == [1, 6]                           # the one-token prefix, then 2 rows x 3 columns


#: Both backends that run Gemma on a CPU: numba's steps (the default) and the tensor steps.
BACKENDS = pytest.mark.parametrize("ops", [ops_cpu, ops_torch], ids=["numba", "tensor"])


def test_gelu_table_matches_the_function():
    import math
    table = fixedmath.gelu_gate_table()
    for x in (-6.0, -1.5, -0.25, 0.0, 0.5, 2.0, 7.0):
        want = 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
        assert abs(table[int(x * 1024) + 16384] / 65536 - want) <= 1 / 65536
    assert table[16384] == 32768 and table[-1] == 65536 and table[0] == 0


@BACKENDS
def test_parallel_pass_equals_reference_across_the_window(gemma, monkeypatch, ops):
    """One pass and passes in chunks; on numba the global layer's queries also take the integer GEMMs."""
    from lmcodec.engine.cpu import attend_gemm

    monkeypatch.setattr(attend_gemm, "MIN_QUERIES", 4)
    im, tok = gemma
    prefix = [tok.start_token, 11, 12]
    inputs = _seq(im, 20, 1)
    lam, exp = _reference(im, prefix, inputs, CONTEXT)
    for chunk in (None, 4):
        got = _pass(Engine(im, "cpu", ops=ops), prefix, inputs, CONTEXT, chunk, monkeypatch)
        assert np.array_equal(got[1], exp) and np.array_equal(got[0], lam), f"chunk {chunk}"


@BACKENDS
def test_steps_in_a_batch_equal_reference(gemma, ops):
    im, tok = gemma
    prefix = [tok.start_token, 11, 12]
    inputs = _seq(im, 20, 2)
    lam, exp = _reference(im, prefix, inputs, CONTEXT)
    engine = Engine(im, "cpu", ops=ops)
    rng = np.random.default_rng(5)
    got_lam, got_exp = [], []
    with torch.inference_mode():
        pre = runner.prefill(engine, prefix)
        run = steps.Lockstep(engine, pre, 3, CONTEXT, len(inputs))
        for t in range(len(inputs)):
            lg = engine.logits(run.h[1:2], run.e[1:2])
            got_lam.append(lg.lam.numpy()[0])
            got_exp.append(int(lg.exp[0]))
            feed = rng.integers(0, im.arch.vocab_size, 3)
            feed[1] = inputs[t]
            run.advance(feed)
    assert np.array_equal(np.array(got_exp), exp) and np.array_equal(np.stack(got_lam), lam)


@BACKENDS
@pytest.mark.parametrize("context", [9, 14])
def test_rows_at_their_own_positions_past_trained_positions_equal_reference(gemma, ops, context):
    """RowStep: rows started at different steps, one refilled, through the ring and moves of the prefix.
    Context 14 (a window of 11 after the prefix): the local layers keep a ring of their own 8 positions;
    context 9 (a window of 6): theirs is the window's length too."""
    im, tok = gemma
    prefix = [tok.start_token, 11, 12]
    seqs = [np.array(_seq(im, n, 10 + n)) for n in (26, 9, 13)]
    plan = [(0, 0, 0), (1, 1, 2), (2, 1, 12)]
    engine = Engine(im, "cpu", ops=ops)
    with torch.inference_mode():
        pre = runner.prefill(engine, prefix)
        run = steps.RowStep(engine, pre, 2, context, max(len(s) for s in seqs))
        assert [k.shape[-1] for k in run.cache.k] == [3 + min(8, context - 3)] * 2 + [context]
        got = rows_by_plan(engine, run, seqs, plan, 27)
    for s, seq in enumerate(seqs):
        lam, exp = _reference(im, prefix, seq.tolist(), context, trained=TRAINED)
        assert np.array_equal(np.array(got[s][1]), exp), f"sequence {s}"
        assert np.array_equal(np.stack(got[s][0]), lam), f"sequence {s}"


def test_local_layers_own_ring_gives_the_shared_slots_outputs_with_guesses(gemma):
    """RowStep fed guesses (rows with different k, guesses held or not, restarts) with the local layers
    in a ring of their own 8 + spare slots gives, pass for pass, what it gives with the local layers in
    the global layers' slots (a window of 11 + spare), across both rings and moves of the prefix."""
    from conftest import guessed_passes

    im, tok = gemma
    engine = Engine(im, "cpu")
    outs, sizes = [], []
    with torch.inference_mode():
        pre = runner.prefill(engine, [tok.start_token, 11, 12])
        for own in (True, False):
            run = steps.RowStep(engine, pre, 3, CONTEXT, 40, spare=3, own_local=own)
            sizes.append([k.shape[-1] for k in run.cache.k])
            outs.append(guessed_passes(run, tok.vocab_size, 24, seed=6))
    assert sizes == [[3 + 8 + 6] * 2 + [CONTEXT + 6], [CONTEXT + 6] * 3]
    for (h1, e1), (h2, e2) in zip(*outs, strict=True):
        assert torch.equal(h1, h2) and torch.equal(e1, e2)


def test_kv_bytes_counts_the_local_layers_own_slots(gemma):
    from lmcodec.engine.kvcache import KVCache, kv_bytes

    im, _ = gemma
    for local in (None, 11):
        cache = KVCache.empty(im, 2, 30, "cpu", local)
        held = sum(t.nbytes for part in (cache.k, cache.kmax, cache.v, cache.vmax) for t in part)
        assert kv_bytes(im.arch, 2, 30, local) == held
    assert kv_bytes(im.arch, 2, 30, 11) < kv_bytes(im.arch, 2, 30)


@BACKENDS
def test_clamps_reached_equal_reference(gemma, monkeypatch, ops):
    """Weights scaled up so q/k/v, gate/up and the residual clamps bind: still the reference's integers."""
    from dataclasses import replace

    from lmcodec.engine.spec import reference

    bound = {}                                       # clamp limit -> whether some value reached it
    plain = reference.clamp

    def clamp(x, limit):
        bound[limit] = bound.get(limit, False) or bool((np.abs(np.asarray(x)) >= limit).any())
        return plain(x, limit)
    monkeypatch.setattr(reference, "clamp", clamp)

    im, tok = gemma
    big = [replace(layer, qkv=replace(layer.qkv, shift=layer.qkv.shift - 16),
                   gate_up=replace(layer.gate_up, shift=layer.gate_up.shift - 20),
                   down=replace(layer.down, shift=layer.down.shift - 20),
                   post_mlp_gain_shift=layer.post_mlp_gain_shift - 30)
           for layer in im.layers]
    hot = replace(im, layers=big)
    prefix = [tok.start_token]
    inputs = _seq(im, 12, 4)
    lam, exp = _reference(hot, prefix, inputs, CONTEXT)
    assert bound[reference.QKV_LIMIT] and bound[reference.GATE_UP_LIMIT] and bound[reference.RESIDUAL_LIMIT], bound
    got = _pass(Engine(hot, "cpu", ops=ops), prefix, inputs, CONTEXT)
    assert np.array_equal(got[1], exp) and np.array_equal(got[0], lam)


def test_engine_follows_the_float_model(gemma_dir, gemma):
    """The integer engine's logits track HF's float Gemma 3 on the same tokens (the architecture is read right)."""
    from transformers import AutoModelForCausalLM

    im, tok = gemma
    ids = [tok.start_token] + _seq(im, 19, 6)
    model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    lam, exp = reference_run(im, ids, 1, 64)
    got = lam.astype(np.float64) * np.exp2(exp.astype(np.float64))[:, None]
    # Position 0 is token 0, Gemma's padding row (zeros): constant logits in both.
    corr = [np.corrcoef(got[i], want[i])[0, 1] for i in range(1, len(ids))]
    assert min(corr) > 0.99, corr
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


def test_codec_round_trip_through_the_decoder(gemma_dir):
    """Compress with the parallel pass, decompress with the scheduled decoder's rows: the same bytes back,
    through the engine's window, the local layers' window and moves of the prefix (16 trained positions)."""
    from conftest import FAST

    from lmcodec import Codec

    text = (b"It was the best of times, it was the worst of times, it was the age of wisdom, "
            b"it was the age of foolishness.\n") * 2
    codec = Codec(gemma_dir, method="lm", **FAST)
    blob = codec.compress(text)
    assert Codec(gemma_dir, **FAST).decompress(blob) == text


def test_dictionary_merge_keeps_gemma_gains_and_equals_reference(gemma):
    """A dictionary's integer deltas merged into a Gemma model (adapter.merge) keep its q/k and post-norm
    gains, equal reference_merge, and the adapted engine equals reference_run."""
    from test_adapter import random_tensors

    from lmcodec.dictionary.adapter import Adapter
    from lmcodec.engine.spec.reference import reference_merge

    im, tok = gemma
    t = random_tensors(im, 5)
    for key in t.scale:
        t.scale[key] //= 8
    ad = Adapter.build(im.fingerprint, t)
    merged = ad.apply(im)
    ref = reference_merge(im, ad.tensors, merged.fingerprint)
    for a, b, base in zip(merged.layers, ref.layers, im.layers, strict=True):
        for name in ("q_gain", "k_gain", "post_attn_gain", "post_mlp_gain"):
            assert torch.equal(getattr(a, name), getattr(base, name)) and torch.equal(getattr(b, name), getattr(base, name))
    prefix = [tok.start_token]
    inputs = _seq(im, 12, 8)
    lam, exp = _reference(ref, prefix, inputs, CONTEXT)
    got = _pass(Engine(merged, "cpu"), prefix, inputs, CONTEXT)
    assert np.array_equal(got[1], exp) and np.array_equal(got[0], lam)
