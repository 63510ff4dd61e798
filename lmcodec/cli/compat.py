"""``lmcodec [FILE...]``: the command line that gzip, xz and zstd share, for programs.

Programs that take "a compressor" (``tar -I``, git filters, ``rsync``/``ssh``
pipelines, backup tools) run it as a filter, ``CMD`` to compress stdin to
stdout and ``CMD -d`` to decompress, and expect that convention's flags and
exit codes.  :func:`dispatch` runs this form whenever the first argument
(after ``-q``/``--debug``) names no subcommand, so ``lmcodec compress ...`` and
the other subcommands work as before; ``unlmc`` and ``lmcat`` are this form
with ``-d`` and ``-dc`` put in front, as ``unzstd``/``zstdcat`` are.

The flags are zstd's (docs/CLI.md lists each with its gzip/zstd equivalent):
input is kept unless ``--rm`` (zstd's default; gzip removes it), ``-o FILE``
names the output, ``-l`` lists and never sets the level, ``-#`` is the level.

Exit status, one meaning in both forms: 0 success; 1 an error (unreadable
input, a bad archive, an unwritable output); 2 a usage error, i.e. a command
line that asks for something not done (an unknown option, an unknown suffix, a
directory, data to a terminal): :attr:`UsageError.exit_code` and click's are 2.
gzip's "2 = warning" is not used: lmcodec never skips a file and exits 0. With
several files every file is tried; the status is 1 if any failed, else 2 if any
was refused, as gzip ranks its error over its warning.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import click

from .. import __version__
from ..coding.settings import DEFAULT_LEVEL, summary
from ..errors import UsageError
from ..fileio import Counter, install_signal_handlers
from ..format.container import End
from ..format.reader import Reader
from .common import (
    STDIO,
    SUFFIX,
    Context,
    _codec,
    _io_targets,
    _open_input,
    _progress_bar,
    _prompt,
    _strip_suffix,
    _write_to,
    handle_errors,
)
from .options import model_options

#: The group's own options, allowed before a subcommand name (``lmcodec -q test X``).
GROUP_FLAGS = ("-q", "--quiet", "--debug")
GROUP_ONLY = ("-h", "--help", "-V", "--version")
#: Exit statuses of SIGINT and SIGTERM (128 + signal), from handle_errors: they end the run.
ABORT = (130, 143)


def names_a_command(group: click.Group, args: list[str]) -> bool:
    """True when ``args`` are for the subcommands: the first non-global argument is one (or help/version)."""
    for arg in args:
        if arg not in GROUP_FLAGS:
            return arg in group.commands or arg in GROUP_ONLY
    return False


def dispatch(group: click.Group, args, prog_name, **kwargs):
    """``lmcodec.cli.main:main``: the subcommands, or the gzip/zstd form when no command is named.

    A file named like a command goes through this form after ``--`` (``lmcodec -- test``).
    """
    args = sys.argv[1:] if args is None else list(args)
    if names_a_command(group, args):
        return click.Group.main(group, args, prog_name, **kwargs)
    return compat.main(args, prog_name, **kwargs)


def format_drop_in_help(ctx: click.Context, formatter: click.HelpFormatter) -> None:
    """Append this form's options to ``lmcodec --help``, so it shows both forms."""
    sub = click.Context(compat, info_name=ctx.info_name)
    with formatter.section(f"Or as gzip/zstd ({ctx.info_name} [OPTIONS] [FILE]...)"):
        formatter.write_text("With no COMMAND, FILE -> FILE.lmc; no FILE or '-' filters stdin to stdout "
                             "(tar -I lmcodec). unlmc = lmcodec -d, lmcat = lmcodec -dc. Exit status: 0 ok, "
                             "1 error, 2 usage error (docs/CLI.md).")
        own = [p for p in compat.get_params(sub) if isinstance(p, click.Option) and p.name not in ("help", "version")]
        formatter.write_dl([r for r in (p.get_help_record(sub) for p in own) if r])


def _mode(value: str, *decls: str, help: str):
    """A flag choosing the operation; the last one given wins (``lmcat -t`` tests)."""
    def remember(ctx: click.Context, param: click.Parameter, given: bool) -> None:
        if given:
            ctx.meta["lmcodec.mode"] = value
    return click.option(*decls, is_flag=True, expose_value=False, callback=remember, help=help)


def _levels(fn):
    """-1 (fastest) ... -9 (smallest); help shows -1 for all nine."""
    for n in range(9, 0, -1):
        fn = click.option(f"-{n}", "level", flag_value=n, hidden=n > 1,
                          help=f"-1 (fastest) ... -9 (smallest) [{DEFAULT_LEVEL}]; --fast = -1, --best = -9.")(fn)
    fn = click.option("--best", "level", flag_value=9, hidden=True)(fn)
    return click.option("--fast", "level", flag_value=1, hidden=True)(fn)


