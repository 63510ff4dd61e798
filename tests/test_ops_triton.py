"""The Triton kernels (lmcodec.engine.triton.ops): under Triton's interpreter on CPU, compiled on CUDA.

Each launcher must ``torch.equal`` the ops_torch function (itself proven equal
to lmcodec/engine/spec/reference.py in test_exact.py) at the spec limits, under two tile
configurations (integer sums and maxima cannot depend on tiles; this proves
it), and the whole engine running these kernels must equal the reference bit
for bit, in one parallel pass and step by step.  Every kernel also compiles
for sm_90 here, without a GPU.  On a CUDA machine this file runs the compiled
kernels, and test_exact.py the real model through them.

Shapes are small and int8 dot reductions >= 32 wide (the interpreter accepts
narrower ones that the NVIDIA compiler rejects); an interpreted launch costs
milliseconds per program.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

#: On a CUDA machine the kernels are compiled and run on the GPU (test_exact.py also runs the real
#: model there); elsewhere they run under Triton's interpreter on CPU tensors.  triton reads
#: TRITON_INTERPRET when it decorates a function -- its own library functions (tl.max, tl.sum)
#: too, when triton is first imported -- so it is set before anything imports triton.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before this module without TRITON_INTERPRET=1", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed here (Linux x86-64 only; the `test` extra)")

# noqa: E402
from lmcodec.coding import runner, steps
from lmcodec.engine.spec import fixedmath  # noqa: E402
from lmcodec.engine import ops_torch  # noqa: E402
from lmcodec.engine.triton import ints as triton_int  # noqa: E402
from lmcodec.engine.triton import ops as TRITON  # noqa: E402
from lmcodec.engine.engine import Engine, _backend, int_mm  # noqa: E402
from lmcodec.engine.spec.constants import (
    ACT_MAX,
    ATT_D_CAP,
    MLP_LIMIT,
    OUT_D_CAP,
    OUT_U_CAP,
    Q_MAX,
    QKV_LIMIT,
    RESID_LIMIT,
)

OPS = "split norm operand residual_add qkv mlp attend gaps".split()
#: The default tiles and a second set: 32-wide row tiles (several per row here) and 32-key attention tiles.
CONFIGS = [triton_int.Blocks(), triton_int.Blocks(cols=32, keys=32)]


@pytest.fixture(params=CONFIGS, ids=["default-tiles", "small-tiles"])
def ot(request, monkeypatch):
    monkeypatch.setattr(triton_int, "BLOCKS", request.param)
    return OnDevice(TRITON)


class OnDevice:
    """The module's launchers taking and returning CPU tensors, run on DEVICE (in-place updates copied back)."""

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def to_device(a):
            if isinstance(a, tuple):                 # Gemma's q/k norms and attention window
                return tuple(to_device(x) for x in a)
            return a.to(DEVICE) if isinstance(a, torch.Tensor) else a

        def call(*args):
            moved = [to_device(a) for a in args]
            out = fn(*moved)
            for a, m in zip(args, moved):
                if isinstance(a, torch.Tensor) and m is not a:
                    a.copy_(m.cpu())
            return tuple(o.cpu() for o in out) if isinstance(out, tuple) else None if out is None else out.cpu()
        return call


def ints(rng, lo, hi, shape, dtype=torch.int64):
    """Uniform integers in [lo, hi] (inclusive)."""
    return torch.from_numpy(rng.integers(lo, hi, shape, endpoint=True)).to(dtype)


def same(a, b):
    a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_module_is_the_cuda_backend_with_the_torch_op_set():
    module = importlib.import_module("lmcodec.engine.triton.ops")
    assert _backend("cuda") is module
    assert all(callable(getattr(module, name)) for name in OPS)
    assert all(callable(getattr(ops_torch, name)) for name in OPS)
    assert module.GEMMA_STEPS and callable(module.add_normed)          # Gemma 3's forms too


