"""The fused step's products (lmcodec.engine.cpu.int_dots): exact int16 x int8 sums, both kernels.

The portable loop's int32 chunks and VNNI's byte split with its int32 lanes are checked at the
operand limits (every product +-32,639 x 127, the longest rows of both models), and against
numpy's int64 products on random shapes and row counts (hypothesis), including odd row counts
that take the 8-, 4- and 2-row blocks.  The output head's kernel takes the same products.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcodec.engine.cpu import fused as fused_cpu
from lmcodec.engine.cpu import int_dots

KERNELS = [pytest.param(True, id="vnni", marks=pytest.mark.skipif(not int_dots.available(),
                                                                  reason="this CPU has no AVX-512 VNNI")),
           pytest.param(False, id="portable")]


def products(h: np.ndarray, w: np.ndarray, vnni: bool) -> np.ndarray:
    wp, wsum = int_dots.pack(w) if vnni else int_dots.NO_PACK
    u = np.empty((2 * h.shape[0], h.shape[1]), np.uint8)
    if vnni:
        int_dots.split_rows(h, u)
    out = np.empty((h.shape[0], w.shape[0]), np.int64)
    int_dots.dots(h, u, w, wp, wsum, vnni, out)
    return out


def exact(h: np.ndarray, w: np.ndarray) -> np.ndarray:
    return h.astype(np.int64) @ w.astype(np.int64).T


@pytest.mark.parametrize("vnni", KERNELS)
@pytest.mark.parametrize("k", [4, 508, 512, 516, 576, 640, 1536, 2048])
def test_products_are_exact_at_the_operand_limits(k, vnni):
    rng = np.random.default_rng(k)
    w = np.where(rng.random((32, k)) < 0.5, -127, 127).astype(np.int8)
    w[0], w[1] = -127, 127
    h = np.where(rng.random((5, k)) < 0.5, -32639, 32639).astype(np.int16)
    h[0], h[1] = -32639, 32639           # rows 0/1 x weight rows 0/1: every product +-32,639 x 127
    assert np.array_equal(products(h, w, vnni), exact(h, w))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 11), st.integers(1, 5), st.integers(1, 40), st.randoms(use_true_random=False))
def test_vnni_blocks_equal_the_portable_loop(m, blocks, groups, rnd):
    rng = np.random.default_rng(rnd.getrandbits(32))
    n, k = 16 * blocks, 4 * groups
    w = rng.integers(-127, 128, (n, k), dtype=np.int8)
    h = rng.integers(-32639, 32640, (m, k), dtype=np.int16)
    want = exact(h, w)
    assert np.array_equal(products(h, w, False), want)
    if int_dots.available():
        assert np.array_equal(products(h, w, True), want)


def test_split_rows_is_the_byte_decomposition():
    h = np.array([[-32639, -256, -1, 0, 1, 255, 256, 32639]], np.int16)
    u = np.empty((2, 8), np.uint8)
    int_dots.split_rows(h, u)
    assert np.array_equal(256 * (u[0].astype(np.int64) - 128) + u[1], h[0])


def test_packable_shapes():
    assert int_dots.packable(np.zeros((16, 4), np.int8))
    assert not int_dots.packable(np.zeros((15, 4), np.int8))
    assert not int_dots.packable(np.zeros((16, 6), np.int8))
    assert not int_dots.packable(np.zeros((16, 4 * (int_dots.MAX_K // 4 + 1)), np.int8))
    assert int_dots.MAX_K * 255 * 128 < 2**31 <= (int_dots.MAX_K + 1) * 255 * 128


@pytest.mark.parametrize("vnni", KERNELS)
def test_head_kernel_takes_the_same_products(vnni):
    rng = np.random.default_rng(5)
    w = rng.integers(-127, 128, (48, 64), dtype=np.int8)
    h = rng.integers(-32639, 32640, (3, 64), dtype=np.int16)
    mult = rng.integers(1, 1000, 48).astype(np.int64)
    wp, wsum = int_dots.pack(w) if vnni else int_dots.NO_PACK
    lam = np.empty((3, 48), np.int64)
    out = np.empty((3, 48), np.int64)
    fused_cpu._head_gaps(h, np.empty((6, 64), np.uint8), w, wp, wsum, vnni, mult, np.zeros(3, np.int64), lam, out)
    assert np.array_equal(lam, exact(h, w) * mult)


def in_fresh_process(code: str, cache: Path, **env: str) -> None:
    """Run ``code`` in a new interpreter with ``env`` set and its own numba cache; it must exit 0."""
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, NUMBA_CACHE_DIR=str(cache), **env),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_kernels_compile_without_vnni(tmp_path):
    """With LMCODEC_VNNI=0 (as on a CPU without it) the kernels hold no VNNI code, compile and
    give the exact products on the portable loop (a fresh process and numba cache)."""
    code = ("import numpy as np\n"
            "from lmcodec.engine.cpu import int_dots\n"
            "assert not int_dots.available()\n"
            "rng = np.random.default_rng(1)\n"
            "w = rng.integers(-127, 128, (32, 64), dtype=np.int8)\n"
            "h = rng.integers(-32639, 32640, (3, 64), dtype=np.int16)\n"
            "out = np.empty((3, 32), np.int64)\n"
            "wp, ws = int_dots.NO_PACK\n"
            "int_dots.dots(h, np.empty((6, 64), np.uint8), w, wp, ws, False, out)\n"
            "assert np.array_equal(out, h.astype(np.int64) @ w.astype(np.int64).T)\n"
            "asm = ''.join(int_dots.dots.inspect_asm(s) for s in int_dots.dots.signatures)\n"
            "assert 'vpdpbusd' not in asm\n")
    in_fresh_process(code, tmp_path, LMCODEC_VNNI="0")


def test_the_portable_loop_without_avx2_blocks(tmp_path):
    """With LMCODEC_AVX2=0 the kernels hold no AVX2 blocks (as on an ARM CPU or an x86 one without
    AVX2): rows in fours take the portable loop and give the same exact products (a fresh
    process and numba cache)."""
    code = ("import numpy as np\n"
            "from lmcodec.engine.cpu import int_dots\n"
            "assert not int_dots.avx2_available()\n"
            "rng = np.random.default_rng(3)\n"
            "w = rng.integers(-127, 128, (32, 64), dtype=np.int8)\n"
            "h = rng.integers(-32639, 32640, (9, 64), dtype=np.int16)\n"
            "h[0] = 32639\n"
            "out = np.empty((9, 32), np.int64)\n"
            "wp, ws = int_dots.NO_PACK\n"
            "int_dots.dots(h, np.empty((18, 64), np.uint8), w, wp, ws, False, out)\n"
            "assert np.array_equal(out, h.astype(np.int64) @ w.astype(np.int64).T)\n"
            "y = np.empty((18, 32), np.int32)\n"
            "int_dots.dots_halves(h, w, y)\n"
            "assert np.array_equal(256 * y[:9].astype(np.int64) + y[9:], out)\n")
    in_fresh_process(code, tmp_path, LMCODEC_AVX2="0")