# One decorator per option; model_options carries -p/--prompt-file/-m/-D, shared with the subcommands.
@click.command("lmcodec", context_settings={"help_option_names": ["-h", "--help"]}, no_args_is_help=False)
@click.argument("files", nargs=-1, metavar="[FILE]...")
@_mode("compress", "-z", "--compress", help="Compress (the default): FILE -> FILE.lmc.")
@_mode("decompress", "-d", "--decompress", "--uncompress", help="Decompress: FILE.lmc -> FILE.")
@_mode("test", "-t", "--test", help="Decode and check archives; write nothing.")
@_mode("list", "-l", "--list", help="List archives' sizes, ratio and methods (without decoding).")
@click.option("-c", "--stdout", is_flag=True, help="Write to standard output; keep the input.")
@click.option("-o", "--output", default=None, metavar="FILE", help="Write to FILE (one input only).")
@click.option("-k", "--keep", "keep", flag_value=True, default=True, help="Keep the input (the default, as zstd).")
@click.option("--rm", "keep", flag_value=False, help="Remove the input after success (gzip's default).")
@click.option("-f", "--force", is_flag=True,
              help="Overwrite outputs; write or read compressed data on a terminal; recompress FILE.lmc.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("-v", "--verbose", is_flag=True, help="Say what was done with each file, and where the time went.")
@_levels
@click.option("-T", "--threads", type=click.IntRange(0, 256), default=0, metavar="N",
              help="CPU threads, 0 = automatic (not recorded: results do not depend on them).")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True,
              help="Where the model runs (not recorded).")
@click.option("--method", type=click.Choice(["auto", "lm", "zstd", "raw"]), default="auto", show_default=True,
              help="auto picks the smallest of LM, zstd -19 and raw per block.")
@model_options
@click.option("--debug", is_flag=True, hidden=True, help="Show Python tracebacks on errors.")
@click.version_option(__version__, "-V", "--version")
@click.pass_context
def compat(click_ctx: click.Context, files, stdout, output, keep, force, quiet, verbose, level, threads, device,
           method, prompt, prompt_file, model, dictionary, debug):
    """Compress or decompress FILEs in place, as gzip and zstd do (no FILE or '-': stdin to stdout)."""
    ctx = click_ctx.obj = Context(quiet, debug)
    install_signal_handlers()
    mode = click_ctx.meta.get("lmcodec.mode", "compress")
    sys.exit(_run(ctx, mode, list(files) or [STDIO], stdout=stdout, output=output, keep=keep, force=force,
                  verbose=verbose, coding=dict(level=level, threads=threads or None, device=device, method=method,
                              dictionary=dictionary),
                  prompt=prompt, prompt_file=prompt_file, model=model))


@handle_errors
def _run(ctx: Context, mode: str, names: list[str], *, stdout: bool, output: str | None, keep: bool,
         force: bool, verbose: bool, coding: dict, prompt, prompt_file, model) -> int:
    """Check the command line as a whole (a usage error stops everything), then each file."""
    key = _prompt(prompt, prompt_file)
    say = (lambda msg: click.echo(msg, err=True)) if verbose and not ctx.quiet else (lambda msg: None)
    if mode in ("decompress", "test", "list") and STDIO in names and not force and _is_terminal(sys.stdin):
        raise UsageError("refusing to read compressed data from a terminal; redirect, or use -f")
    if mode == "list":
        return _list(names)
    if mode == "test":
        machine = dict(threads=coding["threads"], device=coding["device"], dictionary=coding["dictionary"])
        return _each(names, lambda name: _test_one(ctx, name, key, model, machine, say))
    if output is not None and len(names) > 1:
        raise UsageError("-o/--output takes a single input")
    if mode == "compress":
        if stdout and output is None and len(names) > 1:
            raise UsageError("-c with several files would concatenate archives, which do not decode as one; "
                             "use tar -I lmcodec")
        return _each(names, lambda name: _compress_one(ctx, name, _target(name, output, stdout, force, True),
                                                       key, model, coding, keep, force, say))
    machine = dict(threads=coding["threads"], device=coding["device"], dictionary=coding["dictionary"])
    return _each(names, lambda name: _decompress_one(ctx, name, _target(name, output, stdout, force, False),
                                                     key, model, machine, keep, force, say))


def _target(name: str, output: str | None, stdout: bool, force: bool, compress: bool) -> Path | None:
    """Where ``name``'s result goes (None: stdout); an unusable name refuses this file only."""
    suffix_fn = (lambda p: _compressed_name(p, force)) if compress else _strip_suffix
    return next(_io_targets([name], output, stdout, suffix_fn))[1]


def _each(items: list, one: Callable) -> int:
    """Do ``one(item)`` for every item, as gzip does: an error is reported and the next item tried."""
    status = 0
    for item in items:
        try:
            handle_errors(_closed_pipe_ends_us(one))(item)
        except SystemExit as exc:  # handle_errors printed the one-line message
            code = exc.code if isinstance(exc.code, int) else 1
            if code in ABORT:
                raise
            status = _worse(status, code)
    return status


