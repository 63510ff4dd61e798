"""Throughput of lmcodec both ways, next to the same model's plain forward pass.

    python -m benchmarks.speed [--file PATH] [--device auto|cpu|cuda] [--lanes N] [--decode-rows N]
                               [--segment-tokens N] [--context N] [--threads N] [--level N] [--bytes N]
                               [--no-forward] [--float] [--json OUT]

Prints bytes/s and tokens/s for compression and decompression, the settings,
and the ratio of the codec's tokens/s to a plain full-sequence forward of the
same exact engine over the same tokens (windows of ``segment-tokens``, logits
and symbol weights of every position) measured in the same run: the yardstick
for what the coding around the model costs.  ``--no-forward`` leaves that
yardstick out (it costs as much as compressing again; scripts/gpu/check.sh
times only the two directions); ``--float`` adds the float32 model's forward
(transformers) over the same windows, and compression's share of it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .corpus import add_file_args, read_file_arg

#: Positions whose symbol weights the plain forward builds at once.
TABLE_CHUNK = 256


def plain_forward_tokens_per_s(codec, symbols, segment: int, batch: int) -> float:
    """Tokens/s of a causal forward over ``segment``-token windows, ``batch`` at a time,
    with the output head and the symbol weights of every position (the model's whole job)."""
    from lmcodec.coding.runner import score_ids
    from lmcodec.engine.engine import torch_threads

    model, tok, _ = codec.models.coding_model()
    s = codec.settings.resolved()
    engine = codec.models.engine(model, s.device)
    ids = torch.from_numpy(tok.model_inputs(symbols))
    n = (len(ids) // segment) * segment
    if n == 0:
        segment, n = len(ids), len(ids)
    windows = ids[:n].view(-1, segment)
    done, t0 = 0, time.perf_counter()
    with torch_threads(s.threads), torch.inference_mode():
        for start in range(0, len(windows), batch):
            w = windows[start:start + batch]
            h, e = score_ids(engine, w)
            for c in range(0, len(h), TABLE_CHUNK):
                engine.weights(h[c:c + TABLE_CHUNK], e[c:c + TABLE_CHUNK], tok.alphabet_size)
            done += w.numel()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def float_forward_tokens_per_s(model_arg, tok, symbols, segment: int, threads: int) -> float:
    """Tokens/s of the float32 model (transformers' Llama with the same weights) over the same
    ``segment``-token windows, one at a time, logits of every position: the issue's yardstick
    for the exact engine's parallel pass (compression)."""
    from lmcodec.engine.model import registry as models

    from .quantization import float_llama

    model = float_llama(models.load(model_arg)).eval()
    ids = torch.from_numpy(tok.model_inputs(symbols))
    n = max(segment, 1)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            model(ids[:min(n, 64)][None])                  # warm up
            t0 = time.perf_counter()
            for start in range(0, len(ids), n):
                model(ids[start:start + n][None])
            return len(ids) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)


def cpu_paths() -> dict:
    """The CPU's relevant flags and the exact paths the engine took on it (lmcodec.engine.cpu.platform)."""
    from lmcodec.engine.cpu import paths

    return paths.describe()


def describe_paths(paths: dict) -> str:
    """:func:`cpu_paths` on one line."""
    return (f"{paths['machine']} [{' '.join(paths['flags'])}]{', LMCODEC_CPU=generic' if paths['generic'] else ''}: "
            f"layer products {paths['layer_products']}, int8 GEMMs {paths['gemm']}, "
            f"fused step {paths['fused_products']}, numba target {paths['numba_target']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    add_file_args(ap)
    ap.add_argument("--device", default="auto")
    for opt in ("threads", "lanes", "decode-rows", "segment-tokens", "context", "level"):
        ap.add_argument(f"--{opt}", type=int, default=None)
    ap.add_argument("--mixer", default=None, help="online models: none, all or a comma list [the level's]")
    ap.add_argument("--forward-batch", type=int, default=None,
                    help="windows per plain forward call [cpu: 1, the fastest there; cuda: 16]")
    ap.add_argument("--no-forward", dest="forward", action="store_false",
                    help="skip the plain-forward yardstick (only the two directions are timed)")
    ap.add_argument("--float", dest="float_forward", action="store_true",
                    help="also time the float32 model's forward (transformers) over the same windows")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    import lmcodec
    from lmcodec.engine.engine import pick_device

    path, data = read_file_arg(args)
    ap_mixer = getattr(args, "mixer", None)
    settings = {k: getattr(args, k) for k in ("device", "threads", "lanes", "decode_rows",
                                              "segment_tokens", "context", "level") if getattr(args, k) is not None}
    if ap_mixer is not None:
        from lmcodec.coding.mixing import MixerConfig
        settings["mixer"] = MixerConfig.parse(ap_mixer).mask
    codec = lmcodec.Codec(args.model, **settings)
    s = codec.settings.resolved()
    _, tok, _ = codec.models.load(args.model)
    symbols = tok.encode(data)
    device = pick_device(args.device)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    blob = codec.compress(data)
    t1 = time.perf_counter()
    back = codec.decompress(blob)
    t2 = time.perf_counter()
    if back != data:
        print("speed: round trip FAILED", file=sys.stderr)
        return 1
    segments = -(-len(symbols) // s.segment_tokens)
    fwd_batch = args.forward_batch or (1 if device == "cpu" else min(16, segments))
    fwd = plain_forward_tokens_per_s(codec, symbols, s.segment_tokens, fwd_batch) if args.forward else None
    flt = (float_forward_tokens_per_s(args.model, tok, symbols, s.segment_tokens, s.threads)
           if args.float_forward else None)
    st = codec.last_stats
    res = {
        "file": str(path), "bytes": len(data), "tokens": int(len(symbols)), "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__, "threads": s.threads, "lanes": s.lanes, "decode_rows": s.decode_rows,
        "segment_tokens": s.segment_tokens, "context": s.context, "segments": segments,
        "level": s.level, "mixer": s.mixer,
        "archive_bytes": len(blob), "bpb": 8 * len(blob) / len(data), "model_bpb": st.model_bpb,
        "compress_Bps": len(data) / (t1 - t0), "decompress_Bps": len(data) / (t2 - t1),
        "compress_tokps": len(symbols) / (t1 - t0), "decompress_tokps": len(symbols) / (t2 - t1),
        "forward_tokps": fwd, "forward_batch": fwd_batch, "float_forward_tokps": flt,
        "decode": codec.last_decode.as_dict(),
        "cpu": cpu_paths() if device == "cpu" else None,
    }
    res["compress_vs_float"] = res["compress_tokps"] / flt if flt else None
    res["compress_vs_forward"] = res["compress_tokps"] / fwd if fwd else None
    res["decompress_vs_forward"] = res["decompress_tokps"] / fwd if fwd else None
    print(f"{path.name}: {len(data)} bytes, {len(symbols)} tokens, {segments} segments of "
          f"{s.segment_tokens}, context {s.context}, level {s.level or 'custom'}, mixer {s.mixer:#x}, "
          f"lanes {s.lanes}, decode rows {s.decode_rows}, "
          f"{s.threads} threads, {device}")
    if res["cpu"]:
        print("  cpu        " + describe_paths(res["cpu"]))
    print(f"  ratio      {res['bpb']:.3f} bits/byte (model {res['model_bpb']:.3f})")
    for way in ("compress", "decompress"):
        share = f"  ({res[way + '_vs_forward']:.0%} of plain forward)" if fwd else ""
        print(f"  {way:<10} {res[way + '_Bps']:8.0f} B/s  {res[way + '_tokps']:8.1f} tok/s{share}")
    if fwd:
        print(f"  plain forward {fwd:8.1f} tok/s  ({fwd_batch} window(s) of {s.segment_tokens} per call)")
    if flt:
        print(f"  float32 forward {flt:8.1f} tok/s  (transformers; compression {res['compress_vs_float']:.2f}x of it)")
    print(f"  decoding   {res['decode']['tokens_per_row_pass']:.3f} tokens a row's model pass")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
