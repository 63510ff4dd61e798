"""The GPU check's steps (run by check.sh; ``--dry-run`` runs them on CPU with tiny inputs).

    python scripts/gpu/check.py --out DIR [--device cuda] [--inputs DIR] [--speed-file F]
                                [--speed-bytes N] [--budget SECONDS] [--dry-run]
    python scripts/gpu/check.py --prepare DIR        (here: the check inputs and their CPU archives)

Steps, in order of importance, each recorded in ``DIR/gpu-check.json`` as soon as it
ends (so a run cut short still reports what it did):

1. ``lmcodec selftest --device D``: the golden digest (``digest_ok``);
2. the CPU-made archives decode on D: ``tests/data/v3_*.lmc`` and the archives
   ``--prepare`` made here of the check inputs;
3. the check inputs compressed on D give the CPU's archive bytes (``same_archive_bytes``),
   and those archives go to ``DIR/device-archives.tar`` for a CPU decode here
   (``python scripts/gpu/cross_decode.py TAR``); ``cross_decode_ok`` = 2 and 3;
4. the tests that need a GPU (they skip without one; picked by ``-k "cuda or triton"``),
   at most CUDA_TESTS_S seconds, not in the dry run (``cuda_tests_ok``);
5. ``benchmarks.speed`` at levels 3 and 6, both ways, on the first ``--speed-bytes``
   of ``--speed-file`` (``levels``: bytes/s each way), each in a subprocess bounded
   by what is left of ``--budget``.

Exit status 0 only if every check passed and every level was measured.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

#: Levels benchmarked both ways (the targets: level 6 and level 3).
SPEED_LEVELS = (3, 6)
#: The CUDA-only tests (the engine on the GPU against the reference and the CPU), and their time cap.
CUDA_TESTS = ("tests/test_rows.py", "tests/test_exact.py", "tests/test_ops_triton.py", "tests/test_rowdecode.py")
CUDA_TESTS_S = 150
#: Seconds kept back from the budget for writing results after the last step.
RESERVE_S = 10
#: Bytes of each check input: a few hundred tokens on the GPU, a few dozen in the dry run.
INPUT_BYTES = {False: 1500, True: 40}
DRY_SPEED_BYTES = 60
#: Left out of the dry run: 1,400 tokens of steps, and tests/test_formats.py decodes it on CPU already.
DRY_SKIP = {"v3_custom_prompt.lmc"}


def check_inputs(small: bool) -> dict[str, tuple[bytes, dict, bytes | None]]:
    """(data, settings, prompt) of each file the check compresses on the device.

    Taken from files of this repository (prose, code), one with a prompt, one that
    is not text (stored by the fallback): every path the encoder has.
    """
    n = INPUT_BYTES[small]
    readme = (REPO / "README.md").read_bytes()
    code = (REPO / "lmcodec" / "coding" / "coder.py").read_bytes()
    return {
        "prose-l6": (readme[:n], {"level": 6}, None),
        "code-l3": (code[:n], {"level": 3}, None),
        "prompt-l1": (readme[n:2 * n], {"level": 1}, b"lmcodec's README, continued"),
        "binary": (bytes(range(256)) * (1 if small else 8), {}, None),
    }


def _codec(device: str, settings: dict):
    import lmcodec

    return lmcodec.Codec(device=device, **settings)


def prepare(out: Path, small: bool) -> None:
    """Write the check inputs, their settings and their CPU-made archives under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, (data, settings, prompt) in check_inputs(small).items():
        blob = _codec("cpu", settings).compress(data, prompt)
        (out / f"{name}.bin").write_bytes(data)
        (out / f"{name}.cpu.lmc").write_bytes(blob)
        manifest[name] = {"settings": settings, "prompt": prompt.hex() if prompt else None,
                          "sha256": hashlib.sha256(data).hexdigest()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def read_inputs(folder: Path) -> dict[str, dict]:
    """What :func:`prepare` wrote: per name its data, settings, prompt and CPU archive."""
    manifest = json.loads((folder / "manifest.json").read_text())
    out = {}
    for name, m in manifest.items():
        data = (folder / f"{name}.bin").read_bytes()
        if hashlib.sha256(data).hexdigest() != m["sha256"]:
            raise SystemExit(f"check input {name} does not match its manifest")
        out[name] = dict(m, data=data, prompt=bytes.fromhex(m["prompt"]) if m["prompt"] else None,
                         cpu=(folder / f"{name}.cpu.lmc").read_bytes())
    return out


def _v3_fixtures() -> dict:
    """tests/test_formats.py's table of the committed CPU-made archives (file -> original, prompt, settings)."""
    spec = importlib.util.spec_from_file_location("_formats", REPO / "tests" / "test_formats.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.V3


class Report:
    """gpu-check.json, rewritten after every step."""

    def __init__(self, path: Path, **fields):
        self.path = path
        self.doc = dict(fields, errors=[], stages={})
        self.t0 = time.perf_counter()
        self.save()

    def stage(self, name: str, t0: float, **fields) -> None:
        self.doc["stages"][name] = round(time.perf_counter() - t0, 2)
        self.doc.update(fields)
        self.save()

    def error(self, msg: str) -> None:
        print(f"check: {msg}", file=sys.stderr)
        self.doc["errors"].append(msg)
        self.save()

    def save(self) -> None:
        self.doc["seconds"] = round(time.perf_counter() - self.t0, 2) if hasattr(self, "t0") else 0.0
        self.path.write_text(json.dumps(self.doc, indent=1))


def selftest(report: Report, device: str) -> None:
    """``lmcodec selftest --device D --json`` as a user runs it (its own process)."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-c", "from lmcodec.cli.main import main; main()", "selftest", "--device", device, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        doc = {"ok": False}
        report.error(f"selftest failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    ok = proc.returncode == 0 and bool(doc.get("ok")) and doc.get("digest") == doc.get("golden")
    report.stage("selftest", t0, digest_ok=ok, selftest=doc)


def cross_decode(report: Report, device: str, inputs: dict[str, dict], tar_path: Path, dry: bool) -> None:
    """CPU archives decode on ``device``; ``device``'s archives equal the CPU's and go into a tar."""
    t0 = time.perf_counter()
    results = {}
    for name, (original, prompt, settings) in _v3_fixtures().items():
        if dry and name in DRY_SKIP:
            continue
        blob = (REPO / "tests" / "data" / name).read_bytes()
        results[name] = _decodes(report, device, blob, prompt, original, name)
    for name, m in inputs.items():
        results[f"{name}.cpu.lmc"] = _decodes(report, device, m["cpu"], m["prompt"], m["data"], name)
    decode_ok = all(results.values())
    same, made = {}, {}
    for name, m in inputs.items():
        try:
            made[name] = _codec(device, m["settings"]).compress(m["data"], m["prompt"])
        except Exception as exc:  # a failure is a result here, not a crash of the whole check
            report.error(f"{name}: compress on {device} failed: {type(exc).__name__}: {exc}")
            made[name] = b""
        same[name] = made[name] == m["cpu"]
        if not same[name]:
            report.error(f"{name}: the {device} archive differs from the CPU's")
    with tarfile.open(tar_path, "w") as tar:
        manifest = {n: {k: m[k] for k in ("settings", "sha256")} | {"prompt": m["prompt"].hex() if m["prompt"] else None}
                    for n, m in inputs.items()}
        files = {"manifest.json": json.dumps(manifest, indent=1).encode()}
        for name, m in inputs.items():
            files[f"{name}.bin"] = m["data"]
            files[f"{name}.{device}.lmc"] = made[name]
        for fname, data in files.items():
            info = tarfile.TarInfo(fname)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report.stage("cross_decode", t0, cross_decode_ok=decode_ok and all(same.values()),
                 decoded_on_device=results, same_archive_bytes=same, device_archives=tar_path.name)


def _decodes(report: Report, device: str, blob: bytes, prompt, original: bytes, name: str) -> bool:
    try:
        ok = _codec(device, {}).decompress(blob, prompt) == original
    except Exception as exc:
        report.error(f"{name}: decode on {device} failed: {type(exc).__name__}: {exc}")
        return False
    if not ok:
        report.error(f"{name}: decoded on {device} to other bytes")
    return ok


def cuda_tests(report: Report, deadline: float) -> None:
    """pytest on the tests that need a GPU (they skip on CPU), bounded in time."""
    t0 = time.perf_counter()
    files = [f for f in CUDA_TESTS if (REPO / f).is_file()]
    limit = min(CUDA_TESTS_S, (deadline - t0 - RESERVE_S) / 3)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cuda or triton", *files]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=max(1.0, limit))
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        ok = proc.returncode == 0
        if not ok:
            report.error(f"CUDA tests failed: {(proc.stdout + proc.stderr)[-600:]}")
    except subprocess.TimeoutExpired:
        ok, tail = False, [f"over {limit:.0f} s"]
        report.error(f"CUDA tests ran over {limit:.0f} s")
    report.stage("cuda_tests", t0, cuda_tests_ok=ok, cuda_tests=tail[0])


def speed(report: Report, device: str, path: Path, nbytes: int, out: Path, deadline: float) -> None:
    """benchmarks.speed at each level, both ways; each run gets an equal share of the time left."""
    levels = report.doc.setdefault("levels", {})
    for i, level in enumerate(SPEED_LEVELS):
        t0 = time.perf_counter()
        left = deadline - t0 - RESERVE_S
        limit = left / (len(SPEED_LEVELS) - i)
        res = out / f"speed-l{level}.json"
        cmd = [sys.executable, "-m", "benchmarks.speed", "--file", str(path), "--bytes", str(nbytes),
               "--level", str(level), "--device", device, "--no-forward", "--json", str(res)]
        if limit < 5:
            levels[str(level)] = {"skipped": f"{left:.0f} s left of the budget"}
            report.error(f"level {level}: no time left to measure")
            continue
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=limit)
        except subprocess.TimeoutExpired:
            levels[str(level)] = {"timed_out_s": round(limit, 1), "bytes": nbytes}
            report.error(f"level {level}: speed run over its {limit:.0f} s share of the budget")
            continue
        if proc.returncode or not res.is_file():
            levels[str(level)] = {"failed": proc.stderr.strip()[-300:]}
            report.error(f"level {level}: speed run failed (exit {proc.returncode})")
            continue
        doc = json.loads(res.read_text())
        levels[str(level)] = {k: doc[k] for k in ("bytes", "tokens", "compress_Bps", "decompress_Bps",
                                                  "compress_tokps", "decompress_tokps", "bpb", "decode_rows",
                                                  "segment_tokens", "context")}
        report.stage(f"speed_l{level}", t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="where gpu-check.json and the device's archives go")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="on CPU with tiny inputs (what CI runs)")
    ap.add_argument("--inputs", type=Path, help="the check inputs --prepare wrote (default: made now)")
    ap.add_argument("--speed-file", type=Path, help="the speed benchmark's input (default: README.md)")
    ap.add_argument("--speed-bytes", type=int, default=2_000_000)
    ap.add_argument("--budget", type=float, default=420.0, help="seconds this run may take in all")
    ap.add_argument("--prepare", type=Path, help="write the check inputs and their CPU archives, then stop")
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(args.prepare, small=False)
        return 0
    if args.out is None:
        ap.error("--out is required")
    deadline = time.perf_counter() + args.budget
    device = "cpu" if args.dry_run else args.device
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    report = Report(args.out / "gpu-check.json", device=device, dry_run=args.dry_run,
                    device_name=torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                    torch=torch.__version__, commit=_commit(), digest_ok=False, cross_decode_ok=False)
    selftest(report, device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.inputs
        if folder is None:
            folder = Path(tmp) / "inputs"
            prepare(folder, small=args.dry_run)
        cross_decode(report, device, read_inputs(folder), args.out / "device-archives.tar", args.dry_run)
        if not args.dry_run:
            cuda_tests(report, deadline)
        speed_file = args.speed_file or REPO / "README.md"
        nbytes = DRY_SPEED_BYTES if args.dry_run else args.speed_bytes
        speed(report, device, speed_file, nbytes, args.out, deadline)
    doc = report.doc
    measured = all("compress_Bps" in doc["levels"].get(str(lv), {}) for lv in SPEED_LEVELS)
    ok = doc["digest_ok"] and doc["cross_decode_ok"] and measured and doc.get("cuda_tests_ok", True)
    report.doc["ok"] = ok
    report.save()
    print(json.dumps({k: doc[k] for k in ("device", "digest_ok", "cross_decode_ok", "levels", "errors", "seconds")},
                     indent=1))
    return 0 if ok else 1


def _commit() -> str:
    """The checkout's commit, if git and the repository are here (the device machine may lack both)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO, timeout=10).stdout.strip() or os.environ.get("LMCODEC_COMMIT", "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("LMCODEC_COMMIT", "")


if __name__ == "__main__":
    sys.exit(main())
