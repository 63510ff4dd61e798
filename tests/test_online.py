"""lmcodec.coding.online (the online models as numba code on arrays) against StreamMixer, the oracle:
the same mixed rows at every step, the same tables, match index and weights at the end."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcodec.coding.mixing import ALL, BIAS_BIT, COUNT_LIMIT, MixerConfig, StreamMixer
from lmcodec.coding.online import CIDX, CTX_ROWS, LANEST, USED, OnlineModels
from lmcodec.engine.spec.constants import ESCAPES, OUT_U_CAP

WIDE = 49_152 + 256      # SmolLM2's alphabet: 256 buckets of 193
SMALL = 256 * 3          # 512 tokens + 256 escapes: collisions and halving come quickly
MASKS = sorted({m & ~BIAS_BIT for m in range(ALL + 1)})


def gaps(rng: np.random.Generator, n: int, vocab: int) -> torch.Tensor:
    """LM token gaps like the engine's: the best token 0, the rest spread so that every confidence occurs."""
    lo = int(rng.choice([0, 0, 4096, 10240, 20480]))
    u = rng.integers(lo, OUT_U_CAP + 1, size=(n, vocab), dtype=np.int64) >> rng.integers(0, 6, size=(n, 1))
    u[np.arange(n), rng.integers(0, vocab, size=n)] = 0
    return torch.from_numpy(u)


def sequence(rng: np.random.Generator, n: int, alphabet: int) -> np.ndarray:
    """Symbols with many repeats: a motif repeated with noise, from a small pool (escapes included)."""
    pool = rng.integers(0, alphabet, size=int(rng.integers(1, 40)))
    pool[: len(pool) // 4] = rng.integers(alphabet - ESCAPES, alphabet, size=len(pool) // 4)
    motif = rng.choice(pool, size=int(rng.integers(1, 12)))
    seq = np.resize(motif, n)
    noise = rng.random(n) < rng.choice([0.0, 0.05, 0.3, 1.0])
    seq[noise] = rng.choice(pool, size=int(noise.sum()))
    return seq.astype(np.int64)


def run(mask: int, seqs: list[np.ndarray], alphabet: int, rng: np.random.Generator, *, collide: bool = False,
        flat: bool = True) -> tuple[StreamMixer, OnlineModels]:
    """Feed both the same steps (only live lanes get rows); assert identical mixed rows at every step."""
    cfg = MixerConfig(mask)
    lanes = len(seqs)
    lengths = [len(s) for s in seqs]
    oracle = StreamMixer(cfg, lanes, alphabet)
    online = OnlineModels(cfg, lanes, sum(lengths), alphabet, lane_lengths=lengths if flat else None,
                          collide=collide)
    for t in range(max(lengths)):
        live = [i for i in range(lanes) if t < lengths[i]]
        want = oracle.mix(live, gaps(rng, len(live), alphabet - ESCAPES))
        p = oracle._lm_rows.numpy().copy()
        got = online.mix(live, p)
        assert np.array_equal(want.reshape(len(live), -1).numpy(), got), f"step {t}"
        sym = [int(seqs[i][t]) for i in live]
        oracle.update(sym)
        online.update(sym, p)
    check_state(oracle, online)
    return oracle, online


def check_state(oracle: StreamMixer, online: OnlineModels) -> None:
    """Tables, match model, histories and every mixing context's weights agree."""
    if online.n_components == 1:
        return
    want = {k: {key: (oracle.totals[k][key], oracle.counts[k][key]) for key in oracle.counts[k]}
            for k in oracle.orders}
    assert online.tables() == want
    for i, lane in enumerate(oracle.lanes):
        assert online.history(i) == lane.history
        if oracle.config.match:
            assert tuple(online.state[LANEST][i, 3:]) == (lane.match_lane, lane.match_pos, lane.match_len)
    if oracle.config.match:
        assert online.match_index() == oracle.index
    initial = online.initial()
    seen = {}
    for b in range(4):
        for top in range(6):
            for conf in range(3):
                seen[(b, top, conf)] = online.weights_of((b, top, conf))
    assert len(seen) == CTX_ROWS
    for ctx, w in seen.items():
        assert w == oracle.weights.get(ctx, initial), ctx


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), mask=st.sampled_from(MASKS), lanes=st.integers(1, 4),
       steps=st.integers(1, 120), collide=st.booleans(), flat=st.booleans())
def test_small_alphabet_matches_stream_mixer(seed, mask, lanes, steps, collide, flat):
    rng = np.random.default_rng(seed)
    seqs = [sequence(rng, int(rng.integers(1, steps + 1)), SMALL) for _ in range(lanes)]
    run(mask, seqs, SMALL, rng, collide=collide, flat=flat)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), mask=st.sampled_from(MASKS), lanes=st.integers(1, 4),
       steps=st.integers(1, 40))
def test_wide_alphabet_matches_stream_mixer(seed, mask, lanes, steps):
    rng = np.random.default_rng(seed)
    seqs = [sequence(rng, int(rng.integers(1, steps + 1)), WIDE) for _ in range(lanes)]
    run(mask, seqs, WIDE, rng)


def test_halving_in_every_order():
    """2,000 steps of 4 lanes: order 0 halves (limit 1,024) many times, orders 1..4 (4,096) on a context of
    symbol 0 repeated, with entries removed when their counts reach 0 (a lane of 60 rarer symbols)."""
    rng = np.random.default_rng(7)
    n = 2000
    seqs = []
    for lane in range(3):
        s = np.zeros(n, np.int64)
        noise = rng.random(n) < 0.01
        s[noise] = rng.integers(1, SMALL, size=int(noise.sum()))
        seqs.append(s[: n - 150 * lane])          # lanes end at different steps
    seqs.append(rng.integers(0, 60, size=n - 500) * 11 % SMALL)
    zeros = sum(int((s[:-1] == 0).sum()) for s in seqs)
    assert zeros > COUNT_LIMIT[1] + 1000        # the order-1 context (0,) must halve
    oracle, _ = run(ALL & ~BIAS_BIT, seqs, SMALL, rng)
    assert oracle.totals[1][(0,)] <= COUNT_LIMIT[1] and oracle.totals[4][(0, 0, 0, 0)] <= COUNT_LIMIT[4]
    assert oracle.totals[0][()] < COUNT_LIMIT[0]


def test_hash_collisions_are_exact():
    """Every key hashed into 4 slots: long probe runs, and lookups still tell keys apart exactly
    (contexts differing only in their order or in their last symbol, match keys sharing 5 symbols)."""
    rng = np.random.default_rng(3)
    seq = np.concatenate([np.zeros(40, np.int64), rng.integers(0, 4, size=400), np.arange(300) % SMALL])
    _, online = run(ALL & ~BIAS_BIT, [seq, seq[::-1].copy()], SMALL, rng, collide=True)
    cidx = online.state[CIDX]
    used = int(online.state[USED][0])
    assert used > 100 and (cidx[:used] >= 0).all()   # a single run from slot 0..3: every key collided
