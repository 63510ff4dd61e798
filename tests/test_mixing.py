"""The online models and their mixer (lmcodec.coding.mixing): integer rows, determinism, real gains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcodec import Codec
from lmcodec.coding.frequencies import TOTAL, CodingTables
from lmcodec.coding.mixing import (
    ALL,
    BIAS_BIT,
    BIAS_CAP,
    BIAS_COUNT_CAP,
    BIAS_FRAC,
    BIAS_RATE,
    MATCH_BIT,
    ORDER_BITS,
    MixerConfig,
    StreamMixer,
    _rate_array,
    bias_rates,
    bias_step,
    biased_weights,
)
from lmcodec.engine.ops_torch import weights_from_gaps
from lmcodec.engine.spec.constants import OUT_U_CAP

ALPHABET = 49_152 + 256          # SmolLM2's: 256 buckets of 193 symbols, the last 256 escapes
WIDTH = 193


VOCAB = ALPHABET - 256


def lm_rows(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Token gaps shaped like the engine's (Engine.gaps): the best token 0, the rest up to the cap."""
    u = rng.integers(0, OUT_U_CAP + 1, size=(n, VOCAB), dtype=np.int64) >> rng.integers(0, 6, size=(n, 1))
    u[np.arange(n), rng.integers(0, VOCAB, size=n)] = 0
    return torch.from_numpy(u)


def test_config_names_round_trip():
    for mask in range(ALL + 1):
        cfg = MixerConfig(mask)
        assert MixerConfig.parse(cfg.describe()) == cfg
    assert MixerConfig.parse("all").mask == ALL and MixerConfig.parse("none").mask == 0
    assert MixerConfig.parse("match,order2").mask == MATCH_BIT | ORDER_BITS[2]
    with pytest.raises(ValueError):
        MixerConfig.parse("order7")
    assert MixerConfig.parse("bias").mask == BIAS_BIT and MixerConfig(ALL).bias
    with pytest.raises(ValueError):
        MixerConfig(0x80)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), mask=st.integers(1, ALL), lanes=st.integers(1, 4),
       steps=st.integers(1, 40), repeat=st.integers(1, 6))