def test_kernels_compile_for_the_gpu_and_the_cpu_path_never_imports_triton():
    """In a fresh process (no interpreter): the engine's CPU path leaves triton unimported, and every
    kernel compiles for sm_90 with its products on int8 tensor cores (tests/compile_triton_kernels.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "compile_triton_kernels.py")
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 11 and all("compiled for sm_90" in line for line in lines)
    attend = [line for line in lines if line.startswith("_attend_kernel")]
    assert len(attend) == 2                                          # SmolLM2's and Gemma's (windowed)
    assert all("mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32" in line for line in attend)


def test_split(ot):
    rng = np.random.default_rng(0)
    h = ints(rng, -ACT_MAX, ACT_MAX, (5, 96), torch.int16)
    h[0, :6] = torch.tensor([ACT_MAX, -ACT_MAX, 127, -128, 128, -129])
    same(ot.split(h), ops_torch.split(h))


def test_norm(ot):
    rng = np.random.default_rng(1)
    x = ints(rng, -RESID_LIMIT, RESID_LIMIT, (5, 72))
    x[1] = ints(rng, -300, 300, (72,))             # s = 0: no shift
    x[2] = 0                                        # all eps
    x[3, :2] = torch.tensor([RESID_LIMIT, -RESID_LIMIT])
    gain = ints(rng, -(1 << 15) + 1, (1 << 15) - 1, (72,))
    eps_q32 = 42950                                 # SmolLM2's 1e-5 at 32 fractional bits
    eps = torch.tensor([(eps_q32 + (1 << (2 * s - 1))) >> (2 * s) if s else eps_q32 for s in range(64)])
    same(ot.norm(x, gain, 14, eps), ops_torch.norm(x, gain, 14, eps))


@pytest.mark.parametrize("limit", [ACT_MAX, Q_MAX])
def test_operand(ot, limit):
    rng = np.random.default_rng(2)
    x = ints(rng, -(1 << 52), 1 << 52, (2, 3, 40))
    x[0, 0] = ints(rng, -limit, limit, (40,))      # fits: shift 0
    x[0, 1, :2] = torch.tensor([limit, -limit])
    x[0, 2, :2] = torch.tensor([limit + 1, 2 * limit + 1])
    x[1, 0] = 0
    same(ot.operand(x, limit), ops_torch.operand(x, limit))


def test_residual_add(ot):
    rng = np.random.default_rng(3)
    m, n = 6, 70
    x = ints(rng, -RESID_LIMIT, RESID_LIMIT, (m, n))
    y = ints(rng, -(1 << 25), 1 << 25, (2 * m, n), torch.int32)    # |y * mult| < 2^58
    mult = ints(rng, 0, 1 << 24, (n,))
    mult[:2] = 1 << 24
    shift = 40
    # c = shift - exp - 16 from -20 (left shifts, the 2^40 clamp) to 62 (everything rounds to 0).
    exp = torch.tensor([[44], [24], [20], [0], [-22], [-38]])
    x1, x2 = x.clone(), x.clone()
    ot.residual_add(x1, y, mult, shift, exp)
    ops_torch.residual_add(x2, y, mult, shift, exp)
    same(x1, x2)
    assert (x1.abs() == RESID_LIMIT).any()


@pytest.mark.parametrize("hd,nh,nkv,bias", [(32, 4, 2, True), (64, 3, 1, False)])
def test_qkv_writes_the_same_cache_and_queries(ot, hd, nh, nkv, bias):
    rng = np.random.default_rng(hd)
    B, T, rows, slots = 2, 2, 3, 40
    n = (nh + 2 * nkv) * hd
    y = ints(rng, -(1 << 26), 1 << 26, (2 * B * T, n), torch.int32)
    mult = ints(rng, 0, 1 << 24, (n,))
    b = ints(rng, -(1 << 22), 1 << 22, (n,)) if bias else None
    exp = torch.tensor([[-3], [10], [30], [6]])    # from 2^24 clamps down to tiny values
    cos, sin = fixedmath.rope_tables(Fraction(10000), hd, 5000)
    pos = [17, 4999]
    cos, sin = torch.as_tensor(cos)[pos], torch.as_tensor(sin)[pos]
    at = torch.tensor([0, slots - 1])

    def run(ops):
        cache = [torch.zeros((rows, nkv, hd, slots), dtype=torch.int8), torch.zeros((rows, nkv, slots), dtype=torch.int32),
                 torch.zeros((rows, nkv, slots, hd), dtype=torch.int8), torch.zeros((rows, nkv, slots), dtype=torch.int32)]
        q = ops.qkv(y, mult, 45, b, exp, cos, sin, B, T, nh, nkv, hd, *cache, at)
        return q + tuple(cache)

    got, want = run(ot), run(ops_torch)
    same(got, want)
    assert want[3].max() == QKV_LIMIT                                # a clamped key magnitude


def test_qkv_with_a_position_and_slot_per_row(ot):
    """cos/sin and slots given per row ([B T]): each row equals ops_torch run on that row alone."""
    rng = np.random.default_rng(11)
    B, T, nh, nkv, hd, slots = 2, 2, 4, 2, 32, 40
    n = (nh + 2 * nkv) * hd
    y = ints(rng, -(1 << 26), 1 << 26, (2 * B * T, n), torch.int32)
    mult = ints(rng, 0, 1 << 24, (n,))
    exp = torch.tensor([[-3], [10], [30], [6]])
    cos, sin = (torch.as_tensor(t) for t in fixedmath.rope_tables(Fraction(10000), hd, 5000))
    pos, at = [7, 8, 4000, 4001], torch.tensor([3, 4, 39, 0])

    def cache():
        return [torch.zeros((B, nkv, hd, slots), dtype=torch.int8), torch.zeros((B, nkv, slots), dtype=torch.int32),
                torch.zeros((B, nkv, slots, hd), dtype=torch.int8), torch.zeros((B, nkv, slots), dtype=torch.int32)]

    got_cache, want_cache = cache(), cache()
    got = ot.qkv(y, mult, 45, None, exp, cos[pos], sin[pos], B, T, nh, nkv, hd, *got_cache, at)
    want = []
    for b in range(B):
        rows = slice(b * T, (b + 1) * T)
        yb = torch.cat([y[rows], y[B * T + b * T:B * T + (b + 1) * T]])
        want.append(ops_torch.qkv(yb, mult, 45, None, exp[rows], cos[pos[rows]], sin[pos[rows]], 1, T, nh, nkv, hd,
                                  *(c[b:b + 1] for c in want_cache), at[rows]))
    same(got, tuple(torch.cat(parts) for parts in zip(*want)))
    same(tuple(got_cache), tuple(want_cache))


#: Gemma 3's q/k norms before RoPE at head dims 32 (the tiny Gemma) and 256 (Gemma 3 270M, one KV head); gain
#: shifts that round right and, at -30, shift left past the 2^40 clamp.
@pytest.mark.parametrize("hd,nh,shifts", [(32, 4, (14, 12)), (256, 4, (-30, 3))])
def test_qkv_with_gemma_qk_norms(ot, hd, nh, shifts):
    rng = np.random.default_rng(hd + 1)
    B, T, nkv, rows, slots = 2, 2, 1, 3, 40
    n = (nh + 2 * nkv) * hd
    y = ints(rng, -(1 << 26), 1 << 26, (2 * B * T, n), torch.int32)
    mult = ints(rng, 0, 1 << 24, (n,))
    exp = torch.tensor([[-3], [10], [30], [6]])
    cos, sin = fixedmath.rope_tables(Fraction(10000), hd, 5000)
    cos, sin = torch.as_tensor(cos)[[17, 4999]], torch.as_tensor(sin)[[17, 4999]]
    gains = ints(rng, -(1 << 15) + 1, (1 << 15) - 1, (2, hd))
    norms = (gains[0], shifts[0], gains[1], shifts[1], _eps())
    at = torch.tensor([0, slots - 1])

    def run(ops):
        cache = [torch.zeros((rows, nkv, hd, slots), dtype=torch.int8), torch.zeros((rows, nkv, slots), dtype=torch.int32),
                 torch.zeros((rows, nkv, slots, hd), dtype=torch.int8), torch.zeros((rows, nkv, slots), dtype=torch.int32)]
        return ops.qkv(y, mult, 45, None, exp, cos, sin, B, T, nh, nkv, hd, *cache, at, norms) + tuple(cache)

    same(run(ot), run(ops_torch))


def _eps():
    """EPS[s] of SmolLM2's 1e-5 at 32 fractional bits (Engine._eps)."""
    eps_q32 = 42950
    return torch.tensor([(eps_q32 + (1 << (2 * s - 1))) >> (2 * s) if s else eps_q32 for s in range(64)])


