"""Many small files of one kind: lmcodec with a dictionary against zstd's trained dictionaries.

    python -m benchmarks.records --corpus ../shared/corpus --set aws-paginators --limit 10

For each record set (``<corpus>/records/<set>/{train,test}``): train an lmcodec
dictionary on ``train/`` (its size and training time reported) and a zstd one
on the same samples (python-zstandard, zstd's default 110 KB); then compress the
first ``--limit`` files of ``test/`` (sorted by name) each on its own and
decompress every lmcodec archive to check it.  One table per set, bits per byte
over all test files: lmcodec alone, lmcodec with the samples as the prompt (the
same bytes budget as zstd's dictionary), lmcodec ``-D`` (the adapter, and by
default the same samples as its primer: the whole key in one file), zstd -19,
zstd -19 -D, brotli -q 11.  Results (JSON, markdown, a plot) go to ``--out``
(docs/bench/records/).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import zstandard

#: zstd's default dictionary size (``zstd --train`` --maxdict, 112,640 bytes).
ZSTD_DICT_BYTES = 112_640


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file())


def _lmcodec(codec, tests: list[bytes], prompt: bytes | None, verify: bool = True) -> dict:
    """Compress each test file on its own, and (``verify``) decompress and compare; sizes and times."""
    sizes, t_comp, t_dec = [], 0.0, 0.0
    for raw in tests:
        t0 = time.perf_counter()
        blob = codec.compress(raw, prompt)
        t1 = time.perf_counter()
        if verify and codec.decompress(blob, prompt) != raw:
            raise AssertionError("lmcodec round trip failed")
        t2 = time.perf_counter()
        sizes.append(len(blob))
        t_comp += t1 - t0
        t_dec += t2 - t1
    return {"bytes": sum(sizes), "sizes": sizes, "compress_s": round(t_comp, 2),
            "decompress_s": round(t_dec, 2) if verify else None, "verified": verify}


def _classical(tests: list[bytes], zdict: zstandard.ZstdCompressionDict) -> dict[str, dict]:
    import brotli

    out = {}
    plain_c, plain_d = zstandard.ZstdCompressor(level=19), zstandard.ZstdDecompressor()
    dict_c, dict_d = zstandard.ZstdCompressor(level=19, dict_data=zdict), zstandard.ZstdDecompressor(dict_data=zdict)
    for name, comp, dec in [
        ("zstd -19", plain_c.compress, plain_d.decompress),
        ("zstd -19 -D", dict_c.compress, dict_d.decompress),
        ("brotli -q 11", lambda d: brotli.compress(d, quality=11), brotli.decompress),
    ]:
        sizes = []
        for raw in tests:
            blob = comp(raw)
            if dec(blob) != raw:
                raise AssertionError(f"{name} round trip failed")
            sizes.append(len(blob))
        out[name] = {"bytes": sum(sizes), "sizes": sizes, "verified": True}
    return out


def run_set(root: Path, name: str, limit: int, *, max_tokens: int, steps: int | None, rank: int, level: int | None,
            out: Path, dictionary: Path | None = None, verify: str = "all", primer_bytes: int = -1) -> dict:
    import lmcodec
    from lmcodec.dictionary.training import primer_of

    train = [p.read_bytes() for p in _files(root / "train")]
    test_paths = _files(root / "test")[:limit]
    tests = [p.read_bytes() for p in test_paths]
    n = sum(map(len, tests))

    zdict = zstandard.train_dictionary(ZSTD_DICT_BYTES, train)
    budget = len(zdict.as_bytes()) if primer_bytes < 0 else primer_bytes
    primer = primer_of(train, len(zdict.as_bytes()))
    if dictionary is not None:          # trained before (its meta records the training time)
        ad = lmcodec.Adapter.load(dictionary)
        train_s = ad.meta["info"]["seconds"]
    else:
        t0 = time.perf_counter()
        ad = lmcodec.train(train, max_tokens=max_tokens, steps=steps, rank=rank, primer_bytes=budget)
        train_s = time.perf_counter() - t0
        ad.save(out / f"{name}.lma")

    settings = {} if level is None else {"level": level}
    plain = lmcodec.Codec(**settings)
    rows = {
        "lmcodec": _lmcodec(plain, tests, None, verify == "all"),
        "lmcodec --prompt-file samples": _lmcodec(plain, tests, primer, verify == "all"),
    }
    if ad.primer:   # the same adapter without its primer: what the weights alone gain, at plain speed
        weights_only = lmcodec.Adapter.build(ad.base_fingerprint, ad.tensors, None, ad.meta["info"])
        rows["lmcodec -D, adapter alone"] = _lmcodec(lmcodec.Codec(dictionary=weights_only, **settings), tests,
                                                     None, verify in ("all", "dict"))
    rows["lmcodec -D"] = _lmcodec(lmcodec.Codec(dictionary=ad, **settings), tests, None, verify in ("all", "dict"))
    rows.update(_classical(tests, zdict))
    for r in rows.values():
        r["bpb"] = round(8 * r["bytes"] / n, 4)
    return {"set": name, "test_files": [p.name for p in test_paths], "test_bytes": n,
            "train_files": len(train), "train_bytes": sum(map(len, train)),
            "dictionary": {"id": ad.id, "bytes": len(ad), "train_s": round(train_s, 1), **ad.meta["info"]},
            "zstd_dictionary_bytes": len(zdict.as_bytes()), "primer_bytes": len(primer),
            "dictionary_primer_bytes": len(ad.primer or b""), "rows": rows}


def markdown(doc: dict) -> str:
    lines = []
    for s in doc["sets"]:
        d = s["dictionary"]
        lines += [f"### {s['set']} ({len(s['test_files'])} test files, {s['test_bytes']:,} B; "
                  f"trained on {s['train_files']} files, {s['train_bytes']:,} B)", "",
                  f"lmcodec dictionary: {d['bytes']:,} B, {d['tokens']:,} tokens, {d['steps']} steps, "
                  f"{d['train_s']} s to train (bits/token {d['loss_first']} -> {d['loss_last']}); "
                  f"its primer: {s.get('dictionary_primer_bytes', 0):,} B; "
                  f"zstd dictionary: {s['zstd_dictionary_bytes']:,} B; prompt: {s['primer_bytes']:,} B of samples.",
                  "", "| method | bytes | bits/byte | compress s | decompress s |", "|---|---:|---:|---:|---:|"]
        for name, r in s["rows"].items():
            name = name if r.get("verified", True) else name + " (not decoded)"
            c = r.get("compress_s", "")
            dd = r.get("decompress_s")
            dd = "" if dd is None else dd
            lines.append(f"| {name} | {r['bytes']:,} | {r['bpb']:.3f} | {c} | {dd} |")
        rows = s["rows"]
        zd, l0 = rows["zstd -19 -D"]["bytes"], rows["lmcodec"]["bytes"]
        lines.append("")
        for name in ("lmcodec -D", "lmcodec -D, adapter alone"):
            if name in rows:
                ld = rows[name]["bytes"]
                lines.append(f"{name}: {100 * (1 - ld / zd):.1f}% fewer bytes than zstd -19 -D, "
                             f"{100 * (1 - ld / l0):.1f}% fewer than lmcodec alone.")
        lines.append("")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = doc["sets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4), squeeze=False)
    for ax, s in zip(axes[0], sets):
        names = list(s["rows"])
        vals = [s["rows"][k]["bpb"] for k in names]
        colors = ["tab:blue" if k.startswith("lmcodec") else "tab:gray" for k in names]
        ax.barh(names[::-1], vals[::-1], color=colors[::-1])
        for y, v in enumerate(vals[::-1]):
            ax.text(v, y, f" {v:.3f}", va="center")
        ax.set_title(f"records/{s['set']}: each test file on its own")
        ax.set_xlabel("bits per byte (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("../shared/corpus"))
    ap.add_argument("--set", action="append", dest="sets", help="record set (repeatable) [aws-paginators, manpages]")
    ap.add_argument("--limit", type=int, default=10, help="first N test files by name")
    ap.add_argument("--max-tokens", type=int, default=40_000)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--level", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("docs/bench/records"))
    ap.add_argument("--dict", type=Path, default=None, dest="dictionary",
                    help="use this trained dictionary instead of training (one set only)")
    ap.add_argument("--primer-bytes", type=int, default=-1,
                    help="the dictionary's primer (lmcodec train --primer-bytes) [-1: zstd's dictionary size, "
                         "the prompt row's budget]")
    ap.add_argument("--verify", choices=["all", "dict", "none"], default="all",
                    help="which lmcodec rows decompress and compare (all: every round trip)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs",
           "args": {k: str(v) for k, v in vars(args).items()}, "sets": []}
    for name in args.sets or ["aws-paginators", "manpages"]:
        doc["sets"].append(run_set(args.corpus / "records" / name, name, args.limit, max_tokens=args.max_tokens,
                                   steps=args.steps, rank=args.rank, level=args.level, out=args.out,
                                   dictionary=args.dictionary, verify=args.verify,
                                   primer_bytes=args.primer_bytes))
        (args.out / "results.json").write_text(json.dumps(doc, indent=1))
        (args.out / "results.md").write_text(markdown(doc))
        plot(doc, args.out / "records.png")
        print(markdown({"sets": doc["sets"][-1:]}), flush=True)


if __name__ == "__main__":
    main()
