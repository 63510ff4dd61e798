"""``lmcodec bpb`` and ``lmcodec info``: measuring a file, and reading an archive without decoding it."""

from __future__ import annotations

import json

import click

from ..coding.mixerconfig import MixerConfig
from ..format.container import End, Method
from ..format.reader import Reader
from .baselines import classical_sizes
from .common import Context, _codec, _open_input, _progress_bar, _prompt, handle_errors
from .options import coding_options, model_options


@click.command("bpb")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@model_options
@coding_options
@click.pass_obj
@handle_errors
def bpb_command(ctx: Context, inputs, as_json, prompt, prompt_file, model, **coding):
    """Bits per byte of FILE(s): the model's cross-entropy, lmcodec's archive, gzip/zstd/xz."""
    key = _prompt(prompt, prompt_file)
    rows = []
    for name in inputs:
        src, _ = _open_input(name)
        with src:
            data = src.read()
        bar = _progress_bar(ctx, len(data), f"bpb {name}")
        try:
            st = _codec(model, bar.update, **coding).analyze(data, key)
        finally:
            bar.close()
        row = {"file": name, "bytes": len(data), "model_bpb": st.model_bpb if st.lm_bytes else None,
               "lmcodec_bytes": st.output_bytes, "lmcodec_bpb": st.bpb, "coder_overhead": st.coder_overhead,
               "tokens": st.tokens, "seconds": st.seconds}
        for tool, n in classical_sizes(data).items():
            row[f"{tool}_bytes"] = n
            row[f"{tool}_bpb"] = 8 * n / len(data) if data else 0.0
        rows.append(row)
    total = {"file": "TOTAL", "bytes": sum(r["bytes"] for r in rows)}
    for tool in ("lmcodec", "gzip", "zstd", "xz"):
        total[f"{tool}_bytes"] = sum(r[f"{tool}_bytes"] for r in rows)
        total[f"{tool}_bpb"] = 8 * total[f"{tool}_bytes"] / total["bytes"] if total["bytes"] else 0.0
    if as_json:
        click.echo(json.dumps({"files": rows, "total": total}, indent=2))
        return
    fmt = "{:<28} {:>10} {:>8} {:>9} {:>8} {:>8} {:>8}"
    click.echo(fmt.format("file", "bytes", "model", "lmcodec", "gzip-9", "zstd-19", "xz-9"))
    for r in rows + [total]:
        model_bpb = r.get("model_bpb")
        click.echo(fmt.format(r["file"][-28:], r["bytes"], "-" if model_bpb is None else f"{model_bpb:.3f}",
                              f"{r['lmcodec_bpb']:.3f}", f"{r['gzip_bpb']:.3f}", f"{r['zstd_bpb']:.3f}",
                              f"{r['xz_bpb']:.3f}"))


@click.command("info")
@click.argument("archive")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
@handle_errors
def info_command(ctx: Context, archive, as_json):
    """Show an archive's header, blocks and sizes (without decoding it)."""
    src, size = _open_input(archive)
    with src:
        reader = Reader(src, size)
        header = reader.header()
        blocks = []
        while True:
            rec = reader.next(header)
            if isinstance(rec, End):
                break
            blocks.append({"method": rec.method.name.lower(), "bytes": rec.raw_len,
                           "segments": len(rec.tokens), "streams": len(rec.streams) if rec.method == Method.LM else 0,
                           "tokens": rec.n_tokens,
                           "stored_bytes": sum(len(p) for p in rec.payloads),
                           **({"payload_check": rec.payload_checked} if reader.short_form else {})})
        archive_bytes = reader.offset
    doc = {
        "format_version": header.version, "model": header.model_name or None,
        "model_fingerprint": header.model_fingerprint.hex() or None,
        **({"tokenizer_fingerprint": header.tokenizer_fingerprint.hex()} if header.tokenizer_fingerprint else {}),
        "dictionary": header.dict_id.hex() or None,
        **({"layout": "short" if reader.short_form else "general"} if header.version >= 5 else {}),
        "prompt": header.has_prompt, "level": header.level or "custom",
        "online_models": MixerConfig(header.mixer).describe(), "context": header.context,
        "segment_tokens": header.segment_tokens, "lanes": header.lanes,
        "block_size": header.block_size, "original_bytes": rec.total_len,
        "archive_bytes": archive_bytes,
        "framing_bytes": archive_bytes - sum(b["stored_bytes"] for b in blocks),
        "content_checksum": rec.check.hex(),
        "bits_per_byte": 8 * archive_bytes / rec.total_len if rec.total_len else None,
        "ratio": rec.total_len / archive_bytes, "blocks": blocks,
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    for k, v in doc.items():
        if k == "blocks":
            for i, b in enumerate(v):
                click.echo(f"block {i}: {b['method']}, {b['bytes']} bytes, {b['segments']} segments, "
                           f"{b['streams']} streams, {b['tokens']} tokens, {b['stored_bytes']} stored bytes"
                           + (", payload check" if b.get("payload_check") else ""))
        elif isinstance(v, float):
            click.echo(f"{k}: {v:.4f}")
        else:
            click.echo(f"{k}: {v}")
