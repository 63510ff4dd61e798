"""Throughput of ``--cluster`` with 1 and 2 workers (1 thread each) on one input, and the driver's memory.

    python -m benchmarks.scale CORPUS [--workers 1,2] [--level 1] [--block-size 65536]
                               [--model NAME|PATH] [--method auto|lm|zstd|raw] [--json OUT]

Starts one private ``local:N`` cluster (N = the most workers asked for), then
for each worker count compresses CORPUS through :class:`lmcodec.cluster.executor.RayExecutor`
and reports bytes/s, the speed-up over the first count, that every count made
the same archive, and the driver's memory: its peak RSS (``ru_maxrss``, the
whole process: torch, the model for the header, Ray's client) and the peak of
Python allocations during the run (``tracemalloc``), which the executor bounds
by blocks in flight x block size.  Each count is warmed up first (the workers
load the model) so the figure is the steady state.  The machine's load
(``os.getloadavg``) is printed before and after: on a shared CPU the speed-up
says little.  ``--model`` is the model argument each worker loads.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import time
import tracemalloc
from pathlib import Path


class _Sink(io.RawIOBase):
    """Counts the archive's bytes and keeps a digest of them (the archives are compared)."""

    def __init__(self) -> None:
        import hashlib

        self.n = 0
        self.h = hashlib.blake2b(digest_size=16)

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.n += len(b)
        self.h.update(b)
        return len(b)


def run_one(codec_factory, corpus: Path, executor) -> dict:
    from lmcodec.cluster.executor import IN_FLIGHT_PER_WORKER

    codec = codec_factory(executor)
    if codec.settings.method in ("auto", "lm"):
        executor.warm_up()                              # every worker loads the model first
        codec.models.coding_model()                     # and the driver its copy (for the header)
    sink = _Sink()
    tracemalloc.start()
    t0 = time.perf_counter()
    with open(corpus, "rb") as f:
        stats = codec.compress_stream(f, sink)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    block = codec.settings.block_size
    return {"workers": executor.workers, "threads_per_worker": executor.threads, "seconds": round(seconds, 2),
            "input_bytes": stats.input_bytes, "archive_bytes": sink.n, "archive_digest": sink.h.hexdigest(),
            "bytes_per_s": round(stats.input_bytes / seconds, 1),
            "driver_python_peak_bytes": peak,
            "in_flight_bound_bytes": IN_FLIGHT_PER_WORKER * executor.workers * block,
            "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--workers", default="1,2", help="comma list of worker counts [1,2]")
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=64 << 10,
                    help="bytes per block [65536: a 2-core run gets a few blocks per worker]")
    ap.add_argument("--model", default=None)
    ap.add_argument("--method", default="auto", choices=["auto", "lm", "zstd", "raw"],
                    help="raw: no model work at all, to measure the driver's memory on a big input")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.workers.split(",")]

    from lmcodec import Codec
    from lmcodec.cluster.executor import RayExecutor, connect

    load_before = os.getloadavg()
    address = f"local:{max(counts)}"
    connect(address)

    def factory(executor):
        return Codec(args.model, executor=executor, level=args.level, block_size=args.block_size, threads=1,
                     method=args.method)

    rows = []
    for n in counts:
        ex = RayExecutor(address, workers=n, threads=1, model=args.model)
        try:
            rows.append(run_one(factory, args.corpus, ex))
        finally:
            ex.close()
        r = rows[-1]
        print(f"{n} worker(s): {r['bytes_per_s']:.0f} B/s ({r['input_bytes']} bytes in {r['seconds']} s), "
              f"driver: Python peak {r['driver_python_peak_bytes'] / 2**10:.0f} KiB "
              f"(in flight at most {r['in_flight_bound_bytes'] / 2**10:.0f} KiB of input), "
              f"RSS {r['driver_peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    for r in rows:
        r["speedup"] = round(r["bytes_per_s"] / rows[0]["bytes_per_s"], 3)
    same = len({r["archive_digest"] for r in rows}) == 1
    doc = {"corpus": str(args.corpus), "level": args.level, "block_size": args.block_size, "method": args.method,
           "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(),
           "same_archive": same, "runs": rows}
    ups = ", ".join(f"{r['workers']}: {r['speedup']}x" for r in rows)
    print(f"speed-up: {ups}; same archive: {same}; load {load_before[0]:.1f} -> {doc['load_after'][0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
