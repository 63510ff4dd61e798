"""The fused CPU step (lmcodec.engine.cpu.fused) gives the general path's integers, bit for bit.

Engine.forward and Engine.gaps take the fused step at up to ``ops_cpu.FUSED_ROWS`` query
rows; tests/test_exact.py and tests/test_rows.py check both paths against the reference.
Here the two paths run the same passes side by side on a tiny model: shared and per-row
positions, several positions per row, rows reused, through the ring, every hidden row,
exponent, gap and cache entry equal, with the products on AVX-512 VNNI (where the CPU has
it) and on the portable loop.  The products themselves: tests/test_int_dots.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_tiny, make_tiny_llama

from lmcodec.engine.cpu import fused as fused_cpu
from lmcodec.engine.cpu import int_dots
from lmcodec.engine.cpu import ops as ops_cpu
from lmcodec.engine.engine import Engine
from lmcodec.engine.kvcache import KVCache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, loaded_model):
    return load_tiny(make_tiny_llama(tmp_path_factory.mktemp("fused-llama"), loaded_model, seed=7))


def run_passes(engine: Engine, fused_rows: int, monkeypatch, passes) -> list:
    """Each pass's (h, e, gaps) and the final cache, with the fused step up to ``fused_rows`` rows."""
    monkeypatch.setattr(ops_cpu, "FUSED_ROWS", fused_rows)
    cache = KVCache.empty(engine.model, 3, 12, "cpu")
    out = []
    for ids, pos, slots, ka, kb, kc in passes:
        h, e = engine.forward(ids, pos, cache, slots, (ka, kb, kc))
        out.append((h, e, engine.gaps(h, e)))
    out.append(tuple(torch.cat([t.reshape(-1).to(torch.int64) for t in ts]) for ts in
                     (cache.k, cache.kmax, cache.v, cache.vmax)))
    return out


def make_passes(vocab: int) -> list:
    rng = np.random.default_rng(3)
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))
    passes = []
    # shared positions [T]: a prefix pass of 3 rows x 1, then lockstep steps
    for p in range(4):
        passes.append((t(rng.integers(0, vocab, (3, 1))), t([p]), t([p]), t([0]), t([0]), t([p + 1])))
    # per-row positions [B, T]: rows at their own positions, a ring past slot 11 (prefix 2)
    pos = np.array([4, 6, 9])
    for _ in range(6):
        slot = np.where(pos < 12, pos, 2 + (pos - 2) % 10)
        ends = np.minimum(pos + 1, 12)
        passes.append((t(rng.integers(0, vocab, (3, 1))), t(pos[:, None]), t(slot[:, None]), t(np.zeros((3, 1))),
                       t(np.zeros((3, 1))), t(ends[:, None])))
        pos = pos + 1
    # two rows, two positions each (a verify pass: 4 query rows)
    p2 = np.array([[3, 4], [5, 6]])
    passes.append((t(rng.integers(0, vocab, (2, 2))), t(p2), t(p2), t(np.zeros((2, 2))), t(np.zeros((2, 2))), t(p2 + 1)))
    # three rows, three positions each: 9 query rows, one row and 8 guesses' worth
    p3 = np.array([[7, 8, 9], [8, 9, 10], [2, 3, 4]])
    passes.append((t(rng.integers(0, vocab, (3, 3))), t(p3), t(p3), t(np.zeros((3, 3))), t(np.zeros((3, 3))),
                   t(p3 + 1)))
    # two rows, eight positions each: 16 query rows (ops_cpu.FUSED_ROWS)
    p4 = np.array([np.arange(2, 10), np.arange(3, 11)])
    passes.append((t(rng.integers(0, vocab, (2, 8))), t(p4), t(p4), t(np.zeros((2, 8))), t(np.zeros((2, 8))),
                   t(p4 + 1)))
    assert max(p[0].numel() for p in passes) == ops_cpu.FUSED_ROWS
    return passes


@pytest.mark.parametrize("vnni", [True, False], ids=["vnni", "portable"])
def test_fused_step_equals_the_general_path(tiny, monkeypatch, vnni):
    if vnni and not int_dots.available():
        pytest.skip("this CPU has no AVX-512 VNNI")
    im, tok = tiny
    engine = Engine(im, "cpu")
    engine.scratch["vnni"] = vnni            # fused_cpu.uses_vnni's decision, made here
    passes = make_passes(tok.vocab_size)
    fused = run_passes(engine, ops_cpu.FUSED_ROWS, monkeypatch, passes)
    general = run_passes(engine, 0, monkeypatch, passes)
    for a, b in zip(fused, general):
        for u, v in zip(a, b):
            assert torch.equal(u, v)
    assert fused_cpu.uses_vnni(engine) is vnni



def test_an_engine_packs_for_vnni_only_after_its_first_fused_calls(tiny, monkeypatch):
    """The first PACK_AFTER fused calls run on the portable loop (no packed copy of the weights:
    a compressor's few fused calls never make one), later ones on VNNI where the CPU has it;
    the integers are the general path's throughout, across the switch."""
    im, tok = tiny
    passes = make_passes(tok.vocab_size)
    assert 2 * len(passes) > fused_cpu.PACK_AFTER + 1     # forward and gaps per pass: the switch falls inside
    engine = Engine(im, "cpu")
    fused = run_passes(engine, ops_cpu.FUSED_ROWS, monkeypatch, passes)
    general = run_passes(Engine(im, "cpu"), 0, monkeypatch, passes)
    for a, b in zip(fused, general):
        for u, v in zip(a, b):
            assert torch.equal(u, v)
    assert fused_cpu.uses_vnni(engine) is int_dots.available()
    fresh = Engine(im, "cpu")
    run_passes(fresh, ops_cpu.FUSED_ROWS, monkeypatch, passes[:1])
    assert fused_cpu.uses_vnni(fresh) is False and fresh.scratch.get("fused_calls", 0) <= fused_cpu.PACK_AFTER
