"""The Triton kernels at the default model's decode shapes, against their memory bounds.

    python -m benchmarks.kernels [--device cuda|cpu] [--rows 512] [--window 1792] [--reps 20] [--json OUT]

One decoding step of ``rows`` rows on SmolLM2-135M's shapes (576 wide, 9 query /
3 KV heads of 64, MLP 1,536, vocabulary 49,152) with random integers in the
spec's ranges: the time of each kernel of one layer (and of the output head's
``gaps``), the attention kernel's achieved bandwidth over the KV bytes it must
read (12.2 KB per visible key and row over 30 layers, docs/SPEED.md), and the
tokens/s that the kernels alone would allow (30 layers + the head, products
not included).  ``--device cpu`` runs the same code under Triton's interpreter
on tiny shapes (a check of this script, not a speed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from fractions import Fraction

#: SmolLM2-135M's shapes.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, LAYERS = 576, 9, 3, 64, 1536, 49152, 30
#: int8 K and V of 3 KV heads x 64 plus their int32 magnitudes: bytes per visible key, layer and row.
KV_BYTES_PER_KEY = KV_HEADS * 2 * (HEAD_DIM + 4)
#: Prefix (attention sink) slots ahead of the window.
SINK = 4


def _timer(device: str, fn, reps: int) -> float:
    """Seconds per call of ``fn`` after one warm-up (CUDA events on a GPU)."""
    import torch

    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def _sig(x: float) -> float:
    """Four significant digits."""
    return float(f"{x:.4g}")


def measure(device: str, rows: int, window: int, reps: int, vocab: int = VOCAB) -> dict:
    import numpy as np
    import torch

    from lmcodec.engine.spec import fixedmath
    from lmcodec.engine.triton import ops as ops_triton

    rng = np.random.default_rng(0)
    dev = torch.device(device)

    def ints(lo, hi, shape, dtype=torch.int64):
        return torch.from_numpy(rng.integers(lo, hi, shape, endpoint=True)).to(dtype).to(dev)

    slots = SINK + window
    kt = ints(-127, 127, (rows, KV_HEADS, HEAD_DIM, slots), torch.int8)
    vc = ints(-127, 127, (rows, KV_HEADS, slots, HEAD_DIM), torch.int8)
    kmax = ints(0, (1 << 24) - 1, (rows, KV_HEADS, slots), torch.int32)
    vmax = ints(0, (1 << 24) - 1, (rows, KV_HEADS, slots), torch.int32)
    q16 = ints(-32767, 32767, (rows, HEADS, HEAD_DIM), torch.int16)
    qe = ints(0, 9, (rows, HEADS))
    crow = torch.arange(rows, device=dev)
    a = torch.full((rows,), SINK, device=dev)
    b = torch.full((rows,), SINK, device=dev)
    c = torch.full((rows,), slots, device=dev)
    x = ints(-(1 << 30), 1 << 30, (rows, HIDDEN))
    gain = ints(1 << 14, (1 << 15) - 1, (HIDDEN,))
    eps = torch.full((64,), 42950, device=dev)
    n_qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    y_qkv = ints(-(1 << 24), 1 << 24, (2 * rows, n_qkv), torch.int32)
    y_mlp = ints(-(1 << 24), 1 << 24, (2 * rows, 2 * INTER), torch.int32)
    y_res = ints(-(1 << 24), 1 << 24, (2 * rows, HIDDEN), torch.int32)
    y_head = ints(-(1 << 24), 1 << 24, (2 * rows, vocab), torch.int32)
    mult = lambda n: ints(1 << 22, 1 << 24, (n,))
    exp = ints(-8, 8, (rows, 1))
    cos, sin = (torch.as_tensor(t[:1], device=dev) for t in fixedmath.rope_tables(Fraction(100000), HEAD_DIM, 1))
    sigmoid = torch.as_tensor(fixedmath.sigmoid_table(), device=dev)
    at = torch.tensor([SINK], device=dev)
    m_qkv, m_mlp, m_res, m_head = mult(n_qkv), mult(2 * INTER), mult(HIDDEN), mult(vocab)
    h16 = ints(-32639, 32639, (rows, HIDDEN), torch.int16)

    calls = {
        "attend": lambda: ops_triton.attend(q16, qe, kt, kmax, vc, vmax, crow, a, b, c),
        "norm": lambda: ops_triton.norm(x, gain, 14, eps),
        "qkv": lambda: ops_triton.qkv(y_qkv, m_qkv, 45, None, exp, cos, sin, rows, 1, HEADS, KV_HEADS, HEAD_DIM,
                                      kt, kmax, vc, vmax, at),
        "operand": lambda: ops_triton.operand(x),
        "residual_add": lambda: ops_triton.residual_add(x.clone(), y_res, m_res, 40, exp),
        "mlp": lambda: ops_triton.mlp(y_mlp, m_mlp, 40, exp, sigmoid),
        "split": lambda: ops_triton.split(h16),
        "gaps": lambda: ops_triton.gaps(y_head, m_head, exp),
    }
    seconds = {name: _timer(device, fn, reps) for name, fn in calls.items()}
    per_layer = {"norm": 2, "qkv": 1, "attend": 1, "operand": 1, "residual_add": 2, "mlp": 1, "split": 4}
    step = LAYERS * sum(seconds[k] * n for k, n in per_layer.items()) + seconds["gaps"] + seconds["norm"]
    kv_bytes = rows * window * KV_BYTES_PER_KEY
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
        "rows": rows, "window": window,
        "us_per_call": {k: _sig(v * 1e6) for k, v in seconds.items()},
        "attend_kv_gb_per_s": _sig(kv_bytes / seconds["attend"] / 1e9),
        "kernels_per_step_ms": _sig(step * 1e3),
        "tokens_per_s_kernels_only": _sig(rows / step),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--window", type=int, default=1792, help="visible window keys per row (level 6 average)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            ap.error("--device cpu needs TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
        vocab = 256                                  # the interpreter runs a program at a time
    else:
        vocab = VOCAB
    res = measure(args.device, args.rows, args.window, args.reps, vocab)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
