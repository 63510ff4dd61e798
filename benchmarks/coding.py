"""Coding time per token: what a compress and a decompress spend outside the model.

    python -m benchmarks.coding [--file F | --corpus DIR] [--bytes N] [--level N] [--lanes N]
                                [--guesses N] [--threads N] [--json OUT]

Compresses the input (default: the corpus's alice29.txt) at ``--level``, decompresses it with the
model loaded and the kernels compiled, verifies the round trip, and prints for each direction the
tokens, the seconds, the model's share (its passes, prefill and output heads: the output step's
vocabulary pass, which makes the symbol weights and sums their bucket masses, is part of it where
it runs alone) and the rest per token: ``coding us/token``, the figure of ``-v``'s summary line
(:func:`lmcodec.coding.settings.summary`).  The issue's targets: level 1 on a 128 KB text (many
lanes, no online models) and level 6 with one lane (every online model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import lmcodec

from .corpus import add_file_args, read_file_arg


def run(raw: bytes, settings: dict, model: str | None = None, threads: int | None = None) -> dict:
    """One round trip, timed both ways after a warm-up; raises SystemExit if it is not lossless."""
    codec = lmcodec.Codec(model, threads=threads, **settings)
    codec.decompress(codec.compress(b"The kernels are compiled before the clock starts.\n" * 4))
    t0 = time.perf_counter()
    blob = codec.compress(raw)
    enc_s = time.perf_counter() - t0
    stats = codec.last_stats
    t0 = time.perf_counter()
    out = codec.decompress(blob)
    dec_s = time.perf_counter() - t0
    if out != raw:
        raise SystemExit("round trip failed")
    dec = codec.last_decode
    tokens = stats.tokens

    def side(seconds: float, model_s: float, passes: int) -> dict:
        coding = max(0.0, seconds - model_s)
        return dict(seconds=round(seconds, 3), model_s=round(model_s, 3), coding_s=round(coding, 3), passes=passes,
                    coding_us_per_token=round(1e6 * coding / max(1, tokens), 1),
                    tokens_per_s=round(tokens / seconds, 1))

    return dict(bytes=len(raw), archive=len(blob), tokens=tokens, settings=settings,
                compress=side(enc_s, stats.model_seconds, stats.passes),
                decompress=side(dec_s, dec.model_seconds, dec.passes))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_file_args(ap)
    ap.add_argument("--level", type=int, default=6)
    ap.add_argument("--lanes", type=int, default=None, help="segments per stream (default: the format's)")
    ap.add_argument("--guesses", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    path, raw = read_file_arg(args)
    settings = {"level": args.level}
    if args.lanes is not None:
        settings["lanes"] = args.lanes
    if args.guesses is not None:
        settings["guesses"] = args.guesses
    result = run(raw, settings, args.model, args.threads)
    result.update(file=str(path), machine=platform.processor() or platform.machine(), cores=os.cpu_count())
    print(f"{path.name}: {result['bytes']} bytes, {result['tokens']} tokens, level {args.level}"
          f"{'' if args.lanes is None else f', {args.lanes} lanes'} -> {result['archive']} bytes")
    for name in ("compress", "decompress"):
        r = result[name]
        print(f"  {name:<10} {r['seconds']:8.2f} s  model {r['model_s']:8.2f} s  coding {r['coding_s']:7.2f} s"
              f"  {r['coding_us_per_token']:8.1f} us/token  ({r['tokens_per_s']:.0f} tokens/s, {r['passes']} passes)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
