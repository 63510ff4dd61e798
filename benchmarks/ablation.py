"""What each online model gains on its own: real archives, round trips verified.

    python -m benchmarks.ablation [--corpus DIR] [--files REL,REL...] [--bytes N] [--level N]
                                  [--verify VARIANTS] [--json OUT] [--md OUT]

For every file, the same text is compressed with the language model alone, with
each online model alone beside it (bias, match, order 0 ... order 4), and with all of
them (``lmcodec.coding.mixing``).  The segments' LM pass is computed once per file and
shared by the variants (``Codec.score_memo``: the hidden rows do not depend on
the mixer), so a variant costs only its coding.  Sizes are whole archives.  The
variants named by ``--verify`` (default: the LM alone and all models, whose
decode times also give the online models' cost) are decompressed and compared
with the input; a variant not verified is marked so in the table (on a CPU a
decode costs minutes; tests/test_mixing.py round-trips every variant).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from .corpus import CorpusError, corpus_root, manifest

VARIANTS = ["none", "bias", "match", "order0", "order1", "order2", "order3", "order4", "all"]


def run_file(codec, name: str, data: bytes, verify: set[str]) -> list[dict]:
    """One row per variant: archive bytes, bits/byte, its gain over the LM alone, times."""
    from lmcodec.coding.mixing import MixerConfig

    base = codec.settings
    rows = []
    codec.score_memo = {}
    for variant in VARIANTS:
        codec.settings = dataclasses.replace(base, mixer=MixerConfig.parse(variant).mask)
        t0 = time.perf_counter()
        blob = codec.compress(data)
        t1 = time.perf_counter()
        ok = None
        if variant in verify:
            ok = codec.decompress(blob) == data
            if not ok:
                raise SystemExit(f"ablation: {name} with {variant}: round trip FAILED")
        t2 = time.perf_counter()
        rows.append(dict(file=name, variant=variant, bytes=len(data), archive_bytes=len(blob),
                         bpb=8 * len(blob) / len(data), model_bpb=codec.last_stats.model_bpb,
                         encode_s=t1 - t0, decode_s=(t2 - t1) if ok else None, verified=bool(ok)))
    codec.settings = base
    codec.score_memo = None
    lm = rows[0]["archive_bytes"]
    for r in rows:
        r["gain"] = 1 - r["archive_bytes"] / lm
    return rows


def markdown(rows: list[dict], header: str) -> str:
    files = list(dict.fromkeys(r["file"] for r in rows))
    out = [header, "", "Bits per byte of the whole archive (lower is better); in brackets the change against "
           "the LM alone.", "",
           "| online models | " + " | ".join(f"`{f}`" for f in files) + " | total |",
           "|---|" + "---:|" * (len(files) + 1)]
    for v in VARIANTS:
        cells = []
        tot_in = tot_out = tot_lm = 0
        for f in files:
            r = next(x for x in rows if x["file"] == f and x["variant"] == v)
            lm = next(x for x in rows if x["file"] == f and x["variant"] == "none")
            cells.append(f"{r['bpb']:.4f}" + ("" if v == "none" else f" ({-r['gain']:+.2%})")
                         + ("" if r["verified"] else "†"))
            tot_in += r["bytes"]
            tot_out += r["archive_bytes"]
            tot_lm += lm["archive_bytes"]
        total = f"{8 * tot_out / tot_in:.4f}" + ("" if v == "none" else f" ({tot_out / tot_lm - 1:+.2%})")
        out.append(f"| {v} | " + " | ".join(cells) + f" | {total} |")
    if not all(r["verified"] for r in rows):
        out += ["", "† size of the real archive, round trip not repeated here (tests/test_mixing.py "
                "round-trips every variant)."]
    dec = [r for r in rows if r["decode_s"] is not None]
    if dec:
        out += ["", "Decode time (s, whole file, this machine):", "",
                "| online models | " + " | ".join(f"`{f}`" for f in files) + " |",
                "|---|" + "---:|" * len(files)]
        for v in VARIANTS:
            got = [next(x for x in rows if x["file"] == f and x["variant"] == v)["decode_s"] for f in files]
            if any(t is not None for t in got):
                out.append(f"| {v} | " + " | ".join("" if t is None else f"{t:.1f}" for t in got) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ablation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--files", default="calgary/progc,canterbury/cp.html,canterbury/xargs.1",
                    help="comma list of corpus files [%(default)s]")
    ap.add_argument("--bytes", type=int, default=None, help="use only the first N bytes of each file")
    ap.add_argument("--level", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--verify", default="none,all",
                    help="variants whose archives are decompressed and compared [%(default)s; '' for none]")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None, help="write the table as Markdown here")
    args = ap.parse_args(argv)
    try:
        root = corpus_root(args.corpus)
    except CorpusError as exc:
        print(f"ablation: {exc}", file=sys.stderr)
        return 2
    import hashlib

    import torch

    import lmcodec

    sums = manifest(root)
    settings = {k: v for k, v in (("level", args.level), ("threads", args.threads)) if v is not None}
    codec = lmcodec.Codec(method="lm", **settings)
    s = codec.settings.resolved()
    rows = []
    for rel in args.files.split(","):
        data = (root / rel).read_bytes()
        if rel in sums and hashlib.sha256(data).hexdigest() != sums[rel]:
            print(f"ablation: {rel} does not match MANIFEST.sha256", file=sys.stderr)
            return 2
        data = data[:args.bytes] if args.bytes else data
        for r in run_file(codec, rel, data, set(filter(None, args.verify.split(",")))):
            rows.append(r)
            print(f"{rel}: {r['variant']:7s} {r['archive_bytes']:7d} B  {r['bpb']:.4f} bpb  "
                  f"gain {r['gain']:+.2%}  encode {r['encode_s']:.1f} s"
                  + (f"  decode {r['decode_s']:.1f} s" if r["decode_s"] is not None else ""), flush=True)
    head = (f"Level {s.level or 'custom'} (segments of {s.segment_tokens} tokens, context {s.context}), "
            f"torch {torch.__version__}, {s.threads} threads"
            + (f", first {args.bytes} bytes of each file" if args.bytes else "")
            + (f", round trips verified for: {args.verify}" if args.verify else "") + ".")
    md = markdown(rows, head)
    print(md)
    if args.md:
        Path(args.md).write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(settings=head, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