@pytest.mark.parametrize("gain_shift", [14, -20])
def test_add_normed(ot, gain_shift):
    """Gemma's post-norm add: the product's norm16 joins the residual (rounded right, or shifted left)."""
    rng = np.random.default_rng(4)
    m, n = 6, 70
    x = ints(rng, -RESID_LIMIT, RESID_LIMIT, (m, n))
    y = ints(rng, -(1 << 25), 1 << 25, (2 * m, n), torch.int32)
    mult = ints(rng, 0, 1 << 24, (n,))
    exp = torch.tensor([[44], [24], [20], [0], [-22], [-38]])
    gain = ints(rng, -(1 << 15) + 1, (1 << 15) - 1, (n,))
    x1, x2 = x.clone(), x.clone()
    ot.add_normed(x1, y, mult, 40, exp, gain, gain_shift, _eps())
    ops_torch.add_normed(x2, y, mult, 40, exp, gain, gain_shift, _eps())
    same(x1, x2)
    assert (x1.abs() == RESID_LIMIT).any() == (gain_shift < 0)      # the left shift drives sums to the clamp


@pytest.mark.parametrize("table", ["sigmoid", "gelu"])
def test_mlp(ot, table):
    """SiLU's gate table (Llama) and GELU's (Gemma 3): the kernel takes the table it is given."""
    rng = np.random.default_rng(5)
    m, inter = 4, 48
    y = ints(rng, -(1 << 28), 1 << 28, (2 * m, 2 * inter), torch.int32)
    mult = ints(rng, 0, 1 << 24, (2 * inter,))
    exp = torch.tensor([[-10], [12], [20], [35]])
    sigmoid = torch.as_tensor(fixedmath.sigmoid_table() if table == "sigmoid" else fixedmath.gelu_gate_table())
    got, want = ot.mlp(y, mult, 40, exp, sigmoid), ops_torch.mlp(y, mult, 40, exp, sigmoid)
    same(got, want)
    gu = ops_torch.requant(ops_torch.combine(y), mult, 40, exp, 16)
    assert (gu.abs() > MLP_LIMIT).any() and ((gu[:, :inter] >> 6).abs() > 16384).any()  # both clamps bind