def test_mixed_rows_are_valid_coding_rows_and_deterministic(seed, mask, lanes, steps, repeat):
    """Whatever the history, the mixed weights are non-negative int64 rows whose coding tables
    sum to 2^24 with every entry >= 1; two mixers fed the same sequence agree bit for bit."""
    rng = np.random.default_rng(seed)
    # Repetitive symbol streams, so the match model and the n-grams have something to find.
    motif = rng.integers(0, ALPHABET, size=repeat)
    seqs = [np.resize(motif, steps) if rng.random() < 0.7 else rng.integers(0, ALPHABET, size=steps)
            for _ in range(lanes)]
    a, b = StreamMixer(MixerConfig(mask), lanes, ALPHABET), StreamMixer(MixerConfig(mask), lanes, ALPHABET)
    for t in range(steps):
        live = [i for i in range(lanes) if rng.random() < 0.9] or [0]
        p = lm_rows(rng, len(live))
        wa, wb = a.mix(live, p), b.mix(live, p.clone())
        assert torch.equal(wa, wb) and wa.dtype == torch.int64 and bool((wa >= 0).all())
        assert int(wa.sum(dim=2).max()) < 1 << 38   # a bucket's mass: CodingTables' int64 bound
        tables = CodingTables(wa, ALPHABET)
        assert (tables.stage1().sum(axis=1) == TOTAL).all() and (tables.stage1() >= 1).all()
        sym = [int(seqs[i][t]) for i in live]
        s2 = tables.stage2(np.array(sym) // WIDTH)
        assert (s2.sum(axis=1) == TOTAL).all() and (s2 >= 1).all()
        a.update(sym)
        b.update(sym)
    assert a.weights == b.weights
    assert (a.bias is None) == (b.bias is None) and (a.bias is None or torch.equal(a.bias, b.bias))


def test_disabled_mixer_is_the_lm_itself():
    rng = np.random.default_rng(0)
    u = lm_rows(rng, 3)
    m = StreamMixer(MixerConfig(0), 3, ALPHABET)
    assert torch.equal(m.mix([0, 1, 2], u), weights_from_gaps(u, ALPHABET, WIDTH))
    m.update([1, 2, 3])


def reference_rate(count: int) -> int:
    """floor(BIAS_RATE / sqrt(count + 1)) by bisection: the largest r with r^2 (count + 1) <= BIAS_RATE^2."""
    lo, hi = 0, BIAS_RATE + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if mid * mid * (count + 1) <= BIAS_RATE * BIAS_RATE else (lo, mid)
    return lo


def test_bias_rates_are_the_floored_inverse_square_roots():
    table = bias_rates()
    assert len(table) == BIAS_COUNT_CAP + 1 and table[0] == BIAS_RATE and table[3] == BIAS_RATE // 2
    for c in [0, 1, 2, 5, 7, 99, 1000, 4095, 65535, BIAS_COUNT_CAP]:
        assert table[c] == reference_rate(c)
    assert all(a >= b for a, b in zip(table, table[1:]))


def reference_bias_step(bias: list[int], counts: list[int], rows: list[list[int]],
                        symbols: list[int]) -> tuple[list[list[int]], list[int]]:
    """The adaptive bias as docs/ENGINE.md states it, on Python ints (the test's independent reference).

    Returns the rows' adapted token weights and the bias after learning the step;
    ``counts`` (times each token was coded) is updated in place.
    """
    from lmcodec.engine.spec.fixedmath import exp2_table

    table = [int(x) for x in exp2_table()]
    weights = []
    for u in rows:
        v = [g - (b >> BIAS_FRAC) for g, b in zip(u, bias)]
        low = min(v)
        v = [min(x - low, OUT_U_CAP) for x in v]
        weights.append([table[x % 1024] >> (x // 1024) for x in v])
    for y in symbols:
        if y < VOCAB:
            counts[y] += 1
    rate = [reference_rate(min(c, BIAS_COUNT_CAP)) for c in counts]
    new = list(bias)
    for q, y in zip(weights, symbols):
        if y >= VOCAB:
            continue
        total = sum(q)
        for i, qi in enumerate(q):
            new[i] -= qi * rate[i] // total
        new[y] += rate[y]
    return weights, [max(-BIAS_CAP, min(BIAS_CAP, b)) for b in new]


def test_adaptive_bias_matches_a_plain_reference():
    """Several steps of several rows (one an escape) against the Python-int reference, bit for bit."""
    rng = np.random.default_rng(7)
    m = StreamMixer(MixerConfig(BIAS_BIT), 3, ALPHABET)
    bias, counts = [0] * VOCAB, [0] * VOCAB
    for step in range(5):
        u = lm_rows(rng, 3)
        sym = [int(rng.integers(0, VOCAB)), 17, VOCAB + 5 if step == 1 else 17]
        got = m.mix([0, 1, 2], u)
        want, bias = reference_bias_step(bias, counts, u.tolist(), sym)
        assert got.reshape(3, -1)[:, :VOCAB].tolist() == want
        m.update(sym)
        assert m.bias.tolist() == bias


@pytest.mark.parametrize("seed", range(3))
def test_the_cpu_kernels_compute_the_tensor_steps_integers(seed):
    """bias_cpu (the CPU's path) against the tensor operations (other devices' path), bit for bit: biases at
    and near the caps, counts at the count cap, a token coded twice in one step, an escape, no bias."""
    from lmcodec.coding import bias_cpu

    rng = np.random.default_rng(seed)
    u = lm_rows(rng, 4)
    bias = torch.from_numpy(rng.integers(-BIAS_CAP - 5, BIAS_CAP + 5, VOCAB)).clamp(-BIAS_CAP, BIAS_CAP)
    bias[:3] = torch.tensor([BIAS_CAP, -BIAS_CAP, BIAS_CAP - 1])
    for b in (bias, None):
        got = bias_cpu.lm_weights(u, b, BIAS_FRAC, ALPHABET, WIDTH)
        assert torch.equal(got, biased_weights(u, b, ALPHABET))
    q = biased_weights(u, bias, ALPHABET).reshape(4, -1)
    coded = torch.from_numpy(rng.integers(0, BIAS_COUNT_CAP + 1, VOCAB))
    coded[:2] = BIAS_COUNT_CAP
    symbols = [0, 1, VOCAB + 3, 1]
    want_coded = coded.clone()
    want = bias_step(q, symbols, want_coded, bias.clone(), VOCAB)
    sym = np.asarray(symbols)
    rows = np.flatnonzero(sym < VOCAB)
    got_bias = bias.clone()
    bias_cpu.learn_bias(q, rows, sym[rows], coded, _rate_array(), got_bias, BIAS_COUNT_CAP, BIAS_CAP)
    assert torch.equal(coded, want_coded) and torch.equal(got_bias, want)


@pytest.mark.parametrize("rows", [3, 2_100])
def test_the_compiled_step_on_an_int32_bias_is_the_tensor_step(rows):
    """learn_step (the compiled decoder's and encoder's bias step, mixedpass) on the int32 bias it keeps,
    against bias_step's int64 tensors: 2,100 rows that all weigh one token they never code lower it by
    ~2^31 before the clamp, so that step runs on an int64 copy (bias_cpu.IN_PLACE_ROWS)."""
    from lmcodec.coding.bias_cpu import IN_PLACE_ROWS, learn_step
    from lmcodec.engine.cpu.jit import njit

    @njit
    def step(q, totals, ys, n, coded, rates, rate_now, bias, count_cap, bias_cap):
        learn_step(q, totals, ys, n, coded, rates, rate_now, bias, count_cap, bias_cap)

    vocab = 6
    rng = np.random.default_rng(rows)
    q = rng.integers(0, 1 << 10, size=(rows, vocab)).astype(np.int32)
    q[:, 0] = 1 << 30                                    # every row's mass on token 0 ...
    symbols = rng.integers(1, vocab + 2, size=rows)      # ... which none codes (>= vocab: escapes)
    bias = np.full(vocab, -BIAS_CAP, np.int32)
    bias[1:] = rng.integers(-BIAS_CAP, BIAS_CAP + 1, vocab - 1)
    coded = rng.integers(0, 3, vocab).astype(np.int32)
    rates = _rate_array()
    want_coded = torch.from_numpy(coded.astype(np.int64))
    want = bias_step(torch.from_numpy(q.astype(np.int64)), symbols.tolist(), want_coded,
                     torch.from_numpy(bias.astype(np.int64)), vocab)
    rate_now = rates[coded].astype(np.int32)
    totals = q.astype(np.int64).sum(axis=1)
    step(q, totals, symbols, rows, coded, rates, rate_now, bias, BIAS_COUNT_CAP, BIAS_CAP)
    assert (rows > IN_PLACE_ROWS) == (rows > 1000)
    assert np.array_equal(coded, want_coded.numpy()) and np.array_equal(bias, want.numpy())
    assert np.array_equal(rate_now, rates[coded])


def test_adaptive_bias_learns_the_document_and_stays_bounded():
    """A token the LM keeps under-predicting gains weight step by step, up to the cap and no further."""
    u = torch.full((1, VOCAB), 8 * 1024, dtype=torch.int64)
    u[0, 0] = 0
    m = StreamMixer(MixerConfig(BIAS_BIT), 1, ALPHABET)
    seen = []
    for _ in range(400):
        seen.append(int(m.mix([0], u).reshape(-1)[5]))
        m.update([5])
    assert seen[1] > seen[0] and seen[-1] >= seen[100] > seen[1]
    assert int(m.bias.max()) <= BIAS_CAP and int(m.bias.min()) >= -BIAS_CAP


def test_match_model_learns_a_repeat_the_lm_cannot_see():
    """Past the context the LM forgets; the match model codes the repeat far cheaper (real archives)."""
    passage = (b"Section 7.3: the gateway retries each request three times, waiting 250 ms, then 500 ms, "
               b"then 1 s, before it reports the upstream as unavailable and opens the circuit. ")
    filler = b"".join(f"line {i}: nothing of note happened here.\n".encode() for i in range(6))
    data = (passage + filler) * 3
    sizes = {}
    for mixer in ("none", "match"):
        c = Codec(segment_tokens=4096, context=32, lanes=2, threads=2, method="lm",
                  mixer=MixerConfig.parse(mixer).mask)
        blob = c.compress(data)
        assert c.decompress(blob) == data
        sizes[mixer] = c.last_stats.lm_payload_bytes
    assert sizes["match"] < 0.8 * sizes["none"], sizes


@pytest.mark.parametrize("mixer", ["bias", "match", "order0", "order1", "order2", "order3", "order4", "all"])
def test_every_online_model_round_trips_through_the_codec(mixer):
    """Each component alone (the ablation's variants) decodes to the input; the header keeps it."""
    import io

    from lmcodec.format.reader import Reader

    data = b"to be or not to be, that is the question; to be or not to be.\n" * 2
    c = Codec(segment_tokens=20, context=24, lanes=2, threads=2, method="lm", mixer=MixerConfig.parse(mixer).mask)
    blob = c.compress(data)
    assert Reader(io.BytesIO(blob)).header().mixer == MixerConfig.parse(mixer).mask
    assert Codec(threads=1, decode_rows=1).decompress(blob) == data
