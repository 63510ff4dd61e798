"""Decode time of one-block archives by size: where format v6's payload check starts to pay.

A one-block archive (the short form) decodes one token a model step, so the time to
find damage after decoding grows with its token count.  For each prefix of the
input (``--sizes`` bytes) this compresses it at ``--level``, decodes it with the
model already loaded, checks the round trip, and prints tokens, archive bytes,
whether the archive carries the payload check, and the decode time
(docs/FORMAT.md, "Payload check").

    python -m benchmarks.decode_time --corpus ../shared/corpus --sizes 100 250 500 1000 2000
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time

import lmcodec
from lmcodec.format.container import PAYLOAD_CHECK_TOKENS
from lmcodec.format.reader import Reader

from .corpus import add_file_args, read_file_arg


def measure(codec: lmcodec.Codec, raw: bytes) -> dict:
    """One prefix: compressed, decoded (timed, model loaded), verified."""
    blob = codec.compress(raw)
    reader = Reader(io.BytesIO(blob), len(blob))
    block = reader.next(reader.header())
    t0 = time.perf_counter()
    if codec.decompress(blob) != raw:
        raise SystemExit(f"round trip of {len(raw)} bytes failed")
    seconds = time.perf_counter() - t0
    return dict(bytes=len(raw), tokens=block.n_tokens, archive=len(blob), payload_check=block.payload_checked,
                decode_s=round(seconds, 3), ms_per_token=round(1000 * seconds / max(1, block.n_tokens), 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_file_args(ap)
    ap.add_argument("--skip", type=int, default=2000, help="start this many bytes into the file [2000]")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 250, 500, 1000, 2000])
    ap.add_argument("--level", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    path, data = read_file_arg(args)
    codec = lmcodec.Codec(args.model, level=args.level, threads=args.threads)
    t0 = time.perf_counter()
    codec.models.coding_model()
    load = time.perf_counter() - t0
    rows = [measure(codec, data[args.skip:args.skip + n]) for n in args.sizes]
    print(f"{path.name}, level {args.level}, {args.threads} threads, {platform.processor() or platform.machine()}; "
          f"model load {load:.2f} s; payload check from {PAYLOAD_CHECK_TOKENS} tokens")
    print("| bytes | tokens | archive | payload check | decode (s) | ms/token |\n|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['bytes']} | {r['tokens']} | {r['archive']} | {'yes' if r['payload_check'] else 'no'} "
              f"| {r['decode_s']:.2f} | {r['ms_per_token']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(file=str(path), level=args.level, threads=args.threads, model_load_s=round(load, 2),
                           rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