@pytest.mark.parametrize("hd,nh,nkv", [(32, 2, 2), (32, 4, 2), (64, 9, 3)])   # groups of 1, 2 and 3 heads
def test_attend(ot, hd, nh, nkv):
    rng = np.random.default_rng(nh)
    rows, slots, n = 3, 80, 6
    kt = ints(rng, -127, 127, (rows, nkv, hd, slots), torch.int8)
    vc = ints(rng, -127, 127, (rows, nkv, slots, hd), torch.int8)
    kmax = ints(rng, 0, QKV_LIMIT, (rows, nkv, slots), torch.int32)
    vmax = ints(rng, 0, QKV_LIMIT, (rows, nkv, slots), torch.int32)
    kt[0, :, :, 5], vc[0, :, 5] = 127, -127                          # extreme keys and values
    kmax[0, :, 5], vmax[0, :, 5] = QKV_LIMIT, QKV_LIMIT
    q16 = ints(rng, -Q_MAX, Q_MAX, (n, nh, hd), torch.int16)
    q16[0], q16[1, 0] = Q_MAX, -Q_MAX
    qe = ints(rng, 0, 10, (n, nh))
    qe[2] = 0
    # Key sets [0, a) + [b, c): sink and window, window only, sink only, all, overlapping, one key.
    crow = torch.tensor([0, 1, 2, 2, 0, 1])
    a = torch.tensor([3, 0, 33, 80, 20, 1])
    b = torch.tensor([10, 0, 50, 80, 10, 1])
    c = torch.tensor([75, 80, 50, 80, 60, 1])
    same(ot.attend(q16, qe, kt, kmax, vc, vmax, crow, a, b, c),
         ops_torch.attend(q16, qe, kt, kmax, vc, vmax, crow, a, b, c))
    # The caps bind: some score gaps pass ATT_D_CAP, so some keys weigh 0.
    z = q16[0, 0].long() @ kt[0, 0].long() * kmax[0, 0].long()
    assert ((z.max() - z) >> (19 - int(qe[0, 0]))).max() > ATT_D_CAP


