"""The fused CPU step's products: ``out[i, n] = sum_k h[i, k] q[n, k]`` exactly, three ways.

``h`` is an int16 operand row (|h| <= ACT_MAX = 32,639), ``q`` an int8 weight row; every
sum is the exact integer docs/ENGINE.md's products specify, whichever kernel makes it.

* **The portable loop** (:func:`_dot`): int32 sums over chunks of ``DOT_CHUNK`` terms
  (512 x 32,639 x 127 < 2^31), added in int64.  LLVM makes it ``vpmaddwd``; it runs at
  ~33 GMAC/s a core here whatever the rows, because each row re-widens every weight.
* **AVX2 blocks** (:func:`_avx2_block`): four operand rows against two weight rows at a
  time, each run of 16 weights loaded and widened once for the four rows, the products on
  ``vpmaddwd`` (emitted as the instruction: LLVM turns a numba loop with several sums into
  ``vpmulld``, slower than one row at a time).  A lane adds two products per run of 16
  columns, at most K / 8 of them: exact in int32 for K <= :data:`AVX2_MAX_K` (4,144); the
  lanes are added in int64.  Used for blocks of four rows where the CPU has AVX2 (the
  generic target too) and ``LMCODEC_AVX2=0`` is not set; the remaining rows, and a pass of
  fewer than four, take the portable loop.
* **AVX-512 VNNI blocks** (:func:`_vnni_block`): the operand split into bytes,
  ``h = 256 (hi + 128) + lo - 32,768`` with ``hi + 128`` and ``lo`` in 0..255, so
  ``sum h q = 256 (sum (hi+128) q - 128 sum q) + sum lo q``, and each unsigned-by-signed
  byte sum is ``vpdpbusd``'s: 64 products an instruction into 16 int32 lanes.  The weights
  are packed once (:func:`pack`) in blocks of 16 rows by 4 columns, so one 64-byte load
  feeds every operand row of the pass and each lane ends holding one output: no horizontal
  sums.  A lane adds at most K x 255 x 128 (< 2^31 for K <= 65,793, :data:`MAX_K`), so the
  int32 sums are exact.  Faster than the portable loop at every row count, most at 2-9 rows
  (``python -m benchmarks.step --widths 1,9``; docs/SPEED.md).  The packed copies sit beside
  the weights the general path reads: 134 MB more for SmolLM2, 268 MB for Gemma 3.

LLVM does not make ``vpdpbusd`` from a numba loop (it widens the bytes to int16 and uses
``vpdpwssd``), so the block is a numba intrinsic that emits the instruction itself; on a
CPU without it (or with ``LMCODEC_VNNI=0``) the intrinsic compiles to a trap that
:func:`available` never lets run.
Every kernel is tested against the others and the reference (tests/test_int_dots.py).
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir

from . import platform
from .jit import JIT, intrinsic, njit, prange, types
from .llvm_loop import counted_loop, declare, splat, trap

#: int32 partial sums of at most this many products |h q| <= 32,639 x 127 stay below 2^31.
DOT_CHUNK = 512
#: The longest row VNNI's int32 lanes sum exactly: K x 255 x 128 < 2^31.
MAX_K = (2**31 - 1) // (255 * 128)
BLOCK_ROWS = 16      # weight rows a 512-bit block holds (lanes)
_BLOCK = 16          # weight rows per parallel task of the portable loop

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V16 = ir.VectorType(_I32, 16)
#: vpdpbusd on 512 bits: per int32 lane, the sum of four unsigned-by-signed byte products, added.
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"


def cpu_has_vnni() -> bool:
    """Whether this CPU (as LLVM sees it) has AVX-512 VNNI: vpdpbusd on 512-bit registers."""
    features = llvm.get_host_cpu_features()
    return all(features.get(f, False) for f in ("avx512f", "avx512bw", "avx512vnni"))


#: Whether the kernels hold VNNI code at all: the CPU has it, and neither ``LMCODEC_VNNI=0`` nor
#: ``LMCODEC_CPU=generic`` was set when this module was imported (with either they compile as on a
#: CPU that lacks it).
_EMIT = cpu_has_vnni() and os.environ.get("LMCODEC_VNNI", "1") != "0" and not platform.GENERIC


def available() -> bool:
    """The VNNI kernel is used (decided at import: :data:`_EMIT`)."""
    return _EMIT


def packable(w: np.ndarray) -> bool:
    """A weight matrix [N, K] the VNNI blocks take: whole blocks of rows and of 4 columns."""
    n, k = w.shape
    return n % BLOCK_ROWS == 0 and k % 4 == 0 and 0 < k <= MAX_K


def pack(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 [N, K] -> (the blocks, flat: block b's 4-column group g is the 64 bytes at
    (b K/4 + g) 64, row 16 b + l's four bytes at 4 l; each row's sum, int64 [N])."""
    n, k = w.shape
    blocks = w.reshape(n // BLOCK_ROWS, BLOCK_ROWS, k // 4, 4).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(blocks).reshape(-1), w.sum(axis=1, dtype=np.int64)


NO_PACK = (np.zeros(64, np.int8), np.zeros(1, np.int64))  # the stand-in where the portable loop runs


def _vnni_block(rows: int):
    """An intrinsic: acc[r, 0:16] = the VNNI sums of operand byte rows r0 .. r0 + rows - 1 of
    ``u`` (uint8 [*, K]) against the packed block at byte ``woff`` of ``w`` (``nk4`` = K / 4)."""

    @intrinsic
    def block(typingctx, u, r0, w, woff, nk4, acc):
        sig = types.void(u, r0, w, woff, nk4, acc)

        def codegen(context, builder, signature, args):
            ua, r0v, wa, woffv, nk, acca = args
            uarr = context.make_array(signature.args[0])(context, builder, ua)
            up = uarr.data
            stride = builder.extract_value(uarr.strides, 0)
            wp = context.make_array(signature.args[2])(context, builder, wa).data
            out = context.make_array(signature.args[5])(context, builder, acca).data
            zero = ir.Constant(_V16, None)
            if _EMIT:
                sums = _emit_loop(builder, up, stride, r0v, wp, woffv, nk, rows, zero)
            else:   # never run (available() is False): something any CPU compiles
                trap(builder)
                sums = [zero] * rows
            for r, s in enumerate(sums):
                dst = builder.gep(out, [ir.Constant(_I64, BLOCK_ROWS * r)])
                builder.store(s, builder.bitcast(dst, _V16.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return block


def _emit_loop(builder, up, stride, r0, wp, woff, nk, rows: int, zero) -> list:
    """for g < nk: acc_r = vpdpbusd(acc_r, broadcast(u[r0 + r, 4g : 4g + 4]), w[woff + 64 g : + 64])."""
    fn = declare(builder.module, VPDPBUSD, ir.FunctionType(_V16, [_V16, _V16, _V16]))

    def step(g, accs):
        at = builder.add(woff, builder.mul(g, ir.Constant(_I64, 64)))
        wv = builder.load(builder.bitcast(builder.gep(wp, [at]), _V16.as_pointer()), align=1)
        col = builder.mul(g, ir.Constant(_I64, 4))
        new = []
        for r, acc in enumerate(accs):
            base = builder.add(builder.mul(builder.add(r0, ir.Constant(_I64, r)), stride), col)
            four = builder.load(builder.bitcast(builder.gep(up, [base]), _I32.as_pointer()), align=1)
            new.append(builder.call(fn, [acc, splat(builder, four, _V16), wv]))
        return new

    return counted_loop(builder, nk, [zero] * rows, step, "vnni")


_block2 = _vnni_block(2)
_block4 = _vnni_block(4)
_block8 = _vnni_block(8)


#: vpmaddwd on 256 bits: per int32 lane, the sum of two int16 x int16 products.
PMADDWD = "llvm.x86.avx2.pmadd.wd"
_V8 = ir.VectorType(_I32, 8)
_H16 = ir.VectorType(ir.IntType(16), 16)
_B16 = ir.VectorType(ir.IntType(8), 16)
#: The longest row the AVX2 blocks sum exactly in their int32 lanes: a lane adds two products
#: (|h q| <= 32,639 x 127) per 16 columns, so K / 8 of them stay below 2^31 for K <= 4,144.
AVX2_MAX_K = 16 * ((2**31 - 1) // (2 * 32639 * 127))


def cpu_has_avx2() -> bool:
    """Whether this CPU (as LLVM sees it) has AVX2: vpmaddwd on 256-bit registers."""
    return llvm.get_host_cpu_features().get("avx2", False)


#: Whether the kernels hold AVX2 blocks (:func:`_avx2_block`): the CPU has AVX2 (under
#: ``LMCODEC_CPU=generic`` too: it is the AVX2 target) and ``LMCODEC_AVX2=0`` was not set.
_EMIT_AVX2 = cpu_has_avx2() and os.environ.get("LMCODEC_AVX2", "1") != "0"


def _avx2_block(rows: int, outs: int):
    """An intrinsic: acc[r outs + o] = sum_k h[r0 + r, k] w[n0 + o, k] (int64) for r < rows,
    o < outs, over ``nk16`` runs of 16 columns: each weight run loaded and widened once for
    every row (what the portable loop repeats per row), the products on ``vpmaddwd``."""

    @intrinsic
    def block(typingctx, h, r0, w, n0, nk16, acc):
        sig = types.void(h, r0, w, n0, nk16, acc)

        def codegen(context, builder, signature, args):
            ha, r0v, wa, n0v, nk, acca = args
            harr = context.make_array(signature.args[0])(context, builder, ha)
            warr = context.make_array(signature.args[2])(context, builder, wa)
            hp = builder.bitcast(harr.data, ir.IntType(8).as_pointer())
            wp = warr.data
            hstride = builder.extract_value(harr.strides, 0)
            wstride = builder.extract_value(warr.strides, 0)
            out = context.make_array(signature.args[5])(context, builder, acca).data
            zero = ir.Constant(_V8, None)
            if _EMIT_AVX2:
                sums = _emit_pmadd(builder, hp, hstride, r0v, wp, wstride, n0v, nk, rows, outs, zero)
            else:   # never run (_EMIT_AVX2 is False): something any CPU compiles
                trap(builder)
                sums = [zero] * (rows * outs)
            for j, s in enumerate(sums):
                total = builder.extract_element(s, ir.Constant(_I32, 0))
                total = builder.sext(total, _I64)
                for lane in range(1, 8):
                    total = builder.add(total, builder.sext(builder.extract_element(s, ir.Constant(_I32, lane)), _I64))
                builder.store(total, builder.gep(out, [ir.Constant(_I64, j)]))
            return context.get_dummy_value()

        return sig, codegen

    return block


def _emit_pmadd(builder, hp, hstride, r0, wp, wstride, n0, nk, rows: int, outs: int, zero) -> list:
    """for g < nk: acc[r outs + o] += vpmaddwd(h[r0 + r, 16g : 16g + 16], widen(w[n0 + o, 16g : 16g + 16]))."""
    fn = declare(builder.module, PMADDWD, ir.FunctionType(_V8, [_H16, _H16]))

    def step(g, accs):
        col = builder.mul(g, ir.Constant(_I64, 16))
        wv = []
        for o in range(outs):
            at = builder.add(builder.mul(builder.add(n0, ir.Constant(_I64, o)), wstride), col)
            raw = builder.load(builder.bitcast(builder.gep(wp, [at]), _B16.as_pointer()), align=1)
            wv.append(builder.sext(raw, _H16))
        new = list(accs)
        for r in range(rows):
            at = builder.add(builder.mul(builder.add(r0, ir.Constant(_I64, r)), hstride),
                             builder.mul(col, ir.Constant(_I64, 2)))
            hv = builder.load(builder.bitcast(builder.gep(hp, [at]), _H16.as_pointer()), align=1)
            for o in range(outs):
                new[r * outs + o] = builder.add(accs[r * outs + o], builder.call(fn, [hv, wv[o]]))
        return new

    return counted_loop(builder, nk, [zero] * (rows * outs), step, "pmadd")


_pmadd4x2 = _avx2_block(4, 2)


def avx2_available() -> bool:
    """The AVX2 blocks are used (decided at import: :data:`_EMIT_AVX2`)."""
    return _EMIT_AVX2


@njit(inline="always", **JIT)
def _avx2_shapes(h, w):
    """Rows and weights the AVX2 blocks take: whole runs of 16 columns within AVX2_MAX_K, weight
    rows in pairs, unit steps along a row."""
    k = w.shape[1]
    return (k % 16 == 0 and 0 < k <= AVX2_MAX_K and w.shape[0] % 2 == 0
            and h.strides[1] == 2 and w.strides[1] == 1)


@njit(inline="always", **JIT)
def _avx2_rows(h, i, w, n0, nk16, acc):
    """The sums of operand rows i, i + 1, ... against weight rows n0 and n0 + 1 into ``acc``
    (row-major, 2 a row): four rows on the AVX2 blocks where four are left, else one row on
    the portable loop (faster for one row); returns how many rows."""
    if h.shape[0] - i >= 4:
        _pmadd4x2(h, np.int64(i), w, n0, nk16, acc)
        return 4
    acc[0] = _dot(h[i], w[n0])
    acc[1] = _dot(h[i], w[n0 + 1])
    return 1


@njit(inline="always", **JIT)
def _dot32(hr, wr):
    """sum hr wr in int32 (exact for at most DOT_CHUNK terms): a loop over whole views, which
    LLVM vectorizes (vpmaddwd); a loop with a computed end inside the chunk loop it does not."""
    acc = np.int32(0)
    for j in range(hr.shape[0]):
        acc = np.int32(acc + np.int32(np.int32(hr[j]) * np.int32(wr[j])))
    return np.int64(acc)


@njit(inline="always", **JIT)
def _dot(hr, wr):
    """sum_k hr[k] wr[k] exactly: int32 sums over chunks of DOT_CHUNK, added in int64."""
    tot = np.int64(0)
    for k0 in range(0, hr.shape[0], DOT_CHUNK):
        tot += _dot32(hr[k0:k0 + DOT_CHUNK], wr[k0:k0 + DOT_CHUNK])
    return tot


@njit(**JIT)
def split_rows(h, u):  # pragma: no cover - compiled
    """Operand rows h [M, K] int16 -> byte rows u [2M, K] uint8: 2i = (h >> 8) + 128, 2i + 1 = h & 255."""
    for i in range(h.shape[0]):
        for k in range(h.shape[1]):
            v = np.int32(h[i, k])
            u[2 * i, k] = np.uint8((v >> 8) + 128)
            u[2 * i + 1, k] = np.uint8(v & 255)


@njit(parallel=True, **JIT)
def dots(h, u, w, wp, wsum, vnni, out):  # pragma: no cover - compiled
    """out[i, n] = sum_k h[i, k] w[n, k] (int64) for rows h [M, K] and weights w [N, K]; with
    ``vnni`` from the byte rows ``u`` (:func:`split_rows`) and the packed blocks ``wp``/``wsum``."""
    m_rows = h.shape[0]
    n_out, k = w.shape
    if vnni:
        nk4 = np.int64(k // 4)
        for b in prange(n_out // BLOCK_ROWS):
            acc = np.empty((8, BLOCK_ROWS), np.int32)
            woff = np.int64(b) * BLOCK_ROWS * k
            i = 0
            while i < 2 * m_rows:
                c = min(8, 2 * m_rows - i)
                if c == 8:
                    _block8(u, np.int64(i), wp, woff, nk4, acc)
                elif c >= 4:
                    _block4(u, np.int64(i), wp, woff, nk4, acc)
                    c = 4
                else:
                    _block2(u, np.int64(i), wp, woff, nk4, acc)
                for r in range(0, c, 2):
                    for lane in range(BLOCK_ROWS):
                        n = b * BLOCK_ROWS + lane
                        hi = np.int64(acc[r, lane]) - 128 * wsum[n]
                        out[(i + r) // 2, n] = (hi << 8) + np.int64(acc[r + 1, lane])
                i += c
    elif _EMIT_AVX2 and m_rows >= 4 and _avx2_shapes(h, w):
        nk16 = np.int64(k // 16)
        for b in prange(n_out // 2):
            acc = np.empty(8, np.int64)
            n0 = np.int64(2 * b)
            i = 0
            while i < m_rows:
                c = _avx2_rows(h, i, w, n0, nk16, acc)
                for r in range(c):
                    out[i + r, n0] = acc[2 * r]
                    out[i + r, n0 + 1] = acc[2 * r + 1]
                i += c
    else:
        for blk in prange((n_out + _BLOCK - 1) // _BLOCK):
            for n in range(blk * _BLOCK, min(n_out, blk * _BLOCK + _BLOCK)):
                for i in range(m_rows):
                    out[i, n] = _dot(h[i], w[n])


@njit(parallel=True, **JIT)
def dots_halves(h, w, y):  # pragma: no cover - compiled
    """The general path's products on the portable loop: ``y`` [2M, N] int32 holds the sums
    ``t = sum_k h[i, k] w[n, k]`` of rows h [M, K] int16 and weights w [N, K] int8 in int_mm's
    layout, ``y[i] = t >> 8`` and ``y[M + i] = t & 255``, so ``256 y[i] + y[M + i] = t`` exactly
    (|t| < K 2^22, so ``t >> 8`` fits int32 for K < 2^17; the sums themselves are :func:`_dot`'s).
    Each int16 x int8 product pair is one ``vpmaddwd`` lane
    where LLVM finds it (AVX2): twice float32 FMA's multiply-adds per instruction, with one pass
    where the float32 path needs two (the operand's high and low bytes)."""
    m_rows = h.shape[0]
    n_out = w.shape[0]
    if _EMIT_AVX2 and m_rows >= 4 and _avx2_shapes(h, w):
        nk16 = np.int64(w.shape[1] // 16)
        for b in prange(n_out // 2):
            acc = np.empty(8, np.int64)
            n0 = np.int64(2 * b)
            i = 0
            while i < m_rows:
                c = _avx2_rows(h, i, w, n0, nk16, acc)
                for j in range(2 * c):
                    t = acc[j]
                    y[i + j // 2, n0 + j % 2] = np.int32(t >> 8)
                    y[m_rows + i + j // 2, n0 + j % 2] = np.int32(t & 255)
                i += c
    else:
        for blk in prange((n_out + _BLOCK - 1) // _BLOCK):
            for n in range(blk * _BLOCK, min(n_out, blk * _BLOCK + _BLOCK)):
                for i in range(m_rows):
                    t = _dot(h[i], w[n])
                    y[i, n] = np.int32(t >> 8)
                    y[m_rows + i, n] = np.int32(t & 255)
