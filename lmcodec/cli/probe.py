"""``lmcodec probe``: the memorization probe on the command line.

A module of its own (not in :mod:`lmcodec.probe.probe`, which is the library part);
it takes the shared CLI helpers from :mod:`lmcodec.cli.common`, and
:mod:`lmcodec.cli.main` registers it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import UsageError
from ..fileio import atomic_output
from ..probe.thresholds import (
    DEFAULT_MIN_CONTEXT,
    DEFAULT_TOP_K,
    DEFAULT_WINDOW,
    Thresholds,
)
from .common import Context, _prompt, handle_errors

if TYPE_CHECKING:
    from ..probe.probe import ProbeResult

TOKEN_WIDTH = 18


def _read_text(text: str | None, file: str | None) -> bytes:
    if text is not None and file is not None:
        raise UsageError("give TEXT or --file, not both")
    if text is None and file is None:
        raise UsageError("nothing to probe: give TEXT or --file FILE ('-' reads standard input)")
    if file is None:
        return text.encode("utf-8")
    if file == "-":
        return sys.stdin.buffer.read()
    path = Path(file)
    if path.is_dir():
        raise UsageError(f"{file} is a directory")
    return path.read_bytes()


def _show(text: str, width: int = TOKEN_WIDTH) -> str:
    """A token as a quoted, escaped literal (leading spaces and newlines visible)."""
    s = json.dumps(text, ensure_ascii=False)
    return s if len(s) <= width else s[:width - 2] + "…\""


def _prob(p: float) -> str:
    return f"{p:.4f}" if p >= 0.001 else f"{p:.2e}"


def format_table(result: ProbeResult) -> list[str]:
    """The default text report: one row per token, then the summary lines."""
    fmt = "{:>6}  {:<%d} {:>9} {:>6} {:>6}  {}" % TOKEN_WIDTH
    lines = [fmt.format("#", "token", "p", "bits", "rank", "top alternatives")]
    for i, t in enumerate(result.tokens):
        alts = ", ".join(f"{_show(a.text, 12)} {a.probability:.3f}" for a in t.alternatives)
        lines.append(fmt.format(i, _show(t.text), _prob(t.probability), f"{t.surprisal_bits:.2f}",
                                t.rank, alts))
    lines.append("")
    return lines + format_summary(result)


def format_summary(result: ProbeResult) -> list[str]:
    th = result.thresholds
    lines = [
        f"model: {result.model}   bytes: {len(result.data)}   tokens: {len(result.tokens)}   "
        f"words: {len(result.words)}   bits: {result.bits:.1f}",
        f"bpb: {result.bpb:.3f}   zlib_bpb: {result.zlib_bpb:.3f}   zlib_ratio: {result.zlib_ratio:.3f}",
    ]
    if result.bits_without_prompt is not None:
        saved = result.prompt_saves_bits
        share = 100 * saved / result.bits_without_prompt if result.bits_without_prompt else 0.0
        lines.append(f"prompt: {result.prompt_bytes} bytes   bits with prompt: {result.bits:.1f}   "
                     f"without: {result.bits_without_prompt:.1f}   prompt saves: {saved:.1f} bits "
                     f"({share:.1f}%)")
    lines.append(f"flagged spans (>= {th.min_tokens} tokens each p >= {th.min_probability:g}, "
                 f">= {th.min_words} words): {len(result.flagged_spans)}")
    for s in result.flagged_spans:
        lines.append(f"  tokens {s.start_token}-{s.end_token - 1} (mean p {s.mean_probability:.3f}): "
                     f"{json.dumps(s.text, ensure_ascii=False)}")
    return lines


@click.command("probe")
@click.argument("text", required=False)
@click.option("--file", "file", default=None, metavar="FILE",
              help="Probe the bytes of FILE ('-' reads standard input) instead of TEXT.")
@click.option("--prompt", "-p", default=None, help="Condition the model on this text first; "
              "also reports the bits the prompt saves.")
@click.option("--prompt-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Read the prompt from a file.")
@click.option("--model", "-m", default=None, metavar="NAME|PATH",
              help="Registered model name, .gguf file or HF model directory.")
@click.option("--dict", "-D", "dictionary", default=None, metavar="DICT",
              type=click.Path(dir_okay=False, path_type=Path),
              help="Score under the model adapted by this dictionary (`lmcodec train`); its primer is the prompt.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON document (schema in docs/PROBE.md).")
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a self-contained HTML heatmap to this file.")
@click.option("--png", "png_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG heatmap to this file (needs matplotlib).")
@click.option("--summary", "summary_only", is_flag=True,
              help="Text output: summary lines only, no token table.")
@click.option("--top-k", type=click.IntRange(0, 100), default=DEFAULT_TOP_K, show_default=True,
              help="Alternatives reported per token.")
@click.option("--min-probability", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Flagged spans: every token predicted with at least this probability...")
@click.option("--min-tokens", type=click.IntRange(1), default=8, show_default=True,
              help="...over at least this many consecutive tokens...")
@click.option("--min-words", type=click.IntRange(0), default=4, show_default=True,
              help="...touching at least this many words.")
@click.option("--window", type=click.IntRange(32, 1 << 16), default=DEFAULT_WINDOW, show_default=True,
              help="Tokens per scoring window (prompt included).")
@click.option("--min-context", type=click.IntRange(0), default=DEFAULT_MIN_CONTEXT, show_default=True,
              help="Context tokens every scored token keeps in later windows (capped at half a window).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=None,
              help="Windows per forward pass [auto: ~1 GiB of logits on CPU].")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.pass_obj
@handle_errors
def probe_command(ctx: Context, text, file, prompt, prompt_file, model, as_json, html_out, png_out,
                  summary_only, top_k, min_probability, min_tokens, min_words, window, min_context,
                  batch_size, device, dictionary=None):
    """Memorization probe: per-token probabilities, bits/byte vs zlib, likely memorized spans.

    Scores TEXT (or --file FILE) under the model: each token's probability and
    surprisal with the model's top alternatives, bits per byte against zlib -9
    (zlib_ratio = bpb / zlib_bpb; low = the model knows this text better than
    its statistics explain), and runs of confidently predicted tokens.
    """
    from ..dictionary.adapter import Adapter  # the model's code: only when a probe runs
    from ..probe.probe import probe

    data = _read_text(text, file)
    key = _prompt(prompt, prompt_file)
    from tqdm import tqdm

    bar = tqdm(total=None, desc="probe", unit="tok", file=sys.stderr, delay=1.0, leave=False,
               disable=ctx.quiet or not sys.stderr.isatty(), dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        result = probe(data, prompt=key, model=model, top_k=top_k, window=window, min_context=min_context,
                       thresholds=Thresholds(min_probability, min_tokens, min_words), batch_size=batch_size,
                       device=device, progress=progress,
                       dictionary=None if dictionary is None else Adapter.load(dictionary))
    finally:
        bar.close()
    if html_out is not None:
        from ..probe.render import render_html

        page = render_html(result, title=f"lmcodec probe: {file or 'text'}").encode("utf-8")
        with atomic_output(html_out, force=True) as f:
            f.write(page)
        ctx.say(f"wrote {html_out}")
    if png_out is not None:
        from ..probe.render import render_png

        with atomic_output(png_out, force=True) as f:
            render_png(result, f, title=f"lmcodec probe: {file or 'text'}")
        ctx.say(f"wrote {png_out}")
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1, ensure_ascii=False))
    else:
        click.echo("\n".join(format_summary(result) if summary_only else format_table(result)))
