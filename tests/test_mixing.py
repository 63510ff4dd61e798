"""The online models and their mixer (lmcodec.mixing): integer rows, determinism, real gains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcodec import Codec
from lmcodec.frequencies import TOTAL, CodingTables
from lmcodec.mixing import ALL, MATCH_BIT, ORDER_BITS, MixerConfig, StreamMixer

ALPHABET = 49_152 + 256          # SmolLM2's: 256 buckets of 193 symbols, the last 256 escapes
WIDTH = 193


def lm_rows(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Symbol weights shaped like the engine's: the best symbol 2^30, the rest below."""
    p = rng.integers(0, 1 << 24, size=(n, 256 * WIDTH), dtype=np.int64) >> rng.integers(0, 24, size=(n, 1))
    p[np.arange(n), rng.integers(0, ALPHABET - 256, size=n)] = 1 << 30
    return torch.from_numpy(p).view(n, 256, WIDTH)


def test_config_names_round_trip():
    for mask in range(ALL + 1):
        cfg = MixerConfig(mask)
        assert MixerConfig.parse(cfg.describe()) == cfg
    assert MixerConfig.parse("all").mask == ALL and MixerConfig.parse("none").mask == 0
    assert MixerConfig.parse("match,order2").mask == MATCH_BIT | ORDER_BITS[2]
    with pytest.raises(ValueError):
        MixerConfig.parse("order7")
    with pytest.raises(ValueError):
        MixerConfig(0x40)


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
        assert int(wa.reshape(len(live), -1).sum(dim=1).max()) < 1 << 38   # CodingTables' int64 bound
        tables = CodingTables(wa, ALPHABET)
        assert (tables.stage1().sum(axis=1) == TOTAL).all() and (tables.stage1() >= 1).all()
        sym = [int(seqs[i][t]) for i in live]
        s2 = tables.stage2(np.array(sym) // WIDTH)
        assert (s2.sum(axis=1) == TOTAL).all() and (s2 >= 1).all()
        a.update(sym)
        b.update(sym)
    assert a.weights == b.weights


def test_disabled_mixer_is_the_lm_itself():
    rng = np.random.default_rng(0)
    p = lm_rows(rng, 3)
    m = StreamMixer(MixerConfig(0), 3, ALPHABET)
    assert m.mix([0, 1, 2], p) is p
    m.update([1, 2, 3])


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


@pytest.mark.parametrize("mixer", ["match", "order0", "order1", "order2", "order3", "order4", "all"])
def test_every_online_model_round_trips_through_the_codec(mixer):
    """Each component alone (the ablation's variants) decodes to the input; the header keeps it."""
    from lmcodec.container import Reader
    import io

    data = b"to be or not to be, that is the question; to be or not to be.\n" * 2
    c = Codec(segment_tokens=20, context=24, lanes=2, threads=2, method="lm", mixer=MixerConfig.parse(mixer).mask)
    blob = c.compress(data)
    assert Reader(io.BytesIO(blob)).header().mixer == MixerConfig.parse(mixer).mask
    assert Codec(threads=1, decode_rows=1).decompress(blob) == data
