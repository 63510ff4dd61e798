"""The real Gemma 3 270M, where ``lmcodec[gemma]`` is installed: its pinned fingerprint, its golden
digest at 1 and 2 threads, and a round trip through the CLI.

CI does not install the extra (253 MB, and the suite's time): these tests skip there and run
wherever the package is, as on the machine that produced the benchmark figures (docs/LEVELS.md).
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lmcodec.cli.main import main
from lmcodec.coding import selftest
from lmcodec.coding.modelcache import ModelCache
from lmcodec.engine.engine import Engine, torch_threads
from lmcodec.engine.model import registry as models
from lmcodec.format.container import MODEL_FINGERPRINTS, MODEL_IDS

NAME = "gemma3-270m"
#: UTF-8, an invalid byte and a NUL: byte fallback codes each.
TEXT = "Grüße, 東京 — the weights decide; the archive names them.\n".encode() + b"\xff\x00 end\n"

pytestmark = pytest.mark.skipif(not models.parts_present(models.REGISTRY[NAME].package),
                                reason="the Gemma package (lmcodec[gemma]) is not installed")


@pytest.fixture(scope="module")
def gemma_model():
    """Gemma's integer model and tokenizer, loaded as the CLI loads them."""
    int_model, tok, _ = ModelCache(NAME).coding_model()
    return int_model, tok


def test_the_registered_id_pins_the_installed_weights(gemma_model):
    int_model, _ = gemma_model
    assert MODEL_IDS[2] == NAME and int_model.fingerprint == MODEL_FINGERPRINTS[2]


@pytest.mark.parametrize("threads", [1, 2])
def test_golden_digest(gemma_model, threads):
    int_model, tok = gemma_model
    with torch_threads(threads):
        res = selftest.run(Engine(int_model, "cpu"), tok)
    assert res.steps_agree and res.golden is not None and res.digest == res.golden


def test_a_round_trip_through_the_cli_names_it_by_id(tmp_path):
    src = tmp_path / "a.txt"
    src.write_bytes(TEXT)
    r = CliRunner().invoke(main, ["compress", "--model", NAME, "-k", str(src)])
    assert r.exit_code == 0, r.output
    blob = (tmp_path / "a.txt.lmc").read_bytes()
    assert blob[3] & 4 and blob[5] == 2      # magic (2), version, flags (model by id), level, the id
    (tmp_path / "a.txt").unlink()
    r = CliRunner().invoke(main, ["decompress", str(tmp_path / "a.txt.lmc")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a.txt").read_bytes() == TEXT
