"""Archives of earlier format versions keep decoding.

``tests/data/v3_*.lmc`` were written by lmcodec at commit 68af561 (format v3, the
last commit that wrote it) and are never regenerated: they are what users hold.
The v4 header is the only change of v4, so the same input under the same
settings gives the same blocks and end record in both versions, and v4 saves
the header bytes docs/FORMAT.md counts.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner

import lmcodec
from lmcodec.cli import main
from lmcodec.container import Reader
from lmcodec.errors import ModelMismatchError

DATA = Path(__file__).parent / "data"
TEXT = (b"lmcodec format v3 fixture.\r\nThe quick brown fox jumps over the lazy dog.\n\x00\xff invalid utf-8 "
        b"\xc3\x28 and a tab\tend.\n")
PROMPT = b"a v3 prompt"
#: (file, original, prompt, the settings that wrote it)
V3 = {
    "v3_level6.lmc": (TEXT, None, {}),
    "v3_custom_prompt.lmc": (TEXT * 40, PROMPT, dict(segment_tokens=16, context=32, lanes=2, mixer=64 | 1,
                                                     block_size=4096)),
    "v3_stored.lmc": (TEXT, None, dict(method="zstd")),
}
#: ``tests/data/v4_*.lmc``: written by lmcodec at commit d3dd190 (format v4, the last commit
#: that wrote it) with ``Codec(**settings).compress(original, prompt)``; never regenerated.
V4 = {
    "v4_level6.lmc": (TEXT, None, {}),
    "v4_level6_prompt.lmc": (TEXT, PROMPT, {}),
    "v4_custom_prompt.lmc": (TEXT * 40, PROMPT, dict(segment_tokens=16, context=32, lanes=2, mixer=64 | 1,
                                                     block_size=4096)),
    "v4_stored.lmc": (TEXT, None, dict(method="zstd")),
    "v4_raw_blocks.lmc": (bytes(range(256)) * 40, None, dict(method="raw", block_size=4096)),
    "v4_empty.lmc": (b"", None, {}),
}


def _header(blob: bytes):
    reader = Reader(io.BytesIO(blob), len(blob))
    return reader.header(), reader.offset


def test_fixtures_are_the_committed_v3_archives():
    assert hashlib.sha256(TEXT).hexdigest() == "9fdfb132f276010d7b35434d5d749d5b90d9e975642eecf9e8d9ce39dbbc155c"
    for name in V3:
        assert (DATA / name).read_bytes()[4] == 3, name
    for name in V4:
        assert (DATA / name).read_bytes()[4] == 4, name
    sizes = {name: len((DATA / name).read_bytes()) for name in V4}
    assert sizes == {"v4_level6.lmc": 92, "v4_level6_prompt.lmc": 100, "v4_custom_prompt.lmc": 331,
                     "v4_stored.lmc": 150, "v4_raw_blocks.lmc": 10329, "v4_empty.lmc": 27}


@pytest.mark.parametrize("name", sorted(V4))
def test_v4_archives_decode(name):
    original, prompt, settings = V4[name]
    assert lmcodec.decompress((DATA / name).read_bytes(), prompt=prompt) == original


@pytest.mark.parametrize("name", sorted(V3))
def test_v3_archives_decode_and_v4_differs_only_in_the_header(name):
    original, prompt, settings = V3[name]
    old = (DATA / name).read_bytes()
    assert lmcodec.decompress(old, prompt=prompt) == original
    codec = lmcodec.Codec(**settings)
    new = codec.compress(original, prompt)
    assert new[4] == 4
    (h3, n3), (h4, n4) = _header(old), _header(new)
    assert (h3.version, h4.version) == (3, 4)
    assert old[n3:] == new[n4:]  # blocks and end record: byte for byte
    for field in ("model_name", "prompt_check", "has_prompt", "context", "segment_tokens", "lanes", "block_size",
                  "level", "mixer"):
        assert getattr(h3, field) == getattr(h4, field), field
    assert h4.model_fingerprint == h3.model_fingerprint[:len(h4.model_fingerprint)]
    # v4 leaves out: a level's mixer and settings (1 + 2 + 2 + 1 + 4 bytes at level 6), the
    # registered name (13 bytes -> a 1-byte id), half the model fingerprint and the tokenizer's.
    saved = {"v3_level6.lmc": 10 + 12 + 8 + 8, "v3_custom_prompt.lmc": 12 + 8 + 8, "v3_stored.lmc": 10}
    assert (n3, n4) == ({"v3_level6.lmc": 58, "v3_custom_prompt.lmc": 62, "v3_stored.lmc": 21}[name],
                        n3 - saved[name])
    assert codec.decompress(new, prompt) == original


def test_v3_wrong_tokenizer_is_named():
    """v3 stored 8 bytes of the tokenizer fingerprint: a mismatch there still says so."""
    buf = bytearray((DATA / "v3_level6.lmc").read_bytes())
    h, end = _header(bytes(buf))
    name_at = 8 + 2 + 2 + 1 + 4  # magic, version, flags, level, mixer; the four varints
    assert buf[name_at] == len(h.model_name)
    mfp = name_at + 1 + len(h.model_name)
    tfp = mfp + 16
    for offsets, message in (((mfp,), r"\(fingerprint [0-9a-f]{16}\), got 'smollm2-135m'"),
                             ((mfp, tfp), r"\(tokenizer [0-9a-f]{16}\), 'smollm2-135m' has tokenizer")):
        bad = bytearray(buf)
        for off in offsets:
            bad[off] ^= 1
        struct.pack_into("<I", bad, end - 4, zlib.crc32(bytes(bad[:end - 4])))
        with pytest.raises(ModelMismatchError, match=message):
            lmcodec.decompress(bytes(bad))


def test_info_names_the_archive_version(tmp_path):
    old = tmp_path / "old.lmc"
    old.write_bytes((DATA / "v3_level6.lmc").read_bytes())
    r = CliRunner().invoke(main, ["info", "--json", str(old)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["format_version"] == 3 and doc["level"] == 6 and len(doc["tokenizer_fingerprint"]) == 16
    r = CliRunner().invoke(main, ["test", str(old)])
    assert r.exit_code == 0, r.output


def test_every_registered_model_has_a_format_id():
    from lmcodec import models
    from lmcodec.container import MODEL_IDS

    assert set(models.REGISTRY) <= set(MODEL_IDS.values())
    assert len(set(MODEL_IDS.values())) == len(MODEL_IDS) and 0 not in MODEL_IDS
