"""A pass over k guessed positions per row gives, bit for bit, what k single steps give.

This is the property an exact guess-and-verify decoder stands on (docs/ENGINE.md, "Rows at
their own positions"): each row feeds its last decoded token and k guesses at positions
p .. p+k in one Engine.forward; the prediction after guess j is kept only while guesses
1..j were right; the row then moves on by the tokens it kept, and its next pass rewrites the
slots the rejected guesses wrote (the rollback: in the cache's linear phase a query at p
reads only slots up to p, so stale slots above a row's position are never read).  Three rows
at different positions, a different k per row and pass, right and wrong guesses: every kept
prediction of every sequence must equal reference_run of that sequence alone, on both CPU
backends.  (Only the linear phase is exercised: in the ring phase a later query of a pass
would overwrite a slot an earlier query of the same pass reads.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_tiny, make_tiny_llama

from lmcodec.coding import runner
from lmcodec.engine import ops_torch
from lmcodec.engine.engine import Engine
from lmcodec.engine.kvcache import KVCache
from lmcodec.engine.spec.reference import reference_run

TRAINED = 64       # no prefix moves below it
CAPACITY = 48      # every position these sequences reach, and their guesses past the end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, loaded_model):
    return load_tiny(make_tiny_llama(tmp_path_factory.mktemp("verify-llama"), loaded_model,
                                     max_positions=TRAINED, seed=5))


def verify_pass(engine: Engine, cache: KVCache, positions: np.ndarray, feeds: np.ndarray):
    """Feed ``feeds[r]`` (T tokens) at positions ``positions[r] ..`` of each row, linear slots;
    the (lam, exp) of every query, [rows, T, ...]."""
    rows, T = feeds.shape
    pos = torch.as_tensor(positions[:, None] + np.arange(T), dtype=torch.int64)
    zero = torch.zeros_like(pos)
    h, e = engine.forward(torch.as_tensor(feeds), pos, cache, pos, (zero, zero, pos + 1), bound=CAPACITY)
    lg = engine.logits(h, e)
    return lg.lam.reshape(rows, T, -1).numpy(), lg.exp.reshape(rows, T).numpy()


@pytest.mark.parametrize("ops", ["cpu", "torch"])
def test_passes_over_guessed_positions_equal_single_steps(tiny, ops):
    im, tok = tiny
    vocab = im.arch.vocab_size
    rng = np.random.default_rng(11)
    prefix = [tok.start_token, 21, 22]
    P = len(prefix)
    seqs = [rng.integers(0, vocab, n) for n in (30, 17, 26)]
    engine = Engine(im, "cpu", ops=None if ops == "cpu" else ops_torch)
    got: list[list[tuple[np.ndarray, int]]] = [[] for _ in seqs]
    fed = [0] * len(seqs)                      # tokens of each sequence fed so far
    ks_seen, rejected = set(), 0
    with torch.inference_mode():
        pre = runner.prefill(engine, prefix)
        first = engine.logits(pre.h, pre.e)
        for s in range(len(seqs)):             # every sequence's first prediction is the prefix's
            got[s].append((first.lam[0].numpy(), int(first.exp[0])))
        cache = KVCache.empty(im, len(seqs), CAPACITY, "cpu")
        cache.copy_rows(pre.cache, P)
        while any(f + 1 < len(seq) for f, seq in zip(fed, seqs)):
            ks = [int(rng.integers(0, 4)) for _ in seqs]
            T = 1 + max(ks)
            feeds = rng.integers(0, vocab, (len(seqs), T))     # rows past their end: any token
            guesses_right = []
            for s, seq in enumerate(seqs):
                f, right = fed[s], 0
                if f + 1 >= len(seq):
                    guesses_right.append(0)
                    continue
                feeds[s, 0] = seq[f]           # the last decoded token
                for j in range(1, ks[s] + 1):  # then guesses of seq[f + j]: right or wrong
                    good = f + j < len(seq) and rng.random() < 0.6
                    feeds[s, j] = seq[f + j] if good else (seq[f + j] + 1) % vocab if f + j < len(seq) else 0
                    if good and right == j - 1:
                        right = j
                guesses_right.append(right)
                ks_seen.add(ks[s])
            positions = np.array([P + min(f, len(seq) - 1) for f, seq in zip(fed, seqs)])
            assert (positions + T <= CAPACITY).all()
            lam, exp = verify_pass(engine, cache, positions, feeds)
            for s, seq in enumerate(seqs):
                f = fed[s]
                if f + 1 >= len(seq):
                    continue
                keep = 1 + guesses_right[s]    # output j predicts seq[f + 1 + j]; kept while guesses held
                keep = min(keep, len(seq) - 1 - f)
                rejected += ks[s] > guesses_right[s]
                for j in range(keep):
                    got[s].append((lam[s, j], int(exp[s, j])))
                fed[s] = f + keep
    assert ks_seen >= {0, 1, 2, 3} and rejected > 0
    for s, seq in enumerate(seqs):
        ref_lam, ref_exp = reference_run(im, prefix + list(seq[:-1]), P, CAPACITY, trained=TRAINED)
        ref_lam, ref_exp = ref_lam[P - 1:], ref_exp[P - 1:]
        assert len(got[s]) == len(seq)
        assert np.array_equal(np.stack([g[0] for g in got[s]]), ref_lam), f"sequence {s}"
        assert np.array_equal(np.array([g[1] for g in got[s]]), ref_exp), f"sequence {s}"
