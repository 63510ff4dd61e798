"""Attention's value sums with the accumulators in registers: ``acc[d] = sum_i w_i v[j_i, d]``.

The exact attention (docs/ENGINE.md, "Attention") weighs each kept key's int8 value row by
``w = p vmax`` (up to 41 bits) and sums in int64.  Written as a numba loop, the sum over
keys re-loads and re-stores the 64 int64 accumulators at every key, and it was ~60% of a
verify pass's attention (issue #29: 0.85 of 1.42 ms a layer for 9 queries at 1,500 keys,
one thread).  The intrinsic here keeps a run of ``WIDTH`` accumulators in vector
registers for the whole key list: per key one load of the value bytes, their sign
extension, one multiply and one add per 8 lanes.  Plain LLVM vector operations, so any CPU
compiles it.  The sums are the same integers in any order (int64 addition), so the result
equals the scalar loop's bit for bit (tests/test_value_sums.py).
"""

from __future__ import annotations

from llvmlite import ir

from .jit import intrinsic, types
from .llvm_loop import counted_loop, splat

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
