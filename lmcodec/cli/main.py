"""The ``lmcodec`` command line: gzip/zstd-style file handling around :class:`Codec`."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from .. import __version__
from ..coding.settings import Stats, summary
from ..errors import LMCodecError
from ..fileio import Counter, install_signal_handlers
from .common import (
    STDIO,
    SUFFIX,
    Context,
    _codec,
    _fail,
    _io_targets,
    _open_input,
    _progress_bar,
    _prompt,
    _strip_suffix,
    _write_to,
    handle_errors,
)
from .inspect import bpb_command, info_command
from .models import models_command
from .options import (
    _executor,
    cluster_option,
    coding_options,
    machine_options,
    model_options,
)
from .probe import probe_command
from .train import train_command

#: ``-v``: after each file, one line of where the time went (model, coding, tokens, passes).
VERBOSE = click.option("-v", "--verbose", is_flag=True,
                       help="End with one line: time in the model and in coding, tokens, passes, us/token.")


class _Main(click.Group):
    """The subcommands; arguments that name none run the gzip/zstd form (lmcodec.cli.compat)."""

    def main(self, args=None, prog_name=None, **kwargs):
        from .compat import dispatch
        return dispatch(self, args, prog_name, **kwargs)

    def format_help(self, ctx, formatter):
        from .compat import format_drop_in_help
        super().format_help(ctx, formatter)
        format_drop_in_help(ctx, formatter)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or messages.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
@click.pass_context
def main(click_ctx, quiet: bool, debug: bool):
    """Lossless compression with a language model as the probability model."""
    click_ctx.obj = Context(quiet, debug)
    install_signal_handlers()


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", default=None, help="Output file (single input).")
@click.option("-c", "--stdout", is_flag=True, help="Write to standard output.")
@click.option("-k/-K", "--keep/--rm", "keep", default=True, show_default=True,
              help="Keep (default) or remove the input after success.")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--verify", is_flag=True, help="Decompress the result and compare before keeping it.")
@VERBOSE
@model_options
@coding_options
@cluster_option
@click.pass_obj
@handle_errors
def compress(ctx: Context, inputs, output, stdout, keep, force, verify, verbose, prompt, prompt_file, model, cluster,
             **coding):
    """Compress FILE(s) to FILE.lmc ('-' reads standard input)."""
    key = _prompt(prompt, prompt_file)
    with _executor(cluster, model, coding["device"], coding["threads"]) as executor:
        _compress_files(ctx, inputs, output, stdout, keep, force, verify, key, model, executor, coding, verbose)


def _compress_files(ctx: Context, inputs, output, stdout, keep, force, verify, key, model, executor, coding,
                    verbose: bool = False):
    def one(name, target):
        src, size = _open_input(name)
        bar = _progress_bar(ctx, size, f"compress {name}")
        codec = _codec(model, bar.update, executor, **coding)
        stats: list[Stats] = []

        def work(dst, src=src, codec=codec):
            if verify:
                data = src.read()
                blob = codec.compress(data, key)
                stats.append(codec.last_stats)
                if _codec(model, None, executor, **coding).decompress(blob, key) != data:
                    raise LMCodecError("verification failed: the archive does not decompress to the input")
                dst.write(blob)
            else:
                stats.append(codec.compress_stream(src, dst, key))

        try:
            _write_to(target, force, work)
        finally:
            bar.close()
            if src is not sys.stdin.buffer:
                src.close()
        st = stats[0]
        if target is not None:
            ctx.say(f"{name}: {st.input_bytes} -> {st.output_bytes} bytes, {st.bpb:.3f} bits/byte "
                    f"({st.seconds:.1f} s) -> {target}")
            if not keep and name != STDIO:
                os.unlink(name)
        if verbose:
            ctx.say(f"{name}: {summary(st.tokens, st.seconds, st.model_seconds, st.passes)}")

    _for_each_file(executor, _io_targets(inputs, output, stdout, lambda p: p.with_name(p.name + SUFFIX)), one)


def _for_each_file(executor, targets, one) -> None:
    """``one(name, target)`` for every file: in turn, or on a cluster up to one file per worker at once.

    A file smaller than a block is one call, so in turn it would keep one
    worker busy and the others idle.  Files written to standard output stay
    in turn (their bytes must not interleave).  The first error is raised once
    the files being coded have ended; an interrupt closes the executor, so
    their calls fail at once and their outputs are removed.
    """
    width = executor.workers if executor is not None else 1
    if width < 2:
        for name, target in targets:
            one(name, target)
        return
    targets = list(targets)
    if len(targets) < 2 or any(target is None for _, target in targets):
        for name, target in targets:
            one(name, target)
        return
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    errors: list[BaseException] = []
    running: set = set()
    pool = ThreadPoolExecutor(width, thread_name_prefix="lmcodec-file")
    try:
        for name, target in targets:
            while len(running) >= width:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                errors += [f.exception() for f in done if f.exception() is not None]
            if errors:
                break
            running.add(pool.submit(one, name, target))
        done, _ = wait(running)
        errors += [f.exception() for f in done if f.exception() is not None]
    except BaseException:
        executor.close()
        raise
    finally:
        pool.shutdown(wait=True)
    if errors:
        raise errors[0]


@main.command()
@click.argument("archives", nargs=-1, required=True)
@click.option("-o", "--output", default=None, help="Output file (single input).")
@click.option("-c", "--stdout", is_flag=True, help="Write to standard output.")
@click.option("-k/-K", "--keep/--rm", "keep", default=True, show_default=True,
              help="Keep (default) or remove the archive after success.")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing output files.")
@VERBOSE
@model_options
@machine_options
@cluster_option
@click.pass_obj
@handle_errors
def decompress(ctx: Context, archives, output, stdout, keep, force, verbose, prompt, prompt_file, model, device,
               threads, cluster, dictionary=None):
    """Decompress ARCHIVE(s) (FILE.lmc -> FILE; '-' reads standard input)."""
    key = _prompt(prompt, prompt_file)
    with _executor(cluster, model, device, threads) as executor:
        _decompress_files(ctx, archives, output, stdout, keep, force, key, model, device, threads, executor,
                          dictionary, verbose)


def _decompress_files(ctx: Context, archives, output, stdout, keep, force, key, model, device, threads, executor,
                      dictionary=None, verbose: bool = False):
    def one(name, target):
        src, size = _open_input(name)
        bar = _progress_bar(ctx, None, f"decompress {name}")
        codec = _codec(model, bar.update, executor, device=device, threads=threads, dictionary=dictionary)
        t0 = time.perf_counter()
        try:
            _write_to(target, force, lambda dst: codec.decompress_stream(src, dst, key, size))
        finally:
            bar.close()
            if src is not sys.stdin.buffer:
                src.close()
        if target is not None:
            ctx.say(f"{name} -> {target}")
            if not keep and name != STDIO:
                os.unlink(name)
        if verbose:
            d = codec.last_decode
            ctx.say(f"{name}: {summary(d.tokens, time.perf_counter() - t0, d.model_seconds, d.passes)}")

    _for_each_file(executor, _io_targets(archives, output, stdout, _strip_suffix), one)


@main.command("test")
@click.argument("archives", nargs=-1, required=True)
@model_options
@machine_options
@cluster_option
@click.pass_obj
@handle_errors
def test_cmd(ctx: Context, archives, prompt, prompt_file, model, device, threads, cluster, dictionary=None):
    """Decode ARCHIVE(s) and check their checksums; write nothing."""
    key = _prompt(prompt, prompt_file)
    with _executor(cluster, model, device, threads) as executor:
        for name in archives:
            src, size = _open_input(name)
            bar = _progress_bar(ctx, None, f"test {name}")
            try:
                codec = _codec(model, bar.update, executor, device=device, threads=threads, dictionary=dictionary)
                n = codec.decompress_stream(src, Counter(), key, size)
            finally:
                bar.close()
                src.close()
            ctx.say(f"{name}: OK ({n} bytes)")


@main.command()
@click.option("--model", "-m", default=None, metavar="NAME|PATH", help="Model [smollm2-135m].")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), default=None)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@cluster_option
@click.pass_obj
@handle_errors
def selftest(ctx: Context, model, device, threads, as_json, cluster):
    """Check that this machine computes the engine's bits (exit 0 only if it does).

    Digests a built-in text's coding frequencies and compares the digest with
    the one recorded for the model; also checks that the decoder's step-by-step
    path equals the encoder's parallel pass.  With --cluster: on every worker.
    """
    from ..coding import selftest as st
    from ..engine.engine import torch_threads

    if cluster:
        with _executor(cluster, model, device, threads) as executor:
            reports = executor.check()   # raises, naming the worker, unless every one matches
        if as_json:
            click.echo(json.dumps({"workers": reports, "ok": True}, indent=2))
        else:
            for r in reports:
                click.echo(f"{r['host']}:{r['pid']} ({r['device']}): {r['model']} digest {r['digest']} OK")
        return

    codec = _codec(model, device=device, threads=threads)
    s = codec.settings.resolved()
    int_model, tok, name = codec.models.load(model)
    with torch_threads(s.threads):
        res = st.run(codec.models.engine(int_model, s.device), tok)
    doc = {"model": name, "fingerprint": res.fingerprint, "device": s.device, "threads": s.threads,
           "tokens": res.tokens, "digest": res.digest, "golden": res.golden,
           "step_equals_pass": res.steps_agree, "ok": res.ok}
    if s.device == "cpu":   # which exact paths ran: they change the speed, never the digest
        from ..engine.cpu import paths

        doc["cpu"] = paths.describe()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        for k, v in doc.items():
            if isinstance(v, dict):
                v = "; ".join(f"{a} {' '.join(b) if isinstance(b, list) else b}" for a, b in v.items())
            click.echo(f"{k}: {v}")
        if res.golden is None:
            click.echo("(no golden digest is recorded for this model: compare the digest across machines)")
    if not res.ok:
        _fail("this machine does not compute the exact engine's bits: its archives are not portable", 1)


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@model_options
@coding_options
@click.pass_obj
@handle_errors
def verify(ctx: Context, inputs, prompt, prompt_file, model, **coding):
    """Compress, decompress and compare FILE(s); exit 0 only if all are identical."""
    key = _prompt(prompt, prompt_file)
    bad = 0
    for name in inputs:
        src, size = _open_input(name)
        with src:
            data = src.read()
        bar = _progress_bar(ctx, 2 * len(data), f"verify {name}")
        codec = _codec(model, bar.update, **coding)
        try:
            blob = codec.compress(data, key)
            ok = codec.decompress(blob, key) == data
        finally:
            bar.close()
        bad += not ok
        click.echo(f"{name}: {'OK' if ok else 'MISMATCH'} ({len(data)} -> {len(blob)} bytes)")
    if bad:
        _fail(f"{bad} file(s) did not round-trip")


def _accept_global_flags_after_subcommand(group: click.Group) -> None:
    """``lmcodec compress -q FILE`` works like ``lmcodec -q compress FILE`` (gzip habits)."""
    def setter(attr):
        def callback(ctx, param, value):
            if value:
                setattr(ctx.find_object(Context), attr, True)
        return callback

    for cmd in group.commands.values():
        names = {o for p in cmd.params for o in getattr(p, "opts", [])}
        if "--quiet" not in names:
            cmd.params.append(click.Option(["-q", "--quiet"], is_flag=True, expose_value=False,
                                           callback=setter("quiet"), help="No progress bars or messages."))
        if "--debug" not in names:
            cmd.params.append(click.Option(["--debug"], is_flag=True, expose_value=False,
                                           callback=setter("debug"), help="Show Python tracebacks on errors."))


main.add_command(bpb_command, "bpb")
main.add_command(info_command, "info")
main.add_command(models_command, "models")
main.add_command(probe_command, "probe")
main.add_command(train_command, "train")
_accept_global_flags_after_subcommand(main)

if __name__ == "__main__":  # pragma: no cover
    main()
