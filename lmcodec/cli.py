"""The ``lmcodec`` command line: gzip/zstd-style file handling around :class:`Codec`."""

from __future__ import annotations

import functools
import io
import json
import os
import stat
import sys
from pathlib import Path

import click

from . import __version__
from .codec import DEFAULT_LEVEL, Codec, Counter, Stats
from .container import End, Method, Reader
from .errors import LMCodecError, UsageError
from .fileio import Terminated, atomic_output, install_signal_handlers
from .mixing import MixerConfig
from .baselines import classical_sizes

SUFFIX = ".lmc"
STDIO = "-"


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


def model_options(fn):
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


def _prompt(prompt: str | None, prompt_file: Path | None) -> bytes | None:
    if prompt is not None and prompt_file is not None:
        raise UsageError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        return prompt_file.read_bytes()
    return prompt.encode("utf-8") if prompt is not None else None


def _codec(model, progress=None, **settings) -> Codec:
    settings = {k: v for k, v in settings.items() if v is not None}
    return Codec(model, progress=progress, **settings)


def _check_stdout(force: bool) -> None:
    if not force:
        raise UsageError("refusing to write compressed data to a terminal; use -o, redirect, or -f")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or messages.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
@click.pass_context
def main(click_ctx, quiet: bool, debug: bool):
    """Lossless compression with a language model as the probability model."""
    click_ctx.obj = Context(quiet, debug)
    install_signal_handlers()


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


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", default=None, help="Output file (single input).")
@click.option("-c", "--stdout", is_flag=True, help="Write to standard output.")
@click.option("-k/-K", "--keep/--rm", "keep", default=True, show_default=True,
              help="Keep (default) or remove the input after success.")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--verify", is_flag=True, help="Decompress the result and compare before keeping it.")
@model_options
@coding_options
@click.pass_obj
@handle_errors
def compress(ctx: Context, inputs, output, stdout, keep, force, verify, prompt, prompt_file, model, **coding):
    """Compress FILE(s) to FILE.lmc ('-' reads standard input)."""
    key = _prompt(prompt, prompt_file)
    for name, target in _io_targets(inputs, output, stdout, lambda p: p.with_name(p.name + SUFFIX)):
        src, size = _open_input(name)
        bar = _progress_bar(ctx, size, f"compress {name}")
        codec = _codec(model, bar.update, **coding)
        stats: list[Stats] = []

        def work(dst, src=src, codec=codec):
            if verify:
                data = src.read()
                blob = codec.compress(data, key)
                stats.append(codec.last_stats)
                if _codec(model, **coding).decompress(blob, key) != data:
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


def _strip_suffix(path: Path) -> Path:
    if path.suffix != SUFFIX:
        raise UsageError(f"{path}: unknown suffix (expected {SUFFIX}); use -o or -c")
    return path.with_suffix("")


@main.command()
@click.argument("archives", nargs=-1, required=True)
@click.option("-o", "--output", default=None, help="Output file (single input).")
@click.option("-c", "--stdout", is_flag=True, help="Write to standard output.")
@click.option("-k/-K", "--keep/--rm", "keep", default=True, show_default=True,
              help="Keep (default) or remove the archive after success.")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing output files.")
@model_options
@machine_options
@click.pass_obj
@handle_errors
def decompress(ctx: Context, archives, output, stdout, keep, force, prompt, prompt_file, model, device, threads):
    """Decompress ARCHIVE(s) (FILE.lmc -> FILE; '-' reads standard input)."""
    key = _prompt(prompt, prompt_file)
    for name, target in _io_targets(archives, output, stdout, _strip_suffix):
        src, size = _open_input(name)
        bar = _progress_bar(ctx, None, f"decompress {name}")
        codec = _codec(model, bar.update, device=device, threads=threads)
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


@main.command("test")
@click.argument("archives", nargs=-1, required=True)
@model_options
@machine_options
@click.pass_obj
@handle_errors
def test_cmd(ctx: Context, archives, prompt, prompt_file, model, device, threads):
    """Decode ARCHIVE(s) and check their checksums; write nothing."""
    key = _prompt(prompt, prompt_file)
    for name in archives:
        src, size = _open_input(name)
        bar = _progress_bar(ctx, None, f"test {name}")
        try:
            n = _codec(model, bar.update, device=device, threads=threads).decompress_stream(src, Counter(), key, size)
        finally:
            bar.close()
            src.close()
        ctx.say(f"{name}: OK ({n} bytes)")


@main.command()
@click.option("--model", "-m", default=None, metavar="NAME|PATH", help="Model [smollm2-135m].")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), default=None)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
@handle_errors
def selftest(ctx: Context, model, device, threads, as_json):
    """Check that this machine computes the engine's bits (exit 0 only if it does).

    Digests a built-in text's coding frequencies and compares the digest with
    the one recorded for the model; also checks that the decoder's step-by-step
    path equals the encoder's parallel pass.
    """
    from . import selftest as st
    from .engine import torch_threads

    codec = _codec(model, device=device, threads=threads)
    s = codec.settings.resolved()
    int_model, tok, name = codec.models.load(model)
    with torch_threads(s.threads):
        res = st.run(codec.models.engine(int_model, s.device), tok)
    doc = {"model": name, "fingerprint": res.fingerprint, "device": s.device, "threads": s.threads,
           "tokens": res.tokens, "digest": res.digest, "golden": res.golden,
           "step_equals_pass": res.steps_agree, "ok": res.ok}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        for k, v in doc.items():
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


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@model_options
@coding_options
@click.pass_obj
@handle_errors
def bpb(ctx: Context, inputs, as_json, prompt, prompt_file, model, **coding):
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


@main.command()
@click.argument("archive")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
@handle_errors
def info(ctx: Context, archive, as_json):
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
                           "stored_bytes": sum(len(p) for p in rec.payloads)})
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
                           f"{b['streams']} streams, {b['tokens']} tokens, {b['stored_bytes']} stored bytes")
        elif isinstance(v, float):
            click.echo(f"{k}: {v:.4f}")
        else:
            click.echo(f"{k}: {v}")


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


if __name__ == "__main__":  # pragma: no cover
    # Run as `python -m lmcodec.cli`: go through the package module so the probe
    # command's import of lmcodec.cli finds this module's objects, not a copy.
    from lmcodec.cli import main as _main

    _main()
else:
    from .probe_cli import probe_command

    main.add_command(probe_command, "probe")
    _accept_global_flags_after_subcommand(main)
