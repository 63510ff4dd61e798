"""Decompression of the same archives by an earlier revision's decoder and by this one, side by side.

    python -m benchmarks.against REV FILE [FILE ...] [--level N] [--dict DICT] [--bytes N]
                                 [--threads N] [--step] [--json OUT]

REV (a commit, tag or branch of this repository) is unpacked with ``git archive``
into a temporary folder.  Each FILE is compressed **by REV** (so the archives
are the ones its users hold), then decoded by REV and by the working tree, each
in a fresh process on the same machine, one after the other, every round trip
verified.  Printed per file: archive bytes, tokens, both decode times and the
speedup, and the tokens a row decoded per model pass where this tree's decoder
counts its passes (``Codec.last_decode_passes``; "-" for a decoder that runs
one token a step and does not).  ``--step`` adds the one-row step against the weight-read
floor (``benchmarks.step``) of this tree.  Only the public API
(``lmcodec.Codec``) is used on either side, so any revision that has it works.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Run in the child: compress (optionally) and time one decode; print one JSON line.
CHILD = r"""
import json, sys, time
import lmcodec
args = json.loads(sys.argv[1])
codec = lmcodec.Codec(threads=args["threads"], dictionary=args["dict"], **args["settings"])
data = open(args["input"], "rb").read()
tokens = None
if args["compress"]:
    open(args["archive"], "wb").write(codec.compress(data))
    tokens = codec.last_stats.tokens
blob = open(args["archive"], "rb").read()
# The model loaded and the kernels compiled (a fresh tree has no numba cache) before the clock starts.
codec.decompress(codec.compress(b"The kernels are compiled before the clock starts.\n"))
t0 = time.perf_counter()
out = codec.decompress(blob)
seconds = time.perf_counter() - t0
# Model passes of the last decode, where the decoder counts them (a guess-and-verify decoder).
passes = getattr(codec, "last_decode_passes", None)
print(json.dumps({"ok": out == data, "seconds": seconds, "archive": len(blob), "bytes": len(data),
                  "tokens": tokens, "passes": passes, "lmcodec": lmcodec.__file__}))
"""


def unpack(rev: str, into: Path) -> str:
    """Unpack ``rev`` of this repository into ``into``; return its full commit id."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return commit


def child(tree: Path, job: dict) -> dict:
    """Run :data:`CHILD` with ``tree``'s lmcodec first on the path; its JSON line."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], env=env, capture_output=True, text=True,
                          cwd=tree)
    if proc.returncode:
        raise SystemExit(f"decoding with {tree} failed:\n{proc.stderr[-2000:]}")
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    if not Path(doc["lmcodec"]).is_relative_to(tree):
        raise SystemExit(f"the child imported {doc['lmcodec']}, not the tree {tree}")
    if not doc["ok"]:
        raise SystemExit(f"{job['input']}: the round trip through {tree} failed")
    return doc


def compare(rev_tree: Path, inputs: list[Path], settings: dict, threads: int, dictionary: str | None,
            scratch: Path, limit: int | None) -> list[dict]:
    rows = []
    for i, path in enumerate(inputs):
        data = path.read_bytes()[:limit]
        src = scratch / f"input{i}"
        src.write_bytes(data)
        job = {"input": str(src), "archive": str(scratch / f"input{i}.lmc"), "settings": settings,
               "threads": threads, "dict": dictionary}
        old = child(rev_tree, {**job, "compress": True})
        new = child(ROOT, {**job, "compress": False})
        tokens = old["tokens"]
        rows.append({"file": str(path), "bytes": len(data), "archive": old["archive"], "tokens": tokens,
                     "rev_s": round(old["seconds"], 2), "this_s": round(new["seconds"], 2),
                     "speedup": round(old["seconds"] / new["seconds"], 3),
                     "tokens_per_pass": round(tokens / new["passes"], 3) if tokens and new["passes"] else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.against", description=__doc__.split("\n\n")[0])
    ap.add_argument("rev", help="the earlier revision (commit, tag, branch)")
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--level", type=int, default=None)
    ap.add_argument("--segment-tokens", type=int, default=None)
    ap.add_argument("--lanes", type=int, default=None)
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--dict", default=None, help="a dictionary file both revisions read (-D)")
    ap.add_argument("--bytes", type=int, default=None, help="only the first N bytes of each file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--step", action="store_true", help="also this tree's one-row step against its floor")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    settings = {k: v for k, v in (("level", args.level), ("segment_tokens", args.segment_tokens),
                                  ("lanes", args.lanes), ("context", args.context)) if v is not None}
    with tempfile.TemporaryDirectory(prefix="lmcodec-against-") as tmp:
        tree, scratch = Path(tmp) / "rev", Path(tmp) / "work"
        tree.mkdir()
        scratch.mkdir()
        commit = unpack(args.rev, tree)
        dictionary = str(Path(args.dict).resolve()) if args.dict else None   # the children run in their trees
        rows = compare(tree, args.files, settings, args.threads, dictionary, scratch, args.bytes)
    print(f"decoding archives written by {commit[:10]}: that revision against this tree "
          f"({args.threads} threads, settings {settings or 'default'})")
    print("| file | bytes | archive | tokens | rev decode (s) | this decode (s) | speedup | tokens/pass |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['file']} | {r['bytes']} | {r['archive']} | {r['tokens']} | {r['rev_s']} | {r['this_s']} "
              f"| {r['speedup']}x | {r['tokens_per_pass'] or '-'} |")
    doc = {"rev": commit, "settings": settings, "threads": args.threads, "dict": args.dict, "files": rows}
    if args.step:
        from . import step

        out = Path(tempfile.mkstemp(suffix=".json")[1])
        step.main(["--threads", str(args.threads), "--json", str(out)])
        doc["step"] = json.loads(out.read_text())
        out.unlink()
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