@pytest.mark.parametrize("hd", [32, 256])
def test_attend_in_a_window_with_a_scale(ot, hd):
    """Gemma 3's local layers: keys by position (some queries see part of their set, one none at all:
    a padding column, 0), with query_pre_attn_scalar's constant; 4 query heads over 1 KV head."""
    rng = np.random.default_rng(hd)
    rows, slots, n, nh = 3, 80, 6, 4
    kt = ints(rng, -127, 127, (rows, 1, hd, slots), torch.int8)
    vc = ints(rng, -127, 127, (rows, 1, slots, hd), torch.int8)
    kmax = ints(rng, 0, QKV_LIMIT, (rows, 1, slots), torch.int32)
    vmax = ints(rng, 0, QKV_LIMIT, (rows, 1, slots), torch.int32)
    q16 = ints(rng, -Q_MAX, Q_MAX, (n, nh, hd), torch.int16)
    qe = ints(rng, 0, 10, (n, nh))
    crow = torch.tensor([0, 1, 2, 2, 0, 1])
    a = torch.tensor([3, 0, 33, 80, 20, 1])
    b = torch.tensor([10, 0, 50, 80, 10, 1])
    c = torch.tensor([75, 80, 50, 80, 60, 1])
    kpos = ints(rng, 0, 200, (rows, slots))
    lowest = torch.tensor([50, 100, 0, 150, 300, 0])               # query 4: no key at 300 or later
    lc = fixedmath.att_log2e(24)
    for window in (None, (kpos, lowest)):
        got = ot.attend(q16, qe, kt, kmax, vc, vmax, crow, a, b, c, window, lc)
        same(got, ops_torch.attend(q16, qe, kt, kmax, vc, vmax, crow, a, b, c, window, lc))
    assert not got[4].any() and got[0].any()


def test_gaps(ot):
    rng = np.random.default_rng(7)
    n, vocab = 4, 1000
    y = ints(rng, -(1 << 30), 1 << 30, (2 * n, vocab), torch.int32)
    mult = ints(rng, 0, 1 << 24, (vocab,))
    exp = torch.tensor([[-70], [-16], [0], [19]])  # pre > 0, pre = 0, and large rest shifts
    got = ot.gaps(y, mult, exp)
    same(got, ops_torch.gaps(y, mult, exp))
    lam = ops_torch.combine(y) * mult
    assert (lam[3].max() - lam[3] > OUT_D_CAP).any() and (got == OUT_U_CAP).any()  # both caps bind


def test_launchers_refuse_what_the_spec_excludes():
    with pytest.raises(ValueError):
        TRITON.split(torch.zeros((2, 4), dtype=torch.int32))
    with pytest.raises(ValueError):
        TRITON.operand(torch.zeros((2, 4), dtype=torch.int64), 1 << 15)
    q = torch.zeros((1, 2, 258), dtype=torch.int16)
    kt = torch.zeros((1, 1, 258, 4), dtype=torch.int8)
    v = torch.zeros((1, 1, 4, 258), dtype=torch.int8)
    m = torch.zeros((1, 1, 4), dtype=torch.int32)
    one = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError):                 # head dim 258 > MAX_HEAD_DIM
        TRITON.attend(q, torch.zeros((1, 2), dtype=torch.int64), kt, m, v, m, one, one, one, one)


# -- the whole engine on these kernels ---------------------------------------------------------
def test_engine_on_triton_kernels_equals_reference(tiny_model_dir):
    """A 2-layer model (head dim 16, 4 heads over 2) through Engine(ops=ops_triton): pass and steps."""
    from lmcodec.coding.tokens import ByteTokenizer
    from lmcodec.engine.model import registry as models
    from lmcodec.engine.model.quantize import load_int_model
    from lmcodec.engine.spec.reference import reference_run

    loaded = models.load(tiny_model_dir)
    tok = ByteTokenizer(loaded.tokenizer, loaded.arch.vocab_size)
    im = load_int_model(loaded, tok.fingerprint)
    prefix = [tok.start_token]
    symbols = tok.encode(b"Some other words, and 42.")[:5]
    inputs = tok.model_inputs(symbols)
    context = 4                                     # prefix 1 + a window of 3: the window slides
    lam, exp = reference_run(im, prefix + inputs[:-1].tolist(), 1, context)
    engine = Engine(im, DEVICE, ops=TRITON)
    with torch.inference_mode():
        pre = runner.prefill(engine, prefix)
        h, e = runner.score_segment(engine, pre, inputs[:-1], context)
        run = steps.Lockstep(engine, pre, 2, context, len(symbols))
        hs, es = [], []
        for t in range(len(symbols)):
            hs.append(run.h[1:2].clone())
            es.append(run.e[1:2].clone())
            run.advance(np.array([7, inputs[t]]))
    for hh, ee in ((h, e), (torch.cat(hs), torch.cat(es))):
        lg = engine.logits(hh, ee)
        assert np.array_equal(lg.lam.cpu().numpy(), lam) and np.array_equal(lg.exp.cpu().numpy().reshape(-1), exp)
    # Equal hidden rows: the pass's gaps stand for the steps' too.
    head = engine.model.head
    assert torch.equal(engine.gaps(h, e), ops_torch.gaps(int_mm(h, head.weight), head.mult, e - head.shift))


