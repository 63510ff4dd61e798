"""Framing cost of small files: each file compressed on its own, every round trip verified.

For each file: the archive's bytes, its payload bytes (the coded streams or the
stored bytes) and the rest, the framing (header, lengths, checks), and bits per
byte of the archive and of the payload alone (docs/FORMAT.md, "Framing cost").
Every archive is made first and the table printed; then each is decoded and
compared with its file, and the table printed again with the count verified.

    python -m benchmarks.framing --level 6 DIR:N [DIR:N ...]

``DIR:N`` takes the first N files of DIR, sorted by name.  Decoding runs the
model one token per step (a small file is one segment), so this takes minutes.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import lmcodec
from lmcodec.format.container import End
from lmcodec.format.reader import Reader


def measure(codec: lmcodec.Codec, path: Path) -> tuple[dict, bytes]:
    """One file's archive: its sizes and framing (the round trip is :func:`verify`'s)."""
    data = path.read_bytes()
    t0 = time.perf_counter()
    blob = codec.compress(data)
    reader = Reader(io.BytesIO(blob), len(blob))
    header = reader.header()
    payload = 0
    while not isinstance(rec := reader.next(header), End):
        payload += sum(len(p) for p in rec.payloads)
    return dict(file=path.name, bytes=len(data), archive=len(blob), payload=payload, framing=len(blob) - payload,
                version=header.version, encode_s=round(time.perf_counter() - t0, 1)), blob


def verify(codec: lmcodec.Codec, path: Path, blob: bytes, row: dict) -> None:
    """Decode the archive and compare it with the file (a failure ends the run)."""
    t0 = time.perf_counter()
    if codec.decompress(blob) != path.read_bytes():
        raise SystemExit(f"{path}: round trip failed")
    row["decode_s"] = round(time.perf_counter() - t0, 1)
    row["verified"] = True


def _summary(d: str, rows: list[dict]) -> dict:
    total = sum(r["bytes"] for r in rows)
    arch = sum(r["archive"] for r in rows)
    pay = sum(r["payload"] for r in rows)
    return dict(set=d, files=len(rows), bytes=total, archive=arch, payload=pay,
                framing_per_file=round((arch - pay) / len(rows), 1), bpb=round(8 * arch / total, 3),
                payload_bpb=round(8 * pay / total, 3), verified=sum(bool(r.get("verified")) for r in rows),
                rows=rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sets", nargs="+", metavar="DIR:N")
    ap.add_argument("--level", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    codec = lmcodec.Codec(level=args.level, threads=args.threads)
    sets = []
    for spec in args.sets:   # first every archive (cheap: one parallel pass a file), then every decode
        d, n = spec.rsplit(":", 1)
        files = sorted(p for p in Path(d).iterdir() if p.is_file())[:int(n)]
        rows = []
        for p in files:
            rows.append(measure(codec, p))
            print(json.dumps(rows[-1][0]), file=sys.stderr, flush=True)
        sets.append((d, files, rows))

    def report() -> list[dict]:
        out = [_summary(d, [r for r, _ in rows]) for d, _, rows in sets]
        for s in out:
            print(f"{s['set']}: {s['files']} files ({s['verified']} round trips verified), {s['bytes']} B -> "
                  f"{s['archive']} B ({s['bpb']} bits/byte; payload alone {s['payload_bpb']}; framing "
                  f"{s['framing_per_file']} B a file)", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
        return out

    report()
    for d, files, rows in sets:
        for p, (row, blob) in zip(files, rows):
            verify(codec, p, blob, row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
