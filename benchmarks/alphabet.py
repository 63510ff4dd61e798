"""What the two-stage (top-k + other) coding rows cost in ratio, and what they save.

    python -m benchmarks.alphabet [--file PATH] [--corpus DIR] [--bytes N]
                                  [--top-k 16,64,256,1024] [--segment-tokens N] [--json OUT]

Scores the file with the model (full causal forward over ``segment-tokens``
windows, the same distributions the codec sees up to rounding), then codes
every token with constriction twice: once under the full alphabet row (format
version 1), once in two stages for each ``k`` (format version 2).  Prints the
coded sizes, the model's ideal size, the share of tokens that needed stage 2,
and the time building a step's rows takes for 64 rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .corpus import add_file_args, read_file_arg


def model_windows(codec, symbols: np.ndarray, segment: int) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """([n, V] float32 next-token logits, their n symbols), one window at a time.

    One window's logits are ~400 MB at 2,048 tokens; a whole file's would not fit.
    """
    from lmcodec.engine import torch_threads

    model, tok = codec._load(codec._model_arg)
    s = codec.settings.resolved()
    engine = codec._engine(model, s.device, s.dtype)
    inputs = torch.from_numpy(tok.model_inputs(symbols))
    for start in range(0, len(inputs), segment):
        ids = torch.cat([torch.tensor([tok.start_token]), inputs[start:start + segment]])[:-1]
        with torch_threads(s.threads), torch.inference_mode():
            logits = engine.score(ids[None])
        yield logits[0].cpu(), symbols[start:start + len(ids)]


class FullRows:
    """One stream coding every symbol under its full alphabet row (format v1)."""

    def __init__(self, escape_bits: int):
        from lmcodec.coder import SegmentEncoder

        self.escape_bits, self.enc, self.ideal = escape_bits, SegmentEncoder(), 0.0

    def add(self, logits: torch.Tensor, symbols: np.ndarray) -> None:
        from lmcodec.frequencies import probability_table, surprisal_bits

        for c in range(0, len(symbols), 512):
            table = probability_table(logits[c:c + 512], self.escape_bits)
            sym = symbols[c:c + 512]
            for row, s in zip(table, sym.tolist()):
                self.enc.encode(s, row)
            self.ideal += float(surprisal_bits(table, sym).sum())


class TwoStage:
    """One stream coding every symbol in two stages with top-``k`` rows (format v2 uses 256)."""

    def __init__(self, escape_bits: int, k: int):
        from lmcodec.coder import SegmentEncoder

        self.escape_bits, self.k, self.enc, self.second = escape_bits, k, SegmentEncoder(), 0

    def add(self, logits: torch.Tensor, symbols: np.ndarray) -> None:
        from lmcodec.frequencies import StepTables

        for c in range(0, len(symbols), 512):
            tables = StepTables(logits[c:c + 512], self.escape_bits, top_k=self.k)
            for i, s in enumerate(symbols[c:c + 512].tolist()):
                self.second += tables.index(i, s) == tables.other
                self.enc.encode_token(tables, i, s)


def rows_ms(logits: torch.Tensor, escape_bits: int, k: int | None, rows: int = 64) -> float:
    """Milliseconds to build one step's coding rows for ``rows`` rows."""
    from lmcodec.frequencies import StepTables, probability_table

    x = logits[:rows]
    t0 = time.perf_counter()
    for _ in range(5):
        probability_table(x, escape_bits) if k is None else StepTables(x, escape_bits, top_k=k)
    return (time.perf_counter() - t0) / 5 * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.alphabet", description=__doc__.split("\n\n")[0])
    add_file_args(ap)
    ap.add_argument("--top-k", default="16,64,256,1024")
    ap.add_argument("--segment-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import lmcodec
    from lmcodec.codec import DEFAULT_ESCAPE_BITS

    path, data = read_file_arg(args)
    codec = lmcodec.Codec(args.model, device="cpu", **({"threads": args.threads} if args.threads else {}))
    _, tok = codec._load(args.model)
    symbols = tok.encode(data)
    esc = DEFAULT_ESCAPE_BITS
    ks = [int(x) for x in args.top_k.split(",")]
    full, stages = FullRows(esc), {k: TwoStage(esc, k) for k in ks}
    timing: dict = {}
    t0 = time.perf_counter()
    for logits, sym in model_windows(codec, symbols, args.segment_tokens):
        if not timing:
            timing = {"full": rows_ms(logits, esc, None), **{k: rows_ms(logits, esc, k) for k in ks}}
        full.add(logits, sym)
        for st in stages.values():
            st.add(logits, sym)
    print(f"{path.name}: {len(data)} bytes, {len(symbols)} tokens, scored and coded in "
          f"{time.perf_counter() - t0:.0f} s")
    full_bytes, ideal = len(full.enc.finish()), full.ideal
    res = {"file": str(path), "bytes": len(data), "tokens": int(len(symbols)),
           "segment_tokens": args.segment_tokens, "ideal_bits": ideal,
           "full": {"bytes": full_bytes, "rows_ms_64": timing["full"]}, "two_stage": {}}
    print(f"  ideal (model)       {ideal / 8:9.0f} bytes  {ideal / len(data):.4f} bits/byte")
    print(f"  full alphabet row   {full_bytes:9d} bytes  {8 * full_bytes / len(data):.4f} bits/byte  "
          f"rows for 64: {timing['full']:.1f} ms")
    for k, st in stages.items():
        n, share = len(st.enc.finish()), st.second / len(symbols)
        res["two_stage"][k] = {"bytes": n, "stage2_share": share, "rows_ms_64": timing[k]}
        print(f"  top-{k:<5d} + other   {n:9d} bytes  {8 * n / len(data):.4f} bits/byte  "
              f"({n / full_bytes - 1:+.3%} vs full row), stage 2 for {share:.2%} of tokens, "
              f"rows for 64: {timing[k]:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
