"""Helpers every ``lmcodec`` command shares: the context, one-line errors, progress bars, prompts.

A module of its own so that commands living outside :mod:`lmcodec.cli` (``probe``
in :mod:`lmcodec.probe_cli`) import them without importing ``cli``, which in turn
registers those commands: no import circle.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from .errors import LMCodecError, UsageError
from .fileio import Terminated


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