def test_graph_step_with_guesses_on_triton_kernels(tiny_model_dir):
    """The CUDA decoder's step (GraphStep: static inputs per width; graphs captured on CUDA) fed
    guesses -- rows of one pass with different k, guesses held or not, the ring crossed -- on the
    Triton kernels gives the CPU RowStep's outputs bit for bit."""
    from conftest import guessed_passes

    from lmcodec.coding.tokens import ByteTokenizer
    from lmcodec.engine.model import registry as models
    from lmcodec.engine.model.quantize import load_int_model

    loaded = models.load(tiny_model_dir)
    tok = ByteTokenizer(loaded.tokenizer, loaded.arch.vocab_size)
    im = load_int_model(loaded, tok.fingerprint)
    outs = []
    for engine, step in ((Engine(im, "cpu"), steps.RowStep), (Engine(im, DEVICE, ops=TRITON), steps.GraphStep)):
        with torch.inference_mode():
            pre = runner.prefill(engine, [tok.start_token])
            outs.append(guessed_passes(step(engine, pre, 2, 6, 40, spare=3), tok.vocab_size, 10, seed=9))
    for (h1, e1), (h2, e2) in zip(*outs):
        assert torch.equal(h1, h2) and torch.equal(e1, e2)


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory, loaded_model):
    """The 3-layer random Gemma 3 of tests/test_gemma.py, its window (4) and trained positions (10) shortened:
    an interpreted kernel launch costs ~30 ms a program, so the test's passes are few and short."""
    from conftest import load_tiny, make_tiny_gemma

    d = tmp_path_factory.mktemp("tiny-gemma")
    return load_tiny(make_tiny_gemma(d, loaded_model, max_positions=10, seed=3, window=4))


def test_gemma_on_triton_kernels_equals_reference(tiny_gemma):
    """Gemma 3 through Engine(ops=ops_triton) (its q/k norms, post norms, GELU table, windows and scale):
    one parallel pass equals the reference, and the CUDA decoder's step (GraphStep) fed guesses gives the
    CPU RowStep's outputs (numba) bit for bit, past the local window and the trained positions."""
    from conftest import guessed_passes

    from lmcodec.engine.spec.reference import reference_run

    im, tok = tiny_gemma
    prefix, context = [tok.start_token, 11, 12], 8
    inputs = np.random.default_rng(1).integers(0, im.arch.vocab_size, 14)
    lam, exp = reference_run(im, prefix + inputs[:-1].tolist(), len(prefix), context, trained=10)
    engine = Engine(im, DEVICE, ops=TRITON)
    assert engine.ops is TRITON
    with torch.inference_mode():
        pre = runner.prefill(engine, prefix)
        h, e = runner.score_segment(engine, pre, inputs[:-1], context)
        lg = engine.logits(h, e)
    start = len(prefix) - 1
    assert np.array_equal(lg.exp.cpu().numpy().reshape(-1), exp[start:])
    assert np.array_equal(lg.lam.cpu().numpy(), lam[start:])
    outs = []
    for engine, step in ((Engine(im, "cpu"), steps.RowStep), (Engine(im, DEVICE, ops=TRITON), steps.GraphStep)):
        with torch.inference_mode():
            pre = runner.prefill(engine, prefix)
            outs.append(guessed_passes(step(engine, pre, 2, context, 30, spare=2), tok.vocab_size, 8, seed=4))
    for (h1, e1), (h2, e2) in zip(*outs):
        assert torch.equal(h1, h2) and torch.equal(e1, e2)


def test_kernel_benchmark_runs_a_decode_step(tmp_path):
    """benchmarks/kernels.py (the GPU's per-kernel timing) on tiny shapes: its figures are all there."""
    import json

    from benchmarks import kernels

    out = tmp_path / "kernels.json"
    assert kernels.main(["--device", DEVICE, "--rows", "2", "--window", "40", "--reps", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["us_per_call"]) == set(OPS) and res["tokens_per_s_kernels_only"] > 0
