"""Gemma 3 270M as a registered model: its package, the assembled GGUF, the archive's id, the CLI.

Nothing here runs Gemma through the engine (it does not run Gemma 3 yet): the tests
cover finding, installing and naming the model.  Without the package, Python's own way
of hiding one (``sys.modules[name] = None``) makes it absent for the process.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys

import pytest
from click.testing import CliRunner

from lmcodec.cli.main import main
from lmcodec.engine.model import registry as models
from lmcodec.errors import CorruptArchiveError, ModelError
from lmcodec.format.container import (
    LEVELS,
    MODEL_FINGERPRINTS,
    MODEL_IDS,
    Block,
    Header,
    Method,
    pack_short,
    segment_layout,
)
from lmcodec.format.reader import Reader

NAME = "gemma3-270m"
PACKAGE = models.REGISTRY[NAME].package
INSTALL_HINT = "pip install 'lmcodec[gemma]'"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A cache with no assembled GGUF in it."""
    monkeypatch.setenv("LMCODEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def without_package(empty_cache, monkeypatch):
    """The Gemma package absent from this process, and nothing assembled."""
    monkeypatch.setitem(sys.modules, PACKAGE, None)
    return empty_cache


def _gemma_header(**kw) -> Header:
    lv = LEVELS[6]
    fields = dict(model_name=NAME, model_fingerprint=bytes.fromhex("0123456789abcdef"), tokenizer_fingerprint=b"",
                  prompt_check=bytes(4), has_prompt=False, context=lv.context, segment_tokens=lv.segment_tokens,
                  lanes=64, block_size=4 << 20, level=6, mixer=lv.mixer)
    fields.update(kw)
    return Header(**fields)


def _gemma_archive() -> bytes:
    """A v6 archive whose one LM block names Gemma by name and another fingerprint (other weights)."""
    raw = b"The weights decide; the archive only names them.\n"
    block = Block.build(Method.LM, raw, [bytes(16)], segment_layout(12, LEVELS[6].segment_tokens))
    return pack_short(_gemma_header(), block, raw)


def test_gemma_is_registered_with_its_terms_and_an_id():
    reg = models.REGISTRY[NAME]
    assert "Gemma Terms of Use" in reg.licence and reg.parameters == "270M"
    assert INSTALL_HINT in reg.install and len(reg.sha256) == 64
    assert MODEL_IDS[2] == NAME


def _short(head: bytes) -> bytes:
    """A short-form archive of ``head`` (method bits 0) with an empty raw block and its check."""
    check = hashlib.blake2b(head, digest_size=4, person=b"lmcodec-v5").digest()
    return head + b"\x00" + check


#: Gemma's pinned fingerprint, and a level-6 v6 header of it as docs/FORMAT.md lays it out: magic,
#: version, flags, level, then the model by id (flag 4) or by name and 8 bytes (flag 8).
PINNED = MODEL_FINGERPRINTS[2][:8]
BY_ID = b"\x89L" + bytes([6, 4, 6, 2])
BY_NAME = b"\x89L" + bytes([6, 8, 6, len(NAME)]) + NAME.encode() + PINNED


def test_gemmas_archives_name_it_by_its_id_and_pinned_fingerprint():
    """Gemma's fingerprint is pinned: a header of those weights stores id 2 alone, and reads back whole."""
    header = _gemma_header(model_fingerprint=PINNED)
    assert header.fields(Method.RAW) == BY_ID
    back = Reader(io.BytesIO(_short(BY_ID)), len(_short(BY_ID))).header()
    assert (back.model_name, back.model_fingerprint) == (NAME, PINNED)


def test_other_gemma_weights_are_named_with_their_own_fingerprint():
    """Another release of the package (other weights): the name and its own 8 bytes, as for any model."""
    header = _gemma_header()
    assert NAME.encode() + header.model_fingerprint in header.fields(Method.LM)
    back = Reader(io.BytesIO(_gemma_archive()), len(_gemma_archive())).header()
    assert (back.model_name, back.model_fingerprint) == (NAME, header.model_fingerprint)


def test_an_archive_written_before_the_pinning_still_reads():
    """The release that registered Gemma named it by name and 8 bytes of this fingerprint (no id had
    one yet). That second encoding of the same model stays readable; writing it again gives the id."""
    back = Reader(io.BytesIO(_short(BY_NAME)), len(_short(BY_NAME))).header()
    assert (back.model_name, back.model_fingerprint) == (NAME, PINNED)
    assert back.fields(Method.RAW) == BY_ID
    # SmolLM2's id was pinned from the start: its name with its pinned bytes is a header no encoder wrote.
    smol = b"\x89L" + bytes([6, 8, 6, 12]) + b"smollm2-135m" + MODEL_FINGERPRINTS[1][:8]
    with pytest.raises(CorruptArchiveError, match="invalid parameters"):
        Reader(io.BytesIO(_short(smol)), len(_short(smol))).header()


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_without_the_package_compress_says_what_to_install(without_package, tmp_path):
    assert not models.installed(NAME)
    src = tmp_path / "a.txt"
    src.write_bytes(b"hello\n")
    r = CliRunner().invoke(main, ["compress", "--model", NAME, "-o", str(tmp_path / "a.lmc"), str(src)])
    line = _one_line_error(r)
    assert NAME in line and INSTALL_HINT in line
    assert not (tmp_path / "a.lmc").exists()
    with pytest.raises(ModelError, match="not installed"):
        models.resolve(NAME)


def test_without_the_package_decoding_an_archive_that_names_it_says_what_to_install(without_package, tmp_path):
    path = tmp_path / "g.lmc"
    path.write_bytes(_gemma_archive())
    r = CliRunner().invoke(main, ["decompress", "-o", str(tmp_path / "g.txt"), str(path)])
    line = _one_line_error(r)
    assert NAME in line and INSTALL_HINT in line
    assert not (tmp_path / "g.txt").exists()


def test_models_lists_gemma_with_its_terms_installed_or_not(without_package):
    r = CliRunner().invoke(main, ["models", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert set(rows) == {"smollm2-135m", NAME}
    assert not rows[NAME]["installed"] and not rows[NAME]["default"]
    assert "Gemma Terms of Use" in rows[NAME]["licence"]
    text = CliRunner().invoke(main, ["models"]).output
    assert f"licence {rows[NAME]['licence']}; not installed ({rows[NAME]['install']})" in text


needs_package = pytest.mark.skipif(not models.parts_present(PACKAGE), reason=f"{PACKAGE} is not installed")


@needs_package
def test_the_gguf_is_assembled_once_into_the_cache_and_verified(empty_cache):
    assert models.installed(NAME)
    path = models.assembled(NAME)
    assert path.is_file() and path.is_relative_to(empty_cache)
    assert models.sha256_of(path) == models.REGISTRY[NAME].sha256
    assert [p.name for p in path.parent.iterdir()] == [path.name]       # no temporary file left
    stamp = path.stat().st_mtime_ns
    assert models.resolve(NAME) == (NAME, path.parent, path.name)
    assert path.stat().st_mtime_ns == stamp                              # not assembled again
    r = CliRunner().invoke(main, ["models", "--json"])
    assert {row["name"]: row for row in json.loads(r.output)}[NAME]["installed"]


@needs_package
def test_a_package_with_other_weights_is_refused_and_nothing_is_written(empty_cache, monkeypatch):
    other = models.REGISTRY[NAME]._replace(sha256="0" * 64)
    monkeypatch.setitem(models.REGISTRY, NAME, other)
    with pytest.raises(ModelError, match="other weights"):
        models.resolve(NAME)
    assert not any(empty_cache.rglob("*.gguf")) and not any(empty_cache.rglob(".tmp-*"))
