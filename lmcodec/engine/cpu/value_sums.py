"""Attention's value sums with the accumulators in registers: ``acc[d] = sum_i w_i v[j_i, d]``.

The exact attention (docs/ENGINE.md, "Attention") weighs each kept key's int8 value row by
``w = p vmax`` (below 2^40) and sums in int64.  Written as a numba loop, the sum over
keys re-loads and re-stores the 64 int64 accumulators at every key, the larger part of a
verify pass's attention.  The intrinsic here keeps a run of ``WIDTH`` accumulators in vector
registers for the whole key list: per key one load of the value bytes, their sign
extension, one multiply and one add per 8 lanes.  Plain LLVM vector operations, so any CPU
compiles it.  The sums are the same integers in any order (int64 addition), so the result
equals the scalar loop's bit for bit (tests/test_value_sums.py).

On a CPU with AVX-512 VNNI (:func:`lmcodec.engine.cpu.int_dots.available`), :data:`vnni64` takes
the keys four at a time instead.  ``w < 2^40`` (docs/ENGINE.md: p <= 2^16, vmax < 2^24) is
five unsigned bytes, ``w = sum_b 256^b byte_b(w)``, so
``sum_i w_i v_id = sum_b 256^b sum_i byte_b(w_i) v_id``, and each inner sum is ``vpdpbusd``'s
(unsigned by signed bytes, four products into an int32 lane).  The four keys' value rows are
interleaved byte by byte, two shuffles deep, so that lane l holds the four keys' values of
dimension l.  One group of four keys costs 20 ``vpdpbusd`` and 8 shuffles, where the int64
loop takes 32 multiplies and 32 adds.  A lane adds at most 4 x 255 x 128 a group, so 8,192
keys stay below 2^29: the int32 sums are exact, and widened to int64 and shifted they give
the same integers.
"""

from __future__ import annotations

from llvmlite import ir

from .int_dots import VPDPBUSD, available
from .jit import intrinsic, types
from .llvm_loop import counted_loop, declare, splat, trap

#: Value lanes one call sums (8 vectors of 8 int64: half of AVX-512's registers).
WIDTH = 64

_I64 = ir.IntType(64)


def _sums(width: int):
    lanes = width // 8
    v8 = ir.VectorType(ir.IntType(8), 8)
    v64 = ir.VectorType(_I64, 8)

    @intrinsic
    def sums(typingctx, v, js, ws, n, d0, acc):
        """acc[d0 + d] = sum_{i < n} ws[i] v[js[i], d0 + d] for d < width (v: int8 [slots, hd] C
        order; js, ws, acc: int64)."""
        sig = types.void(v, js, ws, n, d0, acc)

        def codegen(context, builder, signature, args):
            va, jsa, wsa, nv, d0v, acca = args
            arr = context.make_array(signature.args[0])(context, builder, va)
            vp = arr.data
            stride = builder.extract_value(arr.strides, 0)
            jp = context.make_array(signature.args[1])(context, builder, jsa).data
            wp = context.make_array(signature.args[2])(context, builder, wsa).data
            out = context.make_array(signature.args[5])(context, builder, acca).data
            zero = ir.Constant(v64, None)

            def step(i, accs):
                j = builder.load(builder.gep(jp, [i]))
                wv = splat(builder, builder.load(builder.gep(wp, [i])), v64)
                row = builder.add(builder.mul(j, stride), d0v)
                new = []
                for c, run in enumerate(accs):
                    at = builder.gep(vp, [builder.add(row, ir.Constant(_I64, 8 * c))])
                    vals = builder.sext(builder.load(builder.bitcast(at, v8.as_pointer()), align=1), v64)
                    new.append(builder.add(run, builder.mul(vals, wv)))
                return new

            final = counted_loop(builder, nv, [zero] * lanes, step, "vsum")
            for c, ph in enumerate(final):
                dst = builder.gep(out, [builder.add(d0v, ir.Constant(_I64, 8 * c))])
                builder.store(ph, builder.bitcast(dst, v64.as_pointer()), align=8)
            return context.get_dummy_value()

        return sig, codegen

    return sums


sums64 = _sums(64)   # head dims that are multiples of 64 (SmolLM2 64, Gemma 3 256), 64 at a time
sums32 = _sums(32)   # the tests' tiny models
sums16 = _sums(16)


