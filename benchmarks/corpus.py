"""The benchmark corpus: suites from SUITES.txt, files checked against MANIFEST.sha256."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"


class CorpusError(Exception):
    """The corpus path, a suite or a file is missing or does not match the manifest."""


def corpus_root(path: str | os.PathLike | None) -> Path:
    """``--corpus``, else ``$LMCODEC_CORPUS``, else ``../shared/corpus`` next to the checkout."""
    root = Path(path or os.environ.get("LMCODEC_CORPUS") or DEFAULT_CORPUS).expanduser()
    if not (root / "SUITES.txt").is_file():
        raise CorpusError(f"no corpus at {root} (SUITES.txt missing); pass --corpus PATH or set LMCODEC_CORPUS")
    return root


def suites(root: Path) -> dict[str, list[str]]:
    out = {}
    for line in (root / "SUITES.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            name, files = line.split(":", 1)
            out[name.strip()] = files.split()
    return out


def manifest(root: Path) -> dict[str, str]:
    path = root / "MANIFEST.sha256"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[1].removeprefix("./")] = parts[0]
    return out


def load_suite(root: Path, suite: str) -> list[tuple[str, bytes, str]]:
    """(relative name, bytes, sha256) of each file of ``suite``, checked against the manifest."""
    table = suites(root)
    if suite not in table:
        raise CorpusError(f"unknown suite {suite!r} (have: {', '.join(sorted(table))})")
    sums = manifest(root)
    files = []
    for rel in table[suite]:
        path = root / rel
        if not path.is_file():
            raise CorpusError(f"{path}: missing from the corpus")
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if rel in sums and sums[rel] != sha:
            raise CorpusError(f"{rel}: sha256 {sha[:16]}… does not match MANIFEST.sha256")
        if rel not in sums and sums:
            raise CorpusError(f"{rel}: not listed in MANIFEST.sha256")
        files.append((rel, data, sha))
    return files


#: The one-file benchmarks' default input.
DEFAULT_FILE = "canterbury/alice29.txt"


def add_file_args(ap) -> None:
    """``--file``, ``--corpus``, ``--bytes`` and ``--model``: what a one-file benchmark reads."""
    ap.add_argument("--file", default=None, help=f"input [corpus {DEFAULT_FILE}]")
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--bytes", type=int, default=None, help="use only the first N bytes")
    ap.add_argument("--model", default=None)


def read_file_arg(args) -> tuple[Path, bytes]:
    """The path and bytes :func:`add_file_args`'s options name."""
    path = Path(args.file) if args.file else corpus_root(args.corpus) / DEFAULT_FILE
    return path, path.read_bytes()[: args.bytes]
