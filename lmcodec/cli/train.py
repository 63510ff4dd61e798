"""``lmcodec train SAMPLES... -o DICT``: fit a dictionary (zstd's ``--train ... -o``).

A module of its own, like ``probe_cli`` (helpers from :mod:`lmcodec.cli.common`);
it imports the float training code
(:mod:`lmcodec.dictionary.training`, torch autograd) only when the command runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import UsageError
from .common import Context, handle_errors

#: No primer by default: a primer costs its tokens once per segment at every
#: coding, the adapter's integers cost nothing at run time.
DEFAULT_PRIMER_BYTES = 0


def sample_files(paths: list[str]) -> list[Path]:
    """Files named, and the regular files of the directories named (sorted, not recursive)."""
    out: list[Path] = []
    for name in paths:
        p = Path(name)
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise UsageError(f"{name}: no such file or directory")
    if not out:
        raise UsageError("no sample files")
    return out


def _bar(ctx: Context, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="train", unit="step", file=sys.stderr, delay=1.0, leave=False,
                disable=ctx.quiet or not sys.stderr.isatty(), dynamic_ncols=True)


@click.command()
@click.argument("samples", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Dictionary file to write (e.g. NAME.lma).")
@click.option("-f", "--force", is_flag=True, help="Overwrite an existing dictionary.")
@click.option("--model", "-m", default=None, metavar="NAME|PATH", help="Base model [smollm2-135m].")
@click.option("--max-tokens", type=click.IntRange(16, 10_000_000), default=None,
              help="Train on at most this many tokens of the samples [40000].")
@click.option("--steps", type=click.IntRange(1, 1_000_000), default=None,
              help="Optimizer steps [one pass over the tokens, 1024 tokens a step].")
@click.option("--rank", type=click.IntRange(0, 256), default=0, show_default=True,
              help="LoRA rank on every projection (0: row scales, gains and q/k/v biases only).")
@click.option("--primer-bytes", type=click.IntRange(0, 1 << 20), default=DEFAULT_PRIMER_BYTES, show_default=True,
              help="Store up to this many bytes of the last samples as the dictionary's primer (prompt).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", type=click.Choice(["cpu", "cuda"]), show_default=True,
              help="Where training runs (the dictionary's integers are what decoding uses).")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads.")
@click.pass_obj
@handle_errors
def train_command(ctx: Context, samples, output, force, model, max_tokens, steps, rank, primer_bytes, seed,
                  device, threads):
    """Fit a dictionary (a model adapter) to SAMPLES (files or directories of files)."""
    import time

    import torch

    from ..dictionary.training import DEFAULT_MAX_TOKENS, train_adapter

    files = sample_files(list(samples))
    if output.exists() and not force:
        raise UsageError(f"{output} already exists; use -f to overwrite")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device available")
    if threads:
        torch.set_num_threads(threads)
    data = [f.read_bytes() for f in files]
    t0 = time.perf_counter()
    bar = None

    def progress(step: int, total: int, loss: float) -> None:
        nonlocal bar
        if bar is None:
            bar = _bar(ctx, total)
        bar.update(1)
        bar.set_postfix(bits_per_token=f"{loss:.3f}")

    try:
        ad = train_adapter(data, model=model, rank=rank, max_tokens=max_tokens or DEFAULT_MAX_TOKENS, steps=steps,
                           primer_bytes=primer_bytes, seed=seed, device=device, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    ad.save(output)
    info = ad.meta["info"]
    ctx.say(f"{output}: dictionary {ad.id[:16]}, {len(ad)} bytes, {len(files)} samples, {info['tokens']} tokens, "
            f"{info['steps']} steps, {time.perf_counter() - t0:.1f} s (bits/token {info['loss_first']:.3f} -> "
            f"{info['loss_last']:.3f})")
