#!/usr/bin/env python
"""Measure lmcodec's peak memory on large inputs (the runs too slow for the test suite).

1. ``stream``: N MiB of text generated on the fly, piped through
   ``lmcodec compress --method zstd -c -`` into a file, then that archive piped
   through ``lmcodec decompress -c -`` and checked against the generator's hash.
   Compression reads ``--block-size`` (default 4 MiB) blocks, so the peak RSS
   of both processes must not grow with N.
2. ``prompt``: ``lmcodec compress --prompt-file BIG`` with a BIG prompt file,
   once with ``--method zstd`` (the prompt is only hashed) and once with
   ``--method lm`` (the prompt conditions the model: only its last context/2
   tokens are used, but it must be tokenized to find them).  A watchdog kills the
   child above ``--rss-limit-gib`` and reports that instead of swapping the box.

Peak RSS is the child's own ``ru_maxrss`` from ``os.wait4`` (not the process
tree's, not this script's).  Example:

    python scripts/resource_bounds.py --stream-mib 1024 --prompt-mib 100 --json bounds.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CLI = [sys.executable, "-c", "import sys; from lmcodec.cli.main import main; sys.exit(main(prog_name='lmcodec'))"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
FAST = ["--segment-tokens", "24", "--lanes", "2", "--context", "32", "--threads", "2"]

GEN = r"""
import hashlib, random, sys
n = int(sys.argv[1]); rng = random.Random(5)
words = ("the of and to in is was he for it with as his on be at by had not are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out so "
         "said what up its about into than them can only other new some could time these two may then do "
         "first any my now such like our over man me even most made after also did many before must through "
         "back years where much your way well down should because each just those people Mr how too little "
         "state good very make world still own see men work long get here between both life being under").split()
lines = []
for i in range(200000):
    lines.append("%07d %s.\n" % (i, " ".join(rng.choice(words) for _ in range(rng.randint(6, 18)))))
pool = "".join(lines).encode()          # ~19 MiB of text, emitted cyclically from shifting offsets
h = hashlib.blake2b(digest_size=16); out = sys.stdout.buffer; k = 0
while n > 0:
    start = (k * ((1 << 20) + 7919)) % (len(pool) - (1 << 20)); k += 1
    b = pool[start:start + min(n, 1 << 20)]
    out.write(b); h.update(b); n -= len(b)
out.flush(); sys.stderr.write(h.hexdigest())
"""


def wait_rss(proc: subprocess.Popen) -> tuple[int, float]:
    """Exit code and the child's own peak RSS in MiB."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def watchdog(proc: subprocess.Popen, limit_bytes: int, timeout: float, state: dict) -> None:
    import psutil

    t0 = time.monotonic()
    try:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            rss = p.memory_info().rss
            state["max_seen"] = max(state.get("max_seen", 0), rss)
            if rss > limit_bytes or time.monotonic() - t0 > timeout:
                state["killed"] = "rss" if rss > limit_bytes else "timeout"
                state["killed_at_s"] = round(time.monotonic() - t0, 1)
                proc.send_signal(signal.SIGKILL)
                return
            time.sleep(0.2)
    except psutil.NoSuchProcess:
        pass


def baseline() -> float:
    p = subprocess.Popen(CLI + ["-q", "compress", "--method", "zstd", "-c", "-"], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, env=ENV)
    p.stdin.write(b"x")
    p.stdin.close()
    return wait_rss(p)[1]


