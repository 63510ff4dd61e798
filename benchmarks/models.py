"""Record a registered model's measured figures for ``lmcodec models``, from a benchmark results file.

Reads a ``benchmarks.run`` results file (``results.json`` of a suite run with a
registered model, every lmcodec round trip verified) and writes that model's
entry of ``lmcodec/engine/model/measured.json``: bits per byte over the suite, tokens
per second both ways, and where and when they were measured.  The figures are
the results file's, so ``lmcodec models`` never shows a number typed by hand
(tests/test_models_cmd.py checks the committed file against the committed results).

    python -m benchmarks.models docs/bench/smoke/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmcodec.engine.model import registry as models


def summarize(results: dict) -> dict:
    """One model's entry: the suite's totals and its tokens/s both ways, with the run's metadata."""
    meta, files = results["meta"], results["files"]
    lm = [f["lmcodec"] for f in files]
    tokens = sum(f["tokens"] for f in lm)
    total = results["totals"]["lmcodec"]
    return {
        "suite": meta["suite"], "files": len(files), "bytes": results["totals"]["_input_bytes"]["bytes"],
        "bits_per_byte": round(total["bpb"], 4), "model_bits_per_byte": round(total["model_bpb"], 4),
        "tokens": tokens,
        "compress_tokens_per_s": round(tokens / sum(f["compress_s"] for f in lm), 1),
        "decompress_tokens_per_s": round(tokens / sum(f["decompress_s"] for f in lm), 1),
        "settings": meta["settings"], "machine": meta["machine"], "device": meta["device"],
        "date": meta["date"], "commit": meta["commit"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="results.json of a benchmarks.run suite")
    ap.add_argument("--out", type=Path, default=models.MEASURED_FILE)
    args = ap.parse_args(argv)
    results = json.loads(args.results.read_text())
    name = results["meta"]["model"]
    if name not in models.REGISTRY:
        raise SystemExit(f"{name!r} is not a registered model: only registered models are listed")
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc[name] = {"results": str(args.results), **summarize(results)}
    args.out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(f"{args.out}: {name} {doc[name]['bits_per_byte']} bits/byte, "
          f"{doc[name]['compress_tokens_per_s']} / {doc[name]['decompress_tokens_per_s']} tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
