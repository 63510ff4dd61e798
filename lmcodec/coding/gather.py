"""Eight tokens' weights at a time with one vector gather: the step of the output pass that numba's
loops leave scalar.

A token's weight is a table read, ``exp2[e & 1023] >> (e >> 10)`` of its gap e (after the adaptive
bias: ``min(u - (bias >> frac) - low, OUT_U_CAP)``).  Written as a numba loop that also stores the
weights, LLVM does not vectorise it: it cannot prove the store does not alias the table, and
cannot check an indexed read at run time.  So it read the table one token at a time: 40 us a
row of SmolLM2's 49,152 tokens on the 2-core EPYC (Zen 5), against 26 us with the gather below.

:func:`weights8` emits the same integer operations on 8-lane vectors, the table read as
``llvm.masked.gather`` with every lane on.  That intrinsic is part of LLVM's IR on every target:
``vpgatherqq`` where the CPU has AVX2 or AVX-512, eight scalar loads elsewhere (ARM, say).  The
integers are those of :func:`lmcodec.coding.tables_cpu.weight_of`, so the weights are equal on
every machine (``tests/test_lanes.py`` checks it against the scalar loop).
"""

from __future__ import annotations

from llvmlite import ir

from ..engine.cpu.jit import intrinsic, types
from ..engine.cpu.llvm_loop import declare, splat
from ..engine.spec.constants import OUT_U_CAP
from ..engine.spec.fixedmath import EXP2_FRAC_BITS

#: Tokens a :func:`weights8` call makes.
LANES = 8

_I1 = ir.IntType(1)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V64 = ir.VectorType(_I64, LANES)
_V32 = ir.VectorType(_I32, LANES)


def _const(builder: ir.IRBuilder, value: int) -> ir.Value:
    return splat(builder, ir.Constant(_I64, value), _V64)


def _load(builder: ir.IRBuilder, context, arytype, arr, at: ir.Value) -> ir.Value:
    """``arr[at:at + 8]`` (a contiguous 1-d array of signed integers) as a vector of int64."""
    bits = arytype.dtype.bitwidth
    vtype = ir.VectorType(ir.IntType(bits), LANES)
    data = context.make_array(arytype)(context, builder, arr).data
    v = builder.load(builder.bitcast(builder.gep(data, [at]), vtype.as_pointer()), align=bits // 8)
    return v if bits == 64 else builder.sext(v, _V64)


def _gather(builder: ir.IRBuilder, table: ir.Value, idx: ir.Value) -> ir.Value:
    """``table[idx]`` lane by lane (``table`` a pointer to int64, ``idx`` a vector of int64)."""
    base = splat(builder, builder.ptrtoint(table, _I64), _V64)
    ptrs = builder.inttoptr(builder.add(base, builder.shl(idx, _const(builder, 3))), ir.VectorType(table.type, LANES))
    fnty = ir.FunctionType(_V64, [ptrs.type, _I32, ir.VectorType(_I1, LANES), _V64])
    fn = declare(builder.module, f"llvm.masked.gather.v{LANES}i64.v{LANES}p0", fnty)
    every = ir.Constant(ir.VectorType(_I1, LANES), [1] * LANES)
    return builder.call(fn, [ptrs, ir.Constant(_I32, 8), every, ir.Constant(_V64, None)])


def _weights_block(biased: bool):
    """The intrinsic that makes 8 tokens' weights, with the adaptive bias or without (see the callers)."""

    @intrinsic
    def block(typingctx, u, bias, frac, low, exp2, p, at):
        arrays = (u, bias, exp2, p)
        if not all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and isinstance(a.dtype, types.Integer)
                   and a.dtype.signed for a in arrays) or exp2.dtype.bitwidth != 64 or p.dtype.bitwidth != 32:
            return None     # contiguous rows only: the vectors are read and written in place
        if not all(isinstance(x, types.Integer) for x in (frac, low, at)):
            return None
        sig = types.void(u, bias, frac, low, exp2, p, at)

        def codegen(context, builder, signature, args):
            ua, ba, fr, lo, ea, pa, i = args
            ut, bt, ft, lt, et, pt, it = signature.args
            fr, lo, i = (context.cast(builder, v, t, types.int64) for v, t in ((fr, ft), (lo, lt), (i, it)))
            e = _load(builder, context, ut, ua, i)
            if biased:
                b = _load(builder, context, bt, ba, i)
                g = builder.sub(builder.sub(e, builder.ashr(b, splat(builder, fr, _V64))), splat(builder, lo, _V64))
                cap = _const(builder, OUT_U_CAP)
                e = builder.select(builder.icmp_signed("<", g, cap), g, cap)
            table = context.make_array(et)(context, builder, ea).data
            vals = _gather(builder, table, builder.and_(e, _const(builder, (1 << EXP2_FRAC_BITS) - 1)))
            w = builder.trunc(builder.lshr(vals, builder.lshr(e, _const(builder, EXP2_FRAC_BITS))), _V32)
            out = context.make_array(pt)(context, builder, pa).data
            builder.store(w, builder.bitcast(builder.gep(out, [i]), _V32.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return block


#: ``weights8(u, bias, frac, low, exp2, p, at)``: ``p[at:at + 8]`` (int32) <- the weights of tokens
#: ``at .. at + 7`` from their gaps ``u`` (int64), ``exp2[e & 1023] >> (e >> 10)`` of ``e = u`` (``bias``,
#: ``frac`` and ``low`` unread).  The caller keeps ``at + 8`` within the arrays.
weights8 = _weights_block(False)
#: The same after the adaptive bias (``bias`` int32 or int64): ``e = min(u - (bias >> frac) - low, OUT_U_CAP)``.
weights8_biased = _weights_block(True)