def _closed_pipe_ends_us(one: Callable) -> Callable:
    """A reader that stops early (``head``, ``tar -t``) closes our stdout: end by SIGPIPE, silently.

    gzip and zstd die of SIGPIPE there, and tar accepts that of its filter
    while it reports any other failure.  Python ignores SIGPIPE and raises
    BrokenPipeError instead; by the time it gets here every ``finally`` has
    run (inputs closed, temporary outputs removed), so the signal's default
    action is restored and sent.
    """
    def run(item):
        try:
            return one(item)
        except BrokenPipeError:
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGPIPE)
            raise  # not reached: the signal ends the process

    return run


def _worse(a: int, b: int) -> int:
    """The run's status: an error (1) outranks a refusal (2); internal errors (3) outrank both."""
    rank = {0: 0, 2: 1, 1: 2}
    return max(a, b, key=lambda c: rank.get(c, 3))


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _compressed_name(path: Path, force: bool) -> Path:
    if path.suffix == SUFFIX and not force:
        raise UsageError(f"{path} already has the {SUFFIX} suffix; left unchanged (-f compresses it again)")
    return path.with_name(path.name + SUFFIX)


def _close(src) -> None:
    if src is not sys.stdin.buffer:
        src.close()


def _compress_one(ctx: Context, name: str, target: Path | None, key, model, coding: dict, keep: bool,
                  force: bool, say) -> None:
    src, size = _open_input(name)
    bar = _progress_bar(ctx, size, f"compress {name}")
    codec = _codec(model, bar.update, **coding)
    stats = []
    try:
        _write_to(target, force, lambda dst: stats.append(codec.compress_stream(src, dst, key)))
    finally:
        bar.close()
        _close(src)
    st = stats[0]
    say(f"{name}: {st.input_bytes} -> {st.output_bytes} bytes, {st.bpb:.3f} bits/byte "
        f"({st.seconds:.1f} s) -> {target if target is not None else 'stdout'}")
    say(f"{name}: {summary(st.tokens, st.seconds, st.model_seconds, st.passes)}")
    _remove_input(name, target, keep)


def _decompress_one(ctx: Context, name: str, target: Path | None, key, model, machine: dict, keep: bool,
                    force: bool, say) -> None:
    src, size = _open_input(name)
    bar = _progress_bar(ctx, None, f"decompress {name}")
    codec = _codec(model, bar.update, **machine)
    written = []
    t0 = time.perf_counter()
    try:
        # Decompressed data may go to a terminal (lmcat FILE.lmc), so stdout needs no -f.
        _write_to(target, force or target is None,
                  lambda dst: written.append(codec.decompress_stream(src, dst, key, size)))
    finally:
        bar.close()
        _close(src)
    d = codec.last_decode
    say(f"{name}: {written[0]} bytes -> {target if target is not None else 'stdout'}")
    say(f"{name}: {summary(d.tokens, time.perf_counter() - t0, d.model_seconds, d.passes)}")
    _remove_input(name, target, keep)


def _remove_input(name: str, target: Path | None, keep: bool) -> None:
    """``--rm``: the input goes only after its output is complete, and never for stdout output."""
    if not keep and target is not None and name != STDIO:
        os.unlink(name)


def _test_one(ctx: Context, name: str, key, model, machine: dict, say) -> None:
    src, size = _open_input(name)
    bar = _progress_bar(ctx, None, f"test {name}")
    try:
        n = _codec(model, bar.update, **machine).decompress_stream(src, Counter(), key, size)
    finally:
        bar.close()
        _close(src)
    say(f"{name}: OK ({n} bytes)")


LIST_ROW = "{:>12} {:>14} {:>9} {:>6} {:>5}  {:<12} {}"


def _list(names: list[str]) -> int:
    """``-l``: one line per archive from its structure (nothing is decoded), and totals for several."""
    click.echo(LIST_ROW.format("compressed", "uncompressed", "bits/byte", "blocks", "level", "methods", "name"))
    totals = [0, 0]

    def one(name: str) -> None:
        src, size = _open_input(name)
        try:
            reader = Reader(src, size)
            header = reader.header()
            methods: list[str] = []
            while not isinstance(rec := reader.next(header), End):
                methods.append(rec.method.name.lower())
        finally:
            _close(src)
        packed, raw = reader.offset, rec.total_len
        totals[0] += packed
        totals[1] += raw
        click.echo(_row(packed, raw, rec.n_blocks, header.level or "-", "+".join(dict.fromkeys(methods)) or "-",
                        name))

    status = _each(names, one)
    if len(names) > 1:
        click.echo(_row(totals[0], totals[1], "", "", "", "(totals)"))
    return status


def _row(packed: int, raw: int, blocks, level, methods: str, name: str) -> str:
    bpb = f"{8 * packed / raw:.3f}" if raw else "-"
    return LIST_ROW.format(packed, raw, bpb, blocks, level, methods, name)


def unlmc() -> None:
    """``unlmc`` = ``lmcodec -d`` (as unzstd = zstd -d)."""
    compat.main(["-d", *sys.argv[1:]], "unlmc")


def lmcat() -> None:
    """``lmcat`` = ``lmcodec -dc`` (as zstdcat = zstd -dc)."""
    compat.main(["-dc", *sys.argv[1:]], "lmcat")
