"""One decoding step at one row against the floor of reading the int8 weights once.

    python -m benchmarks.step [--model M] [--steps N] [--threads N] [--device D] [--json OUT]
                              [--widths 1,2,4,9 --keys 1500]

A file of one segment decodes one row per step, so each step reads every weight
once: on a CPU that read is the floor (the target: the one-row step within
1.6x of it).  Both are timed the same way, median of ``--steps`` repeats after a
warm-up, wall clock and this process's CPU time (on a shared machine the CPU time
is the steadier figure); the machine's load average is recorded beside them.

``--widths`` adds what guess-and-verify decoding pays: one row's pass of T positions (its
token and T - 1 guesses, with the output head) after ``--keys`` cached tokens, per width.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .speed import cpu_paths, describe_paths


def _timed(fn, n: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``fn()`` over ``n`` calls (one warm-up call first)."""
    fn()
    wall, cpu = [], []
    for _ in range(n):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def weight_tensors(model) -> list[torch.Tensor]:
    """Every int8 weight a step reads: the layers' products and the output head."""
    out = [model.head.weight]
    for layer in model.layers:
        out += [layer.qkv.weight, layer.o.weight, layer.gate_up.weight, layer.down.weight]
    return out


def _widths(engine, tok, args, sync, rng) -> dict[int, float]:
    """Median wall ms of one row's pass of T positions (its token, T - 1 guesses) and its head,
    after ``args.keys`` cached tokens, for each T of ``args.widths``."""
    from lmcodec.coding.runner import prefill
    from lmcodec.coding.steps import RowStep

    widths = sorted({int(w) for w in args.widths.split(",")})
    pre = prefill(engine, [tok.start_token] + rng.integers(0, tok.vocab_size, args.keys - 1).tolist())
    out = {}
    for T in widths:
        run = RowStep(engine, pre, 1, args.keys + 512, 2 * args.steps + 2 * max(widths), spare=max(widths) - 1)

        def one(run=run, T=T):
            run.advance(rng.integers(0, tok.vocab_size, (1, T)), guesses=np.array([T - 1]))
            engine.gaps(run.h, run.e)
            sync()

        out[T] = 1e3 * _timed(one, args.steps)[0]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--widths", default="", help="comma-separated pass widths (positions of one row)")
    ap.add_argument("--keys", type=int, default=1500, help="cached tokens before the --widths passes")
    args = ap.parse_args(argv)

    import lmcodec
    from lmcodec.coding.runner import prefill
    from lmcodec.coding.steps import RowStep
    from lmcodec.engine.engine import torch_threads

    codec = lmcodec.Codec(args.model, device=args.device, threads=args.threads)
    s = codec.settings.resolved()
    model, tok, name = codec.models.load(args.model)
    engine = codec.models.engine(model, s.device)
    weights = weight_tensors(engine.model)
    nbytes = sum(w.numel() for w in weights)
    rng = np.random.default_rng(0)
    with torch_threads(s.threads), torch.inference_mode():
        pre = prefill(engine, [tok.start_token])
        run = RowStep(engine, pre, 1, 2048, 10 * args.steps)
        sync = torch.cuda.synchronize if s.device == "cuda" else (lambda: None)

        def step():
            run.advance(rng.integers(0, tok.vocab_size, 1))
            engine.gaps(run.h, run.e)       # the output head: part of every step
            sync()

        def read():
            for w in weights:
                torch.amax(w.view(-1))
            sync()

        step_wall, step_cpu = _timed(step, args.steps)
        read_wall, read_cpu = _timed(read, args.steps)
        passes = _widths(engine, tok, args, sync, rng) if args.widths else {}
    res = {"model": name, "device": s.device, "threads": s.threads, "steps": args.steps,
           "weight_bytes": nbytes, "step_ms": 1e3 * step_wall, "step_cpu_ms": 1e3 * step_cpu,
           "read_ms": 1e3 * read_wall, "read_cpu_ms": 1e3 * read_cpu, "ratio": step_wall / read_wall,
           "load_average": os.getloadavg()[0], "keys": args.keys if passes else None, "pass_ms": passes,
           "cpu": cpu_paths() if s.device == "cpu" else None}
    if res["cpu"]:
        print("cpu: " + describe_paths(res["cpu"]))
    print(f"{name} on {s.device}, {s.threads} threads: one-row step {res['step_ms']:.1f} ms "
          f"(CPU {res['step_cpu_ms']:.1f} ms); reading {nbytes / 1e6:.0f} MB of int8 weights "
          f"{res['read_ms']:.1f} ms (CPU {res['read_cpu_ms']:.1f} ms): {res['ratio']:.2f}x the floor "
          f"(load average {res['load_average']:.1f})")
    for T, ms in passes.items():
        print(f"  a pass of {T} positions after {args.keys} keys: {ms:.1f} ms ({ms / passes[min(passes)]:.2f}x "
              f"a pass of {min(passes)})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
