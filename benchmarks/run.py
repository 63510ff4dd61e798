"""Benchmark lmcodec against gzip, zstd, xz, bzip2 and brotli on a corpus suite.

    python -m benchmarks.run --suite smoke [--corpus PATH] [--out DIR] [--model M]
                             [--prompt TEXT | --prompt-file F] [--with-prompts] [--fresh]

Each file is compressed on its own; every lmcodec round trip is verified byte for
byte.  Results are saved after every file (``results.json`` in ``--out``), so a
stopped run continues where it left off; ``--fresh`` starts over.  At the end
``results.md`` (the table the README includes), ``bpb.png`` and
``speed_ratio.png`` are written next to it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from . import report
from .baselines import measure
from .corpus import CorpusError, corpus_root, load_suite

#: Prompts that fit the corpus files (what a user who knows the file would type).
FITTING_PROMPTS = {
    "canterbury/alice29.txt": "Alice's Adventures in Wonderland, by Lewis Carroll (Project Gutenberg).",
    "canterbury/asyoulik.txt": "As You Like It, by William Shakespeare.",
    "canterbury/lcet10.txt": "Lecture notes on the Project Gutenberg etext and computers, 1990s.",
    "canterbury/plrabn12.txt": "Paradise Lost, by John Milton.",
    "canterbury/cp.html": "An HTML page from a 1990s web site about compression.",
    "canterbury/fields.c": "C source code from a Unix program.",
    "canterbury/grammar.lsp": "A Lisp source file defining a grammar.",
    "canterbury/xargs.1": "The Unix man page for xargs, in troff format.",
    "calgary/paper1": "A technical paper in troff format about arithmetic coding.",
    "calgary/paper2": "A technical paper in troff format about computer typesetting.",
    "calgary/progc": "C source code of a Unix compression program.",
    "calgary/progl": "Lisp source code.",
    "calgary/progp": "Pascal source code.",
    "calgary/bib": "A bibliography in refer format.",
    "calgary/news": "USENET news articles.",
    "calgary/trans": "A transcript of a terminal session.",
    "calgary/book1": "Far from the Madding Crowd, by Thomas Hardy.",
    "calgary/book2": "Principles of Computer Speech, by Ian Witten (troff).",
    "large/dickens": "Collected works of Charles Dickens.",
    "large/bible.txt": "The King James Bible.",
}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if device == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc


def _code_digest() -> str:
    """SHA-256 of lmcodec's own source: results saved by other code are not reused."""
    import lmcodec

    h = hashlib.sha256()
    root = Path(lmcodec.__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _settings_key(settings: dict, prompt: bytes | None) -> str:
    """What a saved result depends on: the settings, the prompt and the code that made it."""
    blob = json.dumps({**settings, "code": _code_digest()}, sort_keys=True).encode() + (prompt or b"")
    return hashlib.sha256(blob).hexdigest()[:16]


def _lmcodec(codec, data: bytes, prompt: bytes | None, bar) -> dict:
    t0 = time.perf_counter()
    blob = codec.compress(data, prompt)
    t1 = time.perf_counter()
    stats = codec.last_stats
    back = codec.decompress(blob, prompt)
    t2 = time.perf_counter()
    if back != data:
        raise AssertionError("lmcodec round trip failed")
    return {"bytes": len(blob), "compress_s": t1 - t0, "decompress_s": t2 - t1, "tokens": stats.tokens,
            "lm_bytes": stats.lm_bytes, "model_bits": stats.model_bits,
            "model_bpb": stats.model_bpb if stats.lm_bytes else None,
            "coder_overhead": stats.coder_overhead, "methods": sorted(set(stats.methods))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="smoke", help="smoke | full | binary | large (see SUITES.txt)")
    ap.add_argument("--corpus", default=None, help="corpus folder [$LMCODEC_CORPUS or ../shared/corpus]")
    ap.add_argument("--out", default=None, help="output folder [results/SUITE]")
    ap.add_argument("--files", nargs="*", help="only these files of the suite")
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--prompt-file", default=None)
    ap.add_argument("--with-prompts", action="store_true",
                    help="also compress each file with a fitting prompt and report the bytes it saves")
    ap.add_argument("--no-lmcodec", action="store_true", help="classical compressors only")
    ap.add_argument("--fresh", action="store_true", help="ignore results saved by an earlier run")
    ap.add_argument("--device", default="auto")
    for opt in ("level", "threads", "lanes", "decode-rows", "segment-tokens", "context", "block-size"):
        ap.add_argument(f"--{opt}", type=int, default=None)
    ap.add_argument("--mixer", default=None, help="online models: none, all or a comma list [the level's]")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)

    try:
        root = corpus_root(args.corpus)
        files = load_suite(root, args.suite)
    except CorpusError as exc:
        print(f"benchmarks.run: error: {exc}", file=sys.stderr)
        return 2
    if args.files:
        files = [f for f in files if f[0] in args.files]
    prompt = (Path(args.prompt_file).read_bytes() if args.prompt_file
              else args.prompt.encode() if args.prompt is not None else None)
    out = Path(args.out or Path("results") / args.suite)
    out.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    import lmcodec
    import lmcodec.engine.model.quantize
    from lmcodec.coding.mixing import MixerConfig
    from lmcodec.engine.engine import pick_device
    from lmcodec.engine.model import registry as models

    settings = {k: getattr(args, k.replace("-", "_")) for k in
                ("device", "level", "threads", "lanes", "decode-rows", "segment-tokens", "context", "block-size")}
    settings = {k.replace("-", "_"): v for k, v in settings.items() if v is not None}
    if args.mixer is not None:
        settings["mixer"] = MixerConfig.parse(args.mixer).mask
    codec = lmcodec.Codec(args.model, **settings)
    resolved = codec.settings.resolved()
    device = pick_device(args.device)
    name, directory, gguf = models.resolve(args.model)
    model_path = directory / gguf if gguf else directory
    model_bytes = (model_path.stat().st_size if model_path.is_file()
                   else sum(p.stat().st_size for p in model_path.iterdir() if p.is_file()))
    key = _settings_key({**resolved.__dict__, "model": name, "lm": not args.no_lmcodec}, prompt)
    meta = {"suite": args.suite, "date": datetime.date.today().isoformat(), "commit": _commit(),
            "machine": _machine(device), "device": device, "model": name, "model_bytes": model_bytes,
            "settings": (f"level {resolved.level or 'custom'}, online models "
                         f"{MixerConfig(resolved.mixer).describe()}, "
                         f"segment {resolved.segment_tokens} tokens, context {resolved.context}, "
                         f"lanes {resolved.lanes}, {resolved.threads} threads, exact engine "
                         f"{lmcodec.engine.model.quantize.SPEC_VERSION}"),
            "key": key, "prompt": prompt.decode("utf-8", "replace") if prompt else None,
            "baselines": "Python bindings: gzip/lzma/bz2 (stdlib), python-zstandard, brotli"}

    results_path = out / "results.json"
    done: dict[str, dict] = {}
    if results_path.exists() and not args.fresh:
        old = json.loads(results_path.read_text())
        if old.get("meta", {}).get("key") == key:
            done = {f["file"]: f for f in old["files"]}
    doc = {"meta": meta, "files": []}
    for rel, data, sha in files:
        if rel in done and done[rel]["sha256"] == sha:
            doc["files"].append(done[rel])
            if not args.quiet:
                print(f"{rel}: already done, skipped", file=sys.stderr)
            continue
        row = {"file": rel, "bytes": len(data), "sha256": sha, "baselines": measure(data)}
        if not args.no_lmcodec:
            with tqdm(total=2 * len(data), desc=rel, unit="B", unit_scale=True, file=sys.stderr,
                      disable=args.quiet, leave=False) as bar:
                codec.progress = bar.update
                row["lmcodec"] = _lmcodec(codec, data, prompt, bar)
                if args.with_prompts and rel in FITTING_PROMPTS:
                    codec.progress = None
                    p = FITTING_PROMPTS[rel]
                    keyed = codec.compress(data, p.encode())
                    row["prompted"] = {"prompt": p, "bytes": len(keyed)}
        doc["files"].append(row)
        results_path.write_text(json.dumps(doc, indent=1))
        if not args.quiet:
            lm = row.get("lmcodec")
            msg = f"{rel}: {len(data)} B"
            if lm:
                msg += (f" -> lmcodec {8 * lm['bytes'] / len(data):.3f} bpb "
                        f"({len(data) / lm['compress_s']:.0f} B/s compress, "
                        f"{len(data) / lm['decompress_s']:.0f} B/s decompress)")
            print(msg, file=sys.stderr)
    doc["totals"] = report.totals(doc)
    results_path.write_text(json.dumps(doc, indent=1))
    (out / "results.md").write_text(report.markdown(doc))
    pngs = report.plots(doc, out)
    print(report.markdown(doc))
    print(f"wrote {results_path}, {out / 'results.md'}, " + ", ".join(map(str, pngs)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
