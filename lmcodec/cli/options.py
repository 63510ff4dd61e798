"""The options the subcommands share (model, coding, machine, cluster) and the executor ``--cluster`` makes."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from ..coding.mixerconfig import MixerConfig
from ..coding.settings import DEFAULT_LEVEL


def model_options(fn):
    fn = click.option("--dict", "-D", "dictionary", default=None, metavar="DICT",
                      type=click.Path(dir_okay=False, path_type=Path),
                      help="Dictionary file from `lmcodec train`; needed again to decompress.")(fn)
    fn = click.option("--model", "-m", default=None, metavar="NAME|PATH",
                      help="Registered model name, .gguf file or HF model directory.")(fn)
    fn = click.option("--prompt-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                      help="Read the prompt (decoding key) from a file.")(fn)
    fn = click.option("--prompt", "-p", default=None,
                      help="Text that conditions the model; needed again to decompress. Not encryption.")(fn)
    return fn


def machine_options(fn):
    """Where and how fast the model runs: never recorded, results are identical everywhere."""
    fn = click.option("--threads", type=click.IntRange(1, 256), default=None,
                      help="CPU threads (not recorded: results do not depend on them).")(fn)
    fn = click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True,
                      help="Where the model runs (not recorded: results are identical everywhere).")(fn)
    return fn


def coding_options(fn):
    fn = machine_options(fn)
    opts = [
        click.option("--level", "-l", "level", type=click.IntRange(1, 9), default=None,
                     help=f"Compression level, also as -1 ... -9 [{DEFAULT_LEVEL}]: segment length, context "
                          "and online models (docs/LEVELS.md)."),
        click.option("--segment-tokens", type=click.IntRange(1, 1 << 30), default=None,
                     help="Tokens per independent segment (overrides the level)."),
        click.option("--context", type=click.IntRange(16, 8192), default=None,
                     help="Model context window in tokens, sliding past it (overrides the level)."),
        click.option("--mixer", type=MixerChoice(), default=None, metavar="MODELS",
                     help="Online models mixed with the LM (overrides the level): none, all, or a comma "
                          "list of bias, match, order0 ... order4."),
        click.option("--lanes", type=click.IntRange(1, 4096), default=None,
                     help="Segments per coded stream (decoded side by side) [64]."),
        click.option("--block-size", type=click.IntRange(4096, 64 << 20), default=None,
                     help="Bytes per independently checked block [4 MiB]."),
        click.option("--method", type=click.Choice(["auto", "lm", "zstd", "raw"]), default="auto",
                     show_default=True, help="auto picks the smallest of LM, zstd -19 and raw per block."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    for n in range(9, 0, -1):  # gzip/zstd habit: -1 (fastest) ... -9 (smallest)
        fn = click.option(f"-{n}", "level", flag_value=n, hidden=True)(fn)
    return fn


class MixerChoice(click.ParamType):
    """``none``, ``all`` or a comma list of online models -> a MixerConfig mask."""

    name = "models"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return MixerConfig.parse(value).mask
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def cluster_option(fn):
    return click.option("--cluster", default=None, envvar="LMCODEC_CLUSTER", metavar="ADDRESS",
                        help="Code the blocks on a Ray cluster: local[:N] starts N workers on this machine, "
                             "anything else is a Ray address (lmcodec[cluster], docs/SCALE.md) "
                             "[$LMCODEC_CLUSTER].")(fn)


@contextlib.contextmanager
def _executor(cluster: str | None, model, device: str, threads: int | None):
    """A Ray executor for ``--cluster`` (one for all the command's files), else None (this process)."""
    if not cluster:
        yield None
        return
    from ..cluster.executor import RayExecutor  # imports Ray: only when asked for

    executor = RayExecutor(cluster, threads=threads, device=device, model=model)
    try:
        yield executor
    finally:
        executor.close()