#: The bytes of a weight w < 2^40 (docs/ENGINE.md's bound on p vmax) that :data:`vnni64` sums.
PLANES = 5
_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_B64 = ir.VectorType(_I8, 64)
_W16 = ir.VectorType(_I32, 16)
_Q16 = ir.VectorType(_I64, 16)
_Q4 = ir.VectorType(_I64, 4)


def _pairs(half: int) -> ir.Constant:
    """Shuffle mask: rows x, y -> bytes 2i + k = (x, y)[k][i] for the 32 dims i of ``half``."""
    return ir.Constant(ir.VectorType(_I32, 64), [i + 64 * k for i in range(32 * half, 32 * half + 32) for k in (0, 1)])


def _quads(c: int) -> ir.Constant:
    """Shuffle mask: pairs (a, b) of :func:`_pairs` -> bytes 4l + k = row k's dim 16 c + l."""
    cc = c % 2
    return ir.Constant(ir.VectorType(_I32, 64),
                       [2 * (16 * cc + l) + (k if k < 2 else 64 + k - 2) for l in range(16) for k in range(4)])


def _vnni_step(builder, fn, vp, stride, jp, wp, d0, g, accs):
    """One group of four keys (``4 g`` .. ``4 g + 3``): ``accs[4 b + c]`` (dims 16 c .. 16 c + 15)
    += byte b of each key's weight times its values, by ``vpdpbusd``."""
    i0 = builder.mul(g, ir.Constant(_I64, 4))
    rows = []
    for k in range(4):
        j = builder.load(builder.gep(jp, [builder.add(i0, ir.Constant(_I64, k))]))
        at = builder.gep(vp, [builder.add(builder.mul(j, stride), d0)])
        rows.append(builder.load(builder.bitcast(at, _B64.as_pointer()), align=1))
    a = [builder.shuffle_vector(rows[0], rows[1], _pairs(h)) for h in (0, 1)]
    b = [builder.shuffle_vector(rows[2], rows[3], _pairs(h)) for h in (0, 1)]
    vals = [builder.bitcast(builder.shuffle_vector(a[c // 2], b[c // 2], _quads(c)), _W16) for c in range(4)]
    w4 = builder.load(builder.bitcast(builder.gep(wp, [i0]), _Q4.as_pointer()), align=8)
    new = []
    for plane in range(PLANES):
        shifted = builder.lshr(w4, ir.Constant(_Q4, [8 * plane] * 4)) if plane else w4
        word = builder.bitcast(builder.trunc(shifted, ir.VectorType(_I8, 4)), _I32)
        wb = splat(builder, word, _W16)
        new.extend(builder.call(fn, [accs[4 * plane + c], wb, vals[c]]) for c in range(4))
    return new


@intrinsic
def vnni64(typingctx, v, js, ws, groups, d0, acc):
    """acc[d0 + d] = sum_{i < 4 groups} ws[i] v[js[i], d0 + d] for d < 64 by VNNI byte products (v:
    int8 [slots, hd] C order; js, ws, acc: int64; every ws[i] in [0, 2^40)).  On a CPU without
    VNNI (:func:`~lmcodec.engine.cpu.int_dots.available` False) it compiles to a trap, never run."""
    sig = types.void(v, js, ws, groups, d0, acc)

    def codegen(context, builder, signature, args):
        va, jsa, wsa, nv, d0v, acca = args
        arr = context.make_array(signature.args[0])(context, builder, va)
        stride = builder.extract_value(arr.strides, 0)
        jp = context.make_array(signature.args[1])(context, builder, jsa).data
        wp = context.make_array(signature.args[2])(context, builder, wsa).data
        out = context.make_array(signature.args[5])(context, builder, acca).data
        if not available():
            trap(builder)
            return context.get_dummy_value()
        fn = declare(builder.module, VPDPBUSD, ir.FunctionType(_W16, [_W16, _W16, _W16]))
        final = counted_loop(builder, nv, [ir.Constant(_W16, None)] * (4 * PLANES),
                             lambda g, accs: _vnni_step(builder, fn, arr.data, stride, jp, wp, d0v, g, accs),
                             "vnnisum")
        for c in range(4):
            total = None
            for plane in range(PLANES):
                part = builder.sext(final[4 * plane + c], _Q16)
                if plane:
                    part = builder.shl(part, ir.Constant(_Q16, [8 * plane] * 16))
                total = part if total is None else builder.add(total, part)
            dst = builder.gep(out, [builder.add(d0v, ir.Constant(_I64, 16 * c))])
            builder.store(total, builder.bitcast(dst, _Q16.as_pointer()), align=8)
        return context.get_dummy_value()

    return sig, codegen
