"""``lmcodec models``: the registered models, whether they are installed, and what they measured."""

from __future__ import annotations

import json

import click

from ..engine.model import registry as models
from .common import Context, handle_errors


def model_rows() -> list[dict]:
    """One row per registered model: its card, installed or not, and its committed measurements."""
    measured = models.measured()
    rows = []
    for name, reg in models.REGISTRY.items():
        m = measured.get(name, {})
        rows.append({"name": name, "default": name == models.DEFAULT_MODEL, "parameters": reg.parameters,
                     "licence": reg.licence, "weights": reg.weights, "installed": models.installed(name),
                     "install": reg.install, "measured": m or None})
    return rows


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
@handle_errors
def models_command(ctx: Context, as_json: bool):
    """List the registered models: parameters, licence, installed or not, bits/byte and speed measured."""
    rows = model_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        m = r["measured"]
        click.echo(f"{r['name']}{' (default)' if r['default'] else ''}: {r['weights']}, {r['parameters']} "
                   f"parameters, licence {r['licence']}; "
                   + ("installed" if r["installed"] else f"not installed ({r['install']})"))
        if m:
            click.echo(f"  {m['suite']} suite ({m['files']} files, {m['bytes']} bytes): {m['bits_per_byte']:.3f} "
                       f"bits/byte; {m['compress_tokens_per_s']:.0f} tokens/s compressing, "
                       f"{m['decompress_tokens_per_s']:.0f} decompressing")
            click.echo(f"  measured {m['date']}, commit {m['commit']}, {m['machine']}, {m['device']}; {m['settings']}")
        else:
            click.echo("  not measured yet")
