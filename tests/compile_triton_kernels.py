"""Compile every Triton kernel of the engine for an NVIDIA H100/H200 (sm_90) without a GPU.

Run by tests/test_ops_triton.py in a fresh process (triton must not be in
interpreter mode).  The interpreter accepts what the NVIDIA compiler rejects
(int8 dots narrower than 32, branches yielding different pointer types), so
this is the CPU-side proof that the kernels build for the device; it also
reports that the products are int8 tensor-core MMAs.

First it checks that the CPU path of the engine never imports triton.
"""

from __future__ import annotations

import re
import sys

import lmcodec.engine.engine as engine

engine._backend("cpu")
assert "triton" not in sys.modules, "the CPU path imported triton"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lmcodec.engine.triton import ops as ops_triton, attend as ops_triton_attend, gemma as ops_triton_gemma  # noqa: E402

#: Pointer arguments by name -> element type; other lower-case arguments are int32 scalars.
POINTERS = {
    "h_ptr": "i16", "out_ptr": "i64", "x_ptr": "i64", "gain_ptr": "i64", "eps_ptr": "i64", "exp_ptr": "i64",
    "shift_ptr": "i64", "y_ptr": "i32", "mult_ptr": "i64", "bias_ptr": "i64", "cos_ptr": "i64", "sin_ptr": "i64",
    "slots_ptr": "i64", "kt_ptr": "i8", "kmax_ptr": "i32", "vc_ptr": "i8", "vmax_ptr": "i32", "q_ptr": "i16",
    "qe_ptr": "i64", "sig_ptr": "i64", "crow_ptr": "i64", "a_ptr": "i64", "b_ptr": "i64", "c_ptr": "i64",
    "exp2_ptr": "i32", "qg_ptr": "i64", "kg_ptr": "i64", "kpos_ptr": "i64", "low_ptr": "i64",
}
#: (kernel, element type of out_ptr, constexprs): the default tiles at SmolLM2's shapes, then
#: Gemma 3's forms (q/k norms at 270M's head dim 256, 4 query heads over 1 KV head; windows; post norms).
KERNELS = [
    (ops_triton._split_kernel, "i8", {"BLOCK": 1024}),
    (ops_triton._norm_kernel, "i16", {"BLOCK": 1024}),
    (ops_triton._operand_kernel, "i16", {"BLOCK": 1024}),
    (ops_triton._residual_add_kernel, "i64", {"BLOCK": 1024}),
    (ops_triton._qkv_kernel, "i64", {"HAS_BIAS": False, "QK_NORM": False, "POS_PER_ROW": True,
                                     "SLOT_PER_ROW": True, "HEADS": 16, "HALF": 32}),
    (ops_triton._mlp_kernel, "i16", {"BLOCK": 1024}),
    (ops_triton._gaps_kernel, "i64", {"BLOCK": 1024}),
    (ops_triton_attend._attend_kernel, "i64", {"WINDOWED": False, "GROUP": 4, "PARTS": 4, "BYTES": 8, "HD_PAD": 64,
                                               "BLOCK_S": 64}),
    (ops_triton_gemma._add_normed_kernel, "i64", {"BLOCK": 1024}),
    (ops_triton._qkv_kernel, "i64", {"HAS_BIAS": False, "QK_NORM": True, "POS_PER_ROW": True,
                                     "SLOT_PER_ROW": True, "HEADS": 8, "HALF": 128}),
    # The windowed attention at head dim 64: its window is what is Gemma's; at Gemma 3 270M's 256 it
    # compiles too (to int8 MMAs, ef288a1) but takes 14 s of a cold compile, too much for the suite.
    (ops_triton_attend._attend_kernel, "i64", {"WINDOWED": True, "GROUP": 4, "PARTS": 4, "BYTES": 8, "HD_PAD": 64,
                                               "BLOCK_S": 64}),
]


def main() -> None:
    target = GPUTarget("cuda", 90, 32)
    for fn, out_type, constexprs in KERNELS:
        sig = {}
        for name in fn.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name == "out_ptr":
                sig[name] = "*" + out_type
            else:
                sig[name] = "*" + POINTERS[name] if name.endswith("_ptr") else "i32"
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target)
        mma = sorted(set(re.findall(r"\bmma\.sync[.\w]*", kernel.asm["ptx"])))
        print(fn.__name__, "compiled for sm_90", " ".join(mma))


if __name__ == "__main__":
    main()
