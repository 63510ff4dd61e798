"""LLVM IR pieces the engine's numba intrinsics share (int_dots' VNNI blocks, value_sums' runs).

Both emit a counted loop whose vector sums live in registers across iterations: phi nodes
carry them in, and phi nodes after the loop give the sums, or the start values when the loop
runs no iteration.  Written once here, so each intrinsic states only its iteration.
"""

from __future__ import annotations

from collections.abc import Callable

from llvmlite import ir

I64 = ir.IntType(64)


def declare(module: ir.Module, name: str, fnty: ir.FunctionType) -> ir.Function:
    """The function ``name`` of ``module`` (an LLVM intrinsic, say), declared once."""
    return module.globals.get(name) or ir.Function(module, fnty, name)


def trap(builder: ir.IRBuilder) -> None:
    """A trap: the body of an intrinsic compiled where its instruction is missing, never run."""
    builder.call(declare(builder.module, "llvm.trap", ir.FunctionType(ir.VoidType(), [])), [])


def splat(builder: ir.IRBuilder, scalar: ir.Value, vtype: ir.VectorType) -> ir.Value:
    """``scalar`` in every lane of a ``vtype`` vector."""
    one = builder.insert_element(ir.Constant(vtype, ir.Undefined), scalar, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(ir.IntType(32), vtype.count), None))


def counted_loop(builder: ir.IRBuilder, count: ir.Value, start: list[ir.Value],
                 body: Callable[[ir.Value, list[ir.Value]], list[ir.Value]], name: str) -> list[ir.Value]:
    """``for i in range(count)`` (int64) carrying the values ``start``: ``body(i, values)`` emits
    one iteration and returns the next values.  Returns the values after the loop; the builder
    is left after it."""
    pre = builder.block
    loop = builder.append_basic_block(f"{name}.loop")
    done = builder.append_basic_block(f"{name}.done")
    builder.cbranch(builder.icmp_signed(">", count, ir.Constant(I64, 0)), loop, done)
    builder.position_at_end(loop)
    i = builder.phi(I64)
    carried = [builder.phi(v.type) for v in start]
    new = body(i, carried)
    i2 = builder.add(i, ir.Constant(I64, 1))
    end = builder.block                      # the body may have added blocks of its own
    builder.cbranch(builder.icmp_signed("<", i2, count), loop, done)
    i.add_incoming(ir.Constant(I64, 0), pre)
    i.add_incoming(i2, end)
    for phi, first, nxt in zip(carried, start, new):
        phi.add_incoming(first, pre)
        phi.add_incoming(nxt, end)
    builder.position_at_end(done)
    out = []
    for first, nxt in zip(start, new):
        phi = builder.phi(first.type)
        phi.add_incoming(first, pre)
        phi.add_incoming(nxt, end)
        out.append(phi)
    return out
