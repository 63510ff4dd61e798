"""The exact engine's pieces: integer-only tables and quantization, exact products,
and a model that still is the float model (up to quantization)."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcodec.coding.runner import score_ids
from lmcodec.coding.tokens import ByteTokenizer
from lmcodec.engine import ops_torch
from lmcodec.engine.engine import Engine, int_mm
from lmcodec.engine.model import registry as models
from lmcodec.engine.model.quantize import _mantissas, load_int_model, quantize_gain, quantize_linear
from lmcodec.engine.spec import fixedmath

# -- constant tables -----------------------------------------------------------------------


def test_tables_are_the_functions_they_name():
    e = fixedmath.exp2_table()
    f = np.arange(1024)
    assert np.abs(e - np.round(2.0 ** 30 * 2.0 ** (-f / 1024))).max() <= 1
    s = fixedmath.sigmoid_table()
    x = (np.arange(len(s)) - 16384) / 1024
    assert np.abs(s - np.round(65536 / (1 + np.exp(-x)))).max() <= 1
    cos, sin = fixedmath.rope_tables(Fraction(100000), 64, 5000)
    ang = np.arange(5000)[:, None] * 100000.0 ** (-np.arange(32) / 32)
    assert np.abs(cos - np.round(np.cos(ang) * 65536)).max() <= 1
    assert np.abs(sin - np.round(np.sin(ang) * 65536)).max() <= 1
    assert fixedmath.log2e(40) == round(math.log2(math.e) * 2**40)


def test_tables_are_the_same_bytes_everywhere():
    """Integer-only code: these digests are constants of the spec (docs/ENGINE.md)."""
    digest = lambda a: hashlib.blake2b(np.ascontiguousarray(a, "<i8").tobytes(), digest_size=8).hexdigest()
    cos, sin = fixedmath.rope_tables(Fraction(100000), 64, 2048)
    assert {"exp2": digest(fixedmath.exp2_table()), "sigmoid": digest(fixedmath.sigmoid_table()),
            "rope": digest(np.concatenate([cos, sin]))} == TABLE_DIGESTS


TABLE_DIGESTS = {"exp2": "083d0187b0ae710c", "sigmoid": "f1adff4891ba207a", "rope": "df4461dec79d595e"}


# -- quantization from the float bits ----------------------------------------------------------

def _exact_round(x: Fraction) -> int:
    """Halves away from zero."""
    n = math.floor(abs(x) + Fraction(1, 2))
    return n if x >= 0 else -n


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 40), st.integers(-140, 20))
def test_weight_quantization_is_the_exact_rational_rounding(seed, n, k, scale):
    rng = np.random.default_rng(seed)
    w = (rng.normal(size=(n, k)) * 2.0 ** scale).astype(np.float32)
    w[rng.random((n, k)) < 0.1] = 0.0
    q, mult, shift = quantize_linear(w)
    for i in range(n):
        row = [Fraction(float(v)) for v in w[i]]
        a = max(abs(v) for v in row)
        if a == 0:
            assert not q[i].any() and mult[i] == 0
            continue
        assert q[i].tolist() == [_exact_round(127 * v / a) for v in row]
        assert mult[i] == math.floor(a * 2**shift / 127 + Fraction(1, 2))
    assert not mult.any() or 2**23 <= mult.max() <= 2**24


def test_mantissas_are_exact_for_every_kind_of_float():
    x = np.array([0.0, -0.0, 1.0, -3.5, 1e-45, 3e-39, 3.4e38, 2.0**-126], dtype=np.float32)
    m, e = _mantissas(x)
    for v, mi, ei in zip(x, m, e):
        assert Fraction(float(v)) == Fraction(int(mi)) * Fraction(2) ** int(ei) or mi == 0


def test_gain_quantization():
    g = np.array([0.5, -1.25, 3.0, 1e-4], dtype=np.float32)
    G, shift = quantize_gain(g)
    assert 2**14 <= np.abs(G).max() < 2**15
    assert np.allclose(G * 2.0**-shift, g, atol=2.0**-shift)


# -- exact integer primitives ----------------------------------------------------------------

def test_isqrt_is_exact():
    rng = np.random.default_rng(0)
    n = np.concatenate([rng.integers(0, 2**60, 5000), np.arange(0, 2000), (np.arange(1, 3000) ** 2) - 1,
                        np.arange(1, 3000) ** 2, [2**60 - 1]])
    got = ops_torch.isqrt(torch.from_numpy(n)).numpy()
    assert got.tolist() == [math.isqrt(int(v)) for v in n]


def test_int_mm_is_exact_at_the_operand_limits():
    rng = np.random.default_rng(1)
    x = rng.integers(-32639, 32640, size=(37, 1536))
    x[0] = 32639
    x[1] = -32639
    w = rng.integers(-127, 128, size=(300, 1536))
    w[0] = 127
    w[1] = -127
    y = ops_torch.combine(int_mm(torch.from_numpy(x).to(torch.int16), torch.from_numpy(w).to(torch.int8)))
    assert np.array_equal(y.numpy(), x @ w.T)


@pytest.mark.parametrize("rows", [1, 5, 63, 64, 300])
def test_operand_split_is_the_byte_decomposition(rows):
    """[hi; lo] with v = 256 hi + lo and lo in [-128, 127], on both sides of the CPU kernel's parallel threshold
    (lmcodec.engine.cpu.ops.split) and on the tensor path the GPU takes (ops_torch.split), checked against Python ints."""
    from lmcodec.engine.cpu import ops as ops_cpu

    rng = np.random.default_rng(rows)
    x = rng.integers(-32639, 32640, size=(rows, 577)).astype(np.int16)
    x[0, :4] = [32639, -32639, 127, -128]
    h = torch.from_numpy(x)
    got = ops_cpu.split(h).numpy().astype(np.int64)
    hi, lo = got[:rows], got[rows:]
    assert np.array_equal(256 * hi + lo, x.astype(np.int64)) and lo.min() >= -128 and lo.max() <= 127
    assert ops_cpu.SPLIT_PARALLEL_ROWS == 64  # the rows above sit on both sides of it
    assert torch.equal(ops_torch.split(h), ops_cpu.split(h))


def test_fit_shift_is_the_least_fitting_shift():
    m = torch.tensor([0, 1, 32639, 32640, 65278, 65279, 2**40, 2**62 - 1])
    s = ops_torch.fit_shift(m, 32639)
    for mi, si in zip(m.tolist(), s.tolist()):
        fits = lambda k: (mi + ((1 << k) >> 1)) >> k <= 32639
        assert fits(si) and (si == 0 or not fits(si - 1))


# -- the model ---------------------------------------------------------------------------------

def hf_llama(loaded: models.LoadedModel):
    from transformers import LlamaConfig, LlamaForCausalLM

    a = loaded.arch
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size,
                      intermediate_size=a.intermediate_size, num_hidden_layers=a.num_layers,
                      num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
                      head_dim=a.head_dim, rms_norm_eps=a.rms_norm_eps, rope_theta=a.rope_theta,
                      tie_word_embeddings=a.tie_word_embeddings,
                      max_position_embeddings=a.max_position_embeddings)
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(loaded.weights, strict=False)
    if a.tie_word_embeddings:
        model.tie_weights()
    return model


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_engine_is_the_float_model_quantized(which, loaded_model, tiny_model_dir):
    loaded = loaded_model if which == "smollm2" else models.load(tiny_model_dir)
    tok = ByteTokenizer(loaded.tokenizer, loaded.arch.vocab_size)
    ids = [tok.start_token] + tok.model_inputs(tok.encode(
        b"The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst")).tolist()
    engine = Engine(load_int_model(loaded, tok.fingerprint), "cpu")
    with torch.inference_mode():
        h, e = score_ids(engine, torch.tensor([ids]))
        lg = engine.logits(h, e)
        exact = lg.lam.double() * torch.pow(2.0, lg.exp.double())
        ref = hf_llama(loaded)(torch.tensor([ids])).logits[0].double()
    nxt = torch.tensor(ids[1:])
    ce = lambda z: float(-torch.log_softmax(z[:-1], -1)[torch.arange(len(nxt)), nxt].mean())
    assert abs(ce(exact) - ce(ref)) < 0.02 * max(ce(ref), 1.0)
    assert torch.corrcoef(torch.stack([exact.flatten(), ref.flatten()]))[0, 1] > 0.99


def test_fingerprint_is_by_content_not_name(loaded_model, tokenizer, tiny_model_dir, tmp_path):
    copy = tmp_path / "renamed-model"
    shutil.copytree(tiny_model_dir, copy)
    tiny = models.load(tiny_model_dir)
    tt = ByteTokenizer(tiny.tokenizer, tiny.arch.vocab_size)
    renamed = models.load(copy)
    a = load_int_model(tiny, tt.fingerprint).fingerprint
    b = load_int_model(renamed, tt.fingerprint).fingerprint
    assert a == b
    assert a != load_int_model(loaded_model, tokenizer.fingerprint).fingerprint


def test_both_cpu_gemm_kernels_give_the_same_integers(monkeypatch):
    """Every CPU product path (int_mm's halves on _int_mm or float32 GEMMs, or the int16 rows on
    int_dots' portable loop) gives the exact sums, at the operand's and the weights' extremes."""
    from lmcodec.engine.cpu import gemm

    rng = np.random.default_rng(2)
    for k in (1536, 2048):
        x = torch.from_numpy(rng.integers(-32639, 32640, size=(19, k))).to(torch.int16)
        x[0], x[1] = 32639, -32639
        w = torch.from_numpy(rng.integers(-127, 128, size=(64, k))).to(torch.int8)
        w[:, :] = torch.where(torch.rand(64, k) < 0.5, w, torch.full_like(w, -127))
        w[0], w[1] = 127, -127
        ref = x.numpy().astype(np.int64) @ w.numpy().astype(np.int64).T
        for kind in ("int8", "float32"):
            for products in ("halves", "int16"):
                monkeypatch.setitem(gemm._CHOSEN, "LMCODEC_GEMM", kind)
                monkeypatch.setitem(gemm._CHOSEN, "LMCODEC_PRODUCTS", products)
                assert np.array_equal(ops_torch.combine(int_mm(x, w)).numpy(), ref), (k, kind, products)


def test_gemm_blocks_and_out_buffer_give_the_exact_sums(monkeypatch):
    """gemm.mm over several K-chunks and row and column blocks (PART_ELEMENTS), into a new
    result or a caller's buffer, on both kernels."""
    from lmcodec.engine.cpu import gemm

    rng = np.random.default_rng(5)
    a = torch.from_numpy(rng.integers(-128, 128, size=(1100, 1100))).to(torch.int8)
    b = torch.from_numpy(rng.integers(-127, 128, size=(1030, 1100))).to(torch.int8)
    a[0], b[0] = -128, -127
    ref = a.numpy().astype(np.int64) @ b.numpy().astype(np.int64).T
    assert gemm.PART_ELEMENTS // gemm.FLOAT32_EXACT_K < min(a.shape[0], b.shape[0]) and a.shape[1] > gemm.FLOAT32_EXACT_K
    for kind in ("int8", "float32"):
        monkeypatch.setitem(gemm._CHOSEN, "LMCODEC_GEMM", kind)
        assert np.array_equal(gemm.mm(a, b.t()).numpy(), ref), kind
        buf = torch.full((1100 * 1030 + 5,), 7, dtype=torch.int32)
        got = gemm.mm(a, b.t(), buf[:1100 * 1030].view(1100, 1030))
        assert got.data_ptr() == buf.data_ptr() and np.array_equal(got.numpy(), ref), kind


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: a thread count of 1 is the default")
def test_threads_asked_are_the_threads_used():
    """``torch_threads(1)`` holds for the first kernel of a fresh process too.

    numba's OpenMP layer shares torch's libgomp, and starting it resets the
    calling thread's OpenMP thread count (torch's count).  Started lazily inside
    ``torch_threads(1)`` it put every process's first block on all cores: 2
    workers of 1 thread ran 4 threads on 2 cores (docs/SCALE.md).
    """
    code = ("import torch, numba\n"
            "from lmcodec.engine.cpu import ops as ops_cpu\n"
            "from lmcodec.engine.engine import torch_threads\n"
            "with torch_threads(1):\n"
            "    ops_cpu.sync_threads()\n"
            "    print(torch.get_num_threads(), numba.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")})
    assert out.stdout.split() == ["1", "1"]
