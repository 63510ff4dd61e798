"""Archives of earlier format versions keep decoding.

``tests/data/v3_*.lmc`` were written by lmcodec at commit 68af561 (format v3, the
last commit that wrote it), ``tests/data/v4_*.lmc`` at d3dd190 (the last that
wrote v4), ``tests/data/v5_*.lmc`` at 5753a0c (the last that wrote v5); they are
never regenerated: they are what users hold.  The coding has not changed since,
so the same input under the same settings gives the same blocks (method, length,
tokens, payloads) in every version: v4 changed only the header, v5 writes a
one-block archive in its short form (v4's block table, CRCs and end record give
way to one check) and two blocks or more exactly as v4, and v6 adds a payload
check to a short-form LM block of PAYLOAD_CHECK_TOKENS tokens or more.
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
from lmcodec.cli.main import main
from lmcodec.errors import ModelMismatchError
from lmcodec.format.container import VERSION, End
from lmcodec.format.reader import Reader

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
#: Over PAYLOAD_CHECK_TOKENS tokens in one block: v6 gives it a payload check, v5 did not.
LONG = (b"It was the best of times, it was the worst of times, it was the age of wisdom, "
        b"it was the age of foolishness, it was the epoch of belief, it was the epoch of "
        b"incredulity, it was the season of Light, it was the season of Darkness.\n"
        b"def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n")
SMALL = dict(segment_tokens=16, context=32, lanes=2, mixer=64 | 1, block_size=4096)
#: ``tests/data/v5_*.lmc``: written by lmcodec at commit 5753a0c (format v5, the last commit that
#: wrote it) with ``Codec(**settings).compress(original, prompt)``; never regenerated.
V5 = {
    "v5_level6.lmc": (TEXT, None, {}),
    "v5_level6_prompt.lmc": (TEXT, PROMPT, {}),
    "v5_short_long.lmc": (LONG, None, SMALL),
    "v5_custom_prompt.lmc": (TEXT * 40, PROMPT, SMALL),
    "v5_stored.lmc": (TEXT, None, dict(method="zstd")),
    "v5_raw_blocks.lmc": (bytes(range(256)) * 40, None, dict(method="raw", block_size=4096)),
    "v5_empty.lmc": (b"", None, {}),
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
    for name in V5:
        assert (DATA / name).read_bytes()[2] == 5, name
    sizes = {name: hashlib.sha256((DATA / name).read_bytes()).hexdigest()[:12] for name in V5}
    assert sizes == V5_SHA256, sizes


def _parse(blob: bytes):
    reader = Reader(io.BytesIO(blob), len(blob))
    header = reader.header()
    n = reader.offset
    blocks = []
    while not isinstance(rec := reader.next(header), End):
        blocks.append(rec)
    return header, n, blocks, rec, reader.short_form


_TODAY: dict = {}


def _today(original: bytes, prompt: bytes | None, settings: dict) -> bytes:
    """What this lmcodec writes for the input (once per input: the v3 and v4 fixtures share some),
    round-tripped."""
    key = (original, prompt, tuple(sorted(settings.items())))
    if key not in _TODAY:
        codec = lmcodec.Codec(**settings)
        blob = codec.compress(original, prompt)
        assert blob[:3] == b"\x89L" + bytes([VERSION])
        assert codec.decompress(blob, prompt) == original
        _TODAY[key] = blob
    return _TODAY[key]


#: The committed v5 fixtures, pinned (the first 12 hex digits of each file's SHA-256).
V5_SHA256 = {'v5_custom_prompt.lmc': '29c5d0868929', 'v5_empty.lmc': 'fc4455e2a613', 'v5_level6.lmc': 'c35011649b1f', 'v5_level6_prompt.lmc': '188d14b10f37', 'v5_raw_blocks.lmc': 'b1608d37976a', 'v5_short_long.lmc': 'f686bc275534', 'v5_stored.lmc': 'e82f7a07709b'}


#: (fixture, bytes of framing it holds, bytes of framing today's archive of the same input holds):
#: every archive but its payloads.  One block: v3 86 and v4 48 -> 13 (17 with a prompt, 11 stored or
#: empty); two blocks or more: the header's savings only (the model id without its fingerprint, a
#: 4-byte prompt check, a 2-byte magic, one flag for lanes and block size).
FRAMING = {"v5_level6.lmc": (13, 13), "v5_level6_prompt.lmc": (17, 17), "v5_short_long.lmc": (23, 27),
           "v5_custom_prompt.lmc": (78, 78), "v5_stored.lmc": (11, 11), "v5_raw_blocks.lmc": (88, 88),
           "v5_empty.lmc": (11, 11),
           "v3_level6.lmc": (86, 13), "v3_custom_prompt.lmc": (120, 78), "v3_stored.lmc": (48, 11),
           "v4_level6.lmc": (48, 13), "v4_level6_prompt.lmc": (56, 17), "v4_custom_prompt.lmc": (92, 78),
           "v4_stored.lmc": (38, 11), "v4_raw_blocks.lmc": (89, 88), "v4_empty.lmc": (27, 11)}


@pytest.mark.parametrize("name", sorted(V3) + sorted(V4) + sorted(V5))
def test_old_archives_decode_and_today_codes_the_same_blocks(name):
    original, prompt, settings = {**V3, **V4, **V5}[name]
    old = (DATA / name).read_bytes()
    assert lmcodec.decompress(old, prompt=prompt) == original
    new = _today(original, prompt, settings)
    (h_old, n_old, b_old, e_old, _), (h_new, n_new, b_new, e_new, short) = _parse(old), _parse(new)
    assert h_old.version == int(name[1]) and h_new.version == VERSION
    for field in ("model_name", "has_prompt", "context", "segment_tokens", "lanes", "block_size", "level", "mixer"):
        assert getattr(h_old, field) == getattr(h_new, field), field
    assert h_new.model_fingerprint == h_old.model_fingerprint[:len(h_new.model_fingerprint)]
    assert h_new.prompt_check == h_old.prompt_check[:4] and h_new.dict_id == b""
    assert [(b.method, b.raw_len, b.tokens, b.payloads) for b in b_old] == \
        [(b.method, b.raw_len, b.tokens, b.payloads) for b in b_new]
    assert (e_old.total_len, e_old.n_blocks) == (e_new.total_len, e_new.n_blocks)
    assert short == (len(b_new) <= 1)
    if not short:   # two blocks or more: v4's blocks and end record, byte for byte (v3's too)
        assert old[n_old:] == new[n_new:]
    framing = [len(x) - sum(len(p) for b in blocks for p in b.payloads) for x, blocks in ((old, b_old), (new, b_new))]
    assert tuple(framing) == FRAMING[name], framing


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
    from lmcodec.engine.model import registry as models
    from lmcodec.format.container import MODEL_IDS

    assert set(models.REGISTRY) <= set(MODEL_IDS.values())
    assert len(set(MODEL_IDS.values())) == len(MODEL_IDS) and 0 not in MODEL_IDS


def test_a_registered_id_determines_the_model_fingerprint():
    """v5 stores a registered model's id without its fingerprint: the id pins it, so the model
    that the registry loads must have exactly that fingerprint (else the encoder writes the
    name and 8 bytes of the fingerprint, and a decoder's model is refused by it)."""
    from lmcodec.format.container import MODEL_FINGERPRINTS, MODEL_IDS

    codec = lmcodec.Codec()
    model, _, name = codec.models.coding_model()
    assert name == MODEL_IDS[1] and model.fingerprint == MODEL_FINGERPRINTS[1]


def test_info_shows_the_v5_fields(tmp_path):
    from lmcodec.format.container import Block, Header, Method, pack_short, prompt_check

    raw = b"records of one kind\n"
    h = Header("", b"", b"", prompt_check(None), False, 2048, 8192, 64, 4 << 20, level=6, mixer=127,
               dict_id=bytes.fromhex("d1c70042"))
    path = tmp_path / "d.lmc"
    path.write_bytes(pack_short(h, Block.build(Method.RAW, raw, [raw], []), raw))
    r = CliRunner().invoke(main, ["info", "--json", str(path)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert (doc["format_version"], doc["dictionary"], doc["layout"], doc["framing_bytes"]) == (
        VERSION, "d1c70042", "short", 5 + 4 + 1 + 4)
    assert doc["blocks"][0]["payload_check"] is False   # a stored block: nothing to decode
    assert doc["content_checksum"] == path.read_bytes()[-len(raw) - 4:-len(raw)].hex()
    r = CliRunner().invoke(main, ["info", str(path)])
    assert "dictionary: d1c70042" in r.output and "layout: short" in r.output
