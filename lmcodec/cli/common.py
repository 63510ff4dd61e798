"""Helpers every ``lmcodec`` command shares: the context, one-line errors, progress bars, prompts,
and the input and output files of both command-line forms.

A module of its own so that the subcommands (:mod:`lmcodec.cli.main`), the drop-in form
(:mod:`lmcodec.cli.compat`) and the commands in modules of their own (``bpb`` and ``info``,
``probe``, ``train``) import them without importing each other: no import circle.
"""

from __future__ import annotations

import functools
import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import LMCodecError, UsageError
from ..fileio import Terminated, atomic_output

if TYPE_CHECKING:
    from ..codec import Codec


class Context:
    def __init__(self, quiet: bool, debug: bool):
        self.quiet = quiet
        self.debug = debug

    def say(self, msg: str) -> None:
        if not self.quiet:
            click.echo(msg, err=True)


def _progress_bar(ctx: Context, total: int | None, desc: str):
    """A tqdm bar on stderr, shown only on a terminal and only after one second."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, delay=1.0,
                leave=False, disable=ctx.quiet or not sys.stderr.isatty(), dynamic_ncols=True)


def _fail(msg: str, code: int = 1):
    click.echo(f"lmcodec: error: {msg}", err=True)
    sys.exit(code)


def handle_errors(fn):
    """One-line errors and conventional exit codes; tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context().find_object(Context)
        try:
            return fn(*args, **kwargs)
        except LMCodecError as exc:
            if ctx and ctx.debug:
                raise
            _fail(str(exc), exc.exit_code)
        except FileExistsError as exc:
            _fail(str(exc.args[0] if exc.args else exc))
        except OSError as exc:
            if ctx and ctx.debug:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}{exc.strerror or exc}")
        except KeyboardInterrupt:
            click.echo("lmcodec: interrupted", err=True)
            sys.exit(130)
        except Terminated:
            click.echo("lmcodec: terminated", err=True)
            sys.exit(143)
        except Exception as exc:  # a bug, not a user error
            if ctx and ctx.debug:
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)", 3)

    return wrapper


def _prompt(prompt: str | None, prompt_file: Path | None) -> bytes | None:
    if prompt is not None and prompt_file is not None:
        raise UsageError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        return prompt_file.read_bytes()
    return prompt.encode("utf-8") if prompt is not None else None


# -- files, standard streams and the model options: the subcommands' and the drop-in form's --

SUFFIX = ".lmc"
STDIO = "-"


def _codec(model, progress=None, executor=None, **settings) -> Codec:
    """A :class:`Codec` of the command's settings; the model's code is imported here, where a command codes."""
    from ..codec import Codec

    settings = {k: v for k, v in settings.items() if v is not None}
    return Codec(model, progress=progress, executor=executor, **settings)


def _check_stdout(force: bool) -> None:
    if not force:
        raise UsageError("refusing to write compressed data to a terminal; use -o, redirect, or -f")


def _io_targets(inputs, output, stdout, suffix_fn):
    if output is not None and len(inputs) > 1:
        raise UsageError("-o/--output takes a single input")
    for name in inputs:
        if stdout or (name == STDIO and output is None):
            yield name, None
        elif output is not None:
            yield name, Path(output)
        else:
            yield name, suffix_fn(Path(name))


def _open_input(name: str):
    if name == STDIO:
        return sys.stdin.buffer, None
    path = Path(name)
    if path.is_dir():
        raise UsageError(f"{name} is a directory")
    f = open(path, "rb")
    st = os.fstat(f.fileno())
    # Only a regular file's size is known: a FIFO (<(cat x.lmc)) reports 0.
    return f, st.st_size if stat.S_ISREG(st.st_mode) else None


def _write_to(target: Path | None, force: bool, work):
    """Run ``work(stream)`` into stdout or atomically into ``target``."""
    if target is None:
        if output_is_terminal():
            _check_stdout(force)
        work(sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    with atomic_output(target, force) as f:
        work(f)


def output_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _strip_suffix(path: Path) -> Path:
    if path.suffix != SUFFIX:
        raise UsageError(f"{path}: unknown suffix (expected {SUFFIX}); use -o or -c")
    return path.with_suffix("")
