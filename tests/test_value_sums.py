"""Attention's value sums in registers (lmcodec.engine.cpu.value_sums) equal plain int64 sums.

``acc[d] = sum_i w_i v[j_i, d]`` for each run width (64: SmolLM2 and Gemma 3 in runs of 64;
32 and 16: the tests' tiny models) and the plain loop for other head dims, at the weights'
largest values (2^40 - 1, the largest p vmax docs/ENGINE.md allows) and the values'
extremes, with keys in any order and repeated, and for no key at all.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcodec.engine.cpu import int_dots
from lmcodec.engine.cpu import rows as cpu_rows
from lmcodec.engine.cpu import value_sums as value_sums_mod
from lmcodec.engine.cpu.jit import njit


@njit
def _run(vc, js, ws, n, acc):
    cpu_rows._value_sums(vc, js, ws, n, acc)


def value_sums(vc: np.ndarray, js: np.ndarray, ws: np.ndarray) -> np.ndarray:
    acc = np.full(vc.shape[1], 7, np.int64)          # overwritten, not added to
    _run(vc, js.astype(np.int64), ws.astype(np.int64), len(js), acc)
    return acc


def plain(vc: np.ndarray, js: np.ndarray, ws: np.ndarray) -> np.ndarray:
    return (ws.astype(object)[:, None] * vc[js].astype(object)).sum(axis=0).astype(np.int64) if len(js) else \
        np.zeros(vc.shape[1], np.int64)


@pytest.mark.parametrize("hd", [16, 24, 32, 64, 256])
def test_value_sums_at_the_extremes(hd):
    vc = np.full((6, hd), 127, np.int8)
    vc[1] = -128
    vc[2, ::2] = -127
    js = np.array([0, 0, 2, 5, 0] * 40)
    ws = np.full(len(js), 2**40 - 1, np.int64)
    assert np.array_equal(value_sums(vc, js, ws), plain(vc, js, ws))
    assert np.array_equal(value_sums(vc, js[:0], ws[:0]), np.zeros(hd, np.int64))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([16, 32, 64, 128, 256, 48]), st.integers(0, 300), st.randoms(use_true_random=False))
def test_value_sums_equal_plain_sums(hd, n, rnd):
    rng = np.random.default_rng(rnd.getrandbits(32))
    vc = rng.integers(-128, 128, (40, hd), dtype=np.int8)
    js = rng.integers(0, 40, n)
    ws = rng.integers(0, 2**40, n)
    assert np.array_equal(value_sums(vc, js, ws), plain(vc, js, ws))


@njit
def _run_portable(vc, js, ws, n, acc):
    for d0 in range(0, acc.shape[0], 64):
        value_sums_mod.sums64(vc, js, ws, n, d0, acc)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([64, 256]), st.integers(0, 300), st.randoms(use_true_random=False))
def test_both_kernels_equal_plain_sums(hd, n, rnd):
    """The int64 runs (CPUs without VNNI) and, where this CPU has it, the VNNI byte products that
    _value_sums takes instead: the same sums, tails of 0-3 keys and the weights' top byte included."""
    rng = np.random.default_rng(rnd.getrandbits(32))
    vc = rng.integers(-128, 128, (40, hd), dtype=np.int8)
    js = rng.integers(0, 40, n)
    ws = rng.integers(0, 2**40, n)
    ws[: n // 3] = 2**40 - 1 - rng.integers(0, 256, n // 3)
    acc = np.full(hd, 7, np.int64)
    _run_portable(vc, js, ws, n, acc)
    assert np.array_equal(acc, plain(vc, js, ws))
    assert cpu_rows._VNNI_SUMS == int_dots.available()
    assert np.array_equal(value_sums(vc, js, ws), plain(vc, js, ws))
