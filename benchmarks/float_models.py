"""Bits per byte of registered models' *float* weights on a suite: what the model allows.

    python -m benchmarks.float_models --corpus ../shared/corpus --suite smoke \
        --model smollm2-135m --model gemma3-270m --json docs/bench/float-smoke.json

Each model is loaded through transformers from its GGUF (dequantized, float32) and scores
every file of the suite in lmcodec's own tokens in sliding windows of ``--window`` tokens,
each opened by lmcodec's start token, moved ``--stride`` at a time (each token scored once,
with at least window - stride - 1 tokens of context after the first window): the usual
perplexity method, with the start token at every window's front as in
lmcodec's segments.  The figure is the
cross-entropy of the tokens in bits over the file's bytes: no archive, no online models,
no integer engine.  Comparing it with ``benchmarks.run``'s archive figures separates what
the weights allow from what lmcodec's engine and levels add or cost.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from pathlib import Path

import torch

from lmcodec.engine.model import registry as models

from .corpus import load_suite


def file_bits(model, ids: list[int], start: int, window: int, stride: int) -> float:
    """Cross-entropy in bits of ``ids`` in windows of ``window`` tokens, each opened by ``start``
    (as lmcodec's segments are: Gemma 3 without its <bos> at the front scores far worse) and
    moved ``stride`` tokens at a time."""
    total, scored, begin, n = 0.0, 0, 0, len(ids)
    while scored < n:
        end = min(begin + window - 1, n)
        chunk = torch.tensor([[start] + ids[begin:end]])
        with torch.no_grad():
            logits = model(chunk).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)      # row i predicts ids[begin + i]
        rows = torch.arange(scored - begin, end - begin)
        total -= float(logp[rows, chunk[0, 1:][rows]].sum())
        scored = end
        begin = max(begin + 1, end - (window - 1 - stride))
    return total / math.log(2)


def run_model(name: str, files: list[tuple[str, bytes, str]], window: int, stride: int) -> dict:
    from transformers import AutoModelForCausalLM

    from lmcodec.coding.tokens import ByteTokenizer

    _, directory, gguf = models.resolve(name)
    loaded = models.load(name)
    tok = ByteTokenizer(loaded.tokenizer, loaded.arch.vocab_size)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32).eval()
    rows, total_bits, total_bytes = [], 0.0, 0
    for rel, data, _ in files:
        symbols = tok.encode(data)    # lmcodec's own tokens; an escaped byte is fed as its placeholder
        ids = [int(t) for t in tok.model_inputs(symbols)]
        t0 = time.perf_counter()
        bits = file_bits(model, ids, tok.start_token, window, stride)
        rows.append({"file": rel, "bytes": len(data), "tokens": len(ids),
                     "escapes": int((symbols >= tok.vocab_size).sum()), "bits_per_byte": bits / len(data),
                     "seconds": round(time.perf_counter() - t0, 1)})
        total_bits += bits
        total_bytes += len(data)
        print(f"{name:14s} {rel:24s} {len(ids):6d} tokens {bits / len(data):.4f} bits/byte", flush=True)
    return {"model": name, "files": rows, "bits_per_byte": total_bits / total_bytes, "bytes": total_bytes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--suite", default="smoke")
    ap.add_argument("--model", action="append", required=True, help="registered model name (repeatable)")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--files", nargs="*", default=None, help="only these files of the suite (relative names)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not 0 < args.stride <= args.window:
        ap.error("need 0 < --stride <= --window")
    if args.threads:
        torch.set_num_threads(args.threads)
    files = load_suite(args.corpus, args.suite)
    if args.files:
        files = [f for f in files if f[0] in args.files]
        if not files:
            ap.error(f"none of {args.files} is in suite {args.suite!r}")
    out = {"suite": args.suite, "window": args.window, "stride": args.stride,
           "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, check=False,
                                    text=True).stdout.strip(),
           "models": [run_model(name, files, args.window, args.stride) for name in args.model]}
    base = out["models"][0]
    for m in out["models"]:
        m["against_first"] = m["bits_per_byte"] / base["bits_per_byte"] - 1
        print(f"{m['model']:14s} suite {m['bits_per_byte']:.4f} bits/byte ({m['against_first']:+.1%})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