def stream(mib: int, block_size: int | None, workdir: Path) -> dict:
    size = mib << 20
    arc = workdir / "stream.lmc"
    extra = ["--block-size", str(block_size)] if block_size else []
    t0 = time.perf_counter()
    gen = subprocess.Popen([sys.executable, "-c", GEN, str(size)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with open(arc, "wb") as out:
        enc = subprocess.Popen(CLI + ["-q", "compress", "--method", "zstd", *extra, "-c", "-"],
                               stdin=gen.stdout, stdout=out, env=ENV)
        gen.stdout.close()
        expected = gen.stderr.read().decode()
        gen.wait()
        rc_enc, enc_rss = wait_rss(enc)
    t_enc = time.perf_counter() - t0
    archive_bytes = arc.stat().st_size
    t0 = time.perf_counter()
    cat = subprocess.Popen(["cat", str(arc)], stdout=subprocess.PIPE)
    dec = subprocess.Popen(CLI + ["-q", "decompress", "-c", "-"], stdin=cat.stdout, stdout=subprocess.PIPE,
                           env=ENV)
    cat.stdout.close()
    h, n = hashlib.blake2b(digest_size=16), 0
    while chunk := dec.stdout.read(1 << 20):
        h.update(chunk)
        n += len(chunk)
    cat.wait()
    rc_dec, dec_rss = wait_rss(dec)
    t_dec = time.perf_counter() - t0
    arc.unlink()
    return dict(input_mib=mib, block_size=block_size or 4 << 20, archive_bytes=archive_bytes,
                ratio=round(archive_bytes / size, 4), compress_rc=rc_enc, compress_seconds=round(t_enc, 1),
                compress_peak_rss_mib=round(enc_rss, 1), decompress_rc=rc_dec,
                decompress_seconds=round(t_dec, 1), decompress_peak_rss_mib=round(dec_rss, 1),
                round_trip_ok=(n == size and h.hexdigest() == expected))


def prompt(nbytes: int, method: str, workdir: Path, rss_limit: int, timeout: float) -> dict:
    big = workdir / f"prompt-{nbytes}.txt"
    if not big.exists():
        gen = subprocess.run([sys.executable, "-c", GEN, str(nbytes)], capture_output=True, check=True)
        big.write_bytes(gen.stdout)
    src = workdir / "small.txt"
    src.write_bytes(b"The prompt is a decoding key, not a secret. It conditions the model.\n")
    out = workdir / "small.txt.lmc"
    out.unlink(missing_ok=True)
    cmd = CLI + ["-q", "compress", "-f", "--method", method, *FAST, "--prompt-file", str(big), str(src)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=ENV)
    state: dict = {}
    dog = threading.Thread(target=watchdog, args=(proc, rss_limit, timeout, state), daemon=True)
    dog.start()
    rc, rss = wait_rss(proc)
    dog.join()
    err = proc.stderr.read().decode().strip()
    row = dict(prompt_bytes=nbytes, method=method, rc=rc, seconds=round(time.perf_counter() - t0, 1),
               peak_rss_mib=round(rss, 1), killed=state.get("killed"), killed_at_s=state.get("killed_at_s"),
               stderr=err[-300:])
    if rc == 0:  # and it decompresses with the same prompt file
        t1 = time.perf_counter()
        d = subprocess.Popen(CLI + ["-q", "decompress", "-c", "--prompt-file", str(big), str(out)],
                             stdout=subprocess.PIPE, env=ENV)
        data = d.stdout.read()
        rc_d, rss_d = wait_rss(d)
        row.update(decompress_rc=rc_d, decompress_peak_rss_mib=round(rss_d, 1),
                   decompress_seconds=round(time.perf_counter() - t1, 1), round_trip_ok=data == src.read_bytes())
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stream-mib", type=int, default=1024, help="MiB piped through --method zstd [1024]; 0 skips")
    ap.add_argument("--block-size", type=int, default=None, help="--block-size for the stream run")
    ap.add_argument("--prompt-mib", type=int, nargs="*", default=[100],
                    help="prompt file sizes in MiB [100]; none skips")
    ap.add_argument("--prompt-methods", default="zstd,lm", help="methods to try with the big prompt [zstd,lm]")
    ap.add_argument("--rss-limit-gib", type=float, default=10.0, help="kill a child above this RSS [10]")
    ap.add_argument("--timeout", type=float, default=1200, help="kill a prompt run after this many s [1200]")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    report: dict = {"baseline_peak_rss_mib": round(baseline(), 1)}
    print(f"baseline (compress 1 byte): {report['baseline_peak_rss_mib']} MiB", flush=True)
    with tempfile.TemporaryDirectory(prefix="lmcodec-bounds-") as d:
        work = Path(d)
        if args.prompt_mib:
            report["prompt"] = []
            runs = [(1 << 10, m) for m in args.prompt_methods.split(",")]  # a 1 KiB prompt: the baseline
            runs += [(size << 20, m) for size in args.prompt_mib for m in args.prompt_methods.split(",")]
            for nbytes, method in runs:
                row = prompt(nbytes, method, work, int(args.rss_limit_gib * 2**30), args.timeout)
                report["prompt"].append(row)
                print(json.dumps(row), flush=True)
        if args.stream_mib:
            report["stream"] = stream(args.stream_mib, args.block_size, work)
            print(json.dumps(report["stream"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
