"""The command line, through click's runner and real subprocesses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lmcodec.cli.main import main

FAST = ["--segment-tokens", "24", "--lanes", "2", "--context", "32", "--threads", "2"]
TEXT = b"The cat sat on the mat.\r\nThe dog sat on the log.\n"


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "note.txt"
    p.write_bytes(TEXT)
    return p


def run(runner, *args, input=None):
    return runner.invoke(main, ["-q", *map(str, args)], input=input, catch_exceptions=False)


def test_compress_then_decompress_file(runner, text_file):
    r = run(runner, "compress", *FAST, text_file)
    assert r.exit_code == 0, r.output
    archive = text_file.with_name("note.txt.lmc")
    assert archive.exists() and text_file.exists()  # input kept by default
    text_file.unlink()
    r = run(runner, "decompress", archive)
    assert r.exit_code == 0, r.output
    assert text_file.read_bytes() == TEXT
    assert archive.exists()


def test_refuses_to_overwrite_without_force(runner, text_file):
    assert run(runner, "compress", *FAST, text_file).exit_code == 0
    archive = text_file.with_name("note.txt.lmc")
    before = archive.read_bytes()
    r = run(runner, "compress", *FAST, text_file)
    assert r.exit_code == 1
    assert "already exists" in r.stderr and "Traceback" not in r.output
    assert archive.read_bytes() == before
    assert run(runner, "compress", "-f", *FAST, text_file).exit_code == 0
    r = run(runner, "decompress", archive)
    assert r.exit_code == 1 and "already exists" in r.stderr
    assert text_file.read_bytes() == TEXT


def test_rm_removes_input_only_after_success(runner, text_file):
    assert run(runner, "compress", "--rm", *FAST, text_file).exit_code == 0
    assert not text_file.exists()
    archive = text_file.with_name("note.txt.lmc")
    assert run(runner, "decompress", "--rm", archive).exit_code == 0
    assert not archive.exists() and text_file.read_bytes() == TEXT


def test_stdin_to_stdout(runner):
    r = runner.invoke(main, ["-q", "compress", *FAST, "-"], input=TEXT)
    assert r.exit_code == 0
    archive = r.stdout_bytes
    assert archive.startswith(b"\x89L\x06")
    r = runner.invoke(main, ["-q", "decompress", "-"], input=archive)
    assert r.exit_code == 0 and r.stdout_bytes == TEXT


def test_stdout_flag_and_output_option(runner, text_file, tmp_path):
    r = run(runner, "compress", "-c", *FAST, text_file)
    assert r.exit_code == 0 and r.stdout_bytes.startswith(b"\x89L\x06")
    out = tmp_path / "custom.bin"
    assert run(runner, "compress", *FAST, "-o", out, text_file).exit_code == 0
    r = run(runner, "decompress", "-c", out)
    assert r.stdout_bytes == TEXT
    r = run(runner, "decompress", out)
    assert r.exit_code == 2 and "unknown suffix" in r.stderr


def test_prompt_file_and_wrong_prompt(runner, text_file, tmp_path):
    key = tmp_path / "key.txt"
    key.write_text("animals on furniture")
    assert run(runner, "compress", *FAST, "--prompt-file", key, text_file).exit_code == 0
    archive = text_file.with_name("note.txt.lmc")
    r = run(runner, "decompress", "-c", "--prompt", "wrong", archive)
    assert r.exit_code == 1 and "wrong prompt" in r.stderr
    assert r.stderr.count("\n") == 1
    r = run(runner, "decompress", "-c", "--prompt-file", key, archive)
    assert r.exit_code == 0 and r.stdout_bytes == TEXT


def test_corrupt_archive_leaves_no_output(runner, text_file):
    assert run(runner, "compress", *FAST, text_file).exit_code == 0
    archive = text_file.with_name("note.txt.lmc")
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0x01
    archive.write_bytes(bytes(data))
    text_file.unlink()
    r = run(runner, "decompress", archive)
    assert r.exit_code == 1
    assert r.stderr.startswith("lmcodec: error:") and r.stderr.count("\n") == 1
    assert not text_file.exists()
    assert [p.name for p in archive.parent.iterdir()] == ["note.txt.lmc"]


def test_truncated_archive_and_not_an_archive(runner, text_file, tmp_path):
    assert run(runner, "compress", *FAST, text_file).exit_code == 0
    archive = text_file.with_name("note.txt.lmc")
    cut = tmp_path / "cut.lmc"
    cut.write_bytes(archive.read_bytes()[:-7])
    r = run(runner, "test", cut)
    assert r.exit_code == 1 and "truncated" in r.stderr
    r = run(runner, "test", text_file)
    assert r.exit_code == 1 and "not an lmcodec archive" in r.stderr


def test_missing_input_and_unwritable_output(runner, tmp_path, text_file):
    r = run(runner, "compress", tmp_path / "nope.txt")
    assert r.exit_code == 1 and "No such file" in r.stderr
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that ignores permissions")
        r = run(runner, "compress", *FAST, "-o", locked / "x.lmc", text_file)
        assert r.exit_code == 1 and "Permission denied" in r.stderr
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_unwritable_output_as_root_uses_a_missing_directory(runner, tmp_path, text_file):
    r = run(runner, "compress", *FAST, "-o", tmp_path / "no" / "dir" / "x.lmc", text_file)
    assert r.exit_code == 1 and "No such file" in r.stderr


def test_info_json(runner, text_file):
    assert run(runner, "compress", *FAST, text_file).exit_code == 0
    r = run(runner, "info", "--json", text_file.with_name("note.txt.lmc"))
    doc = json.loads(r.stdout)
    assert doc["model"] == "smollm2-135m" and doc["original_bytes"] == len(TEXT)
    assert doc["format_version"] == 6 and "tokenizer_fingerprint" not in doc  # v4 to v6 store none
    assert doc["layout"] == "short" and doc["dictionary"] is None and doc["framing_bytes"] < 32
    assert len(doc["model_fingerprint"]) == 16  # its first 8 bytes
    assert doc["segment_tokens"] == 24 and doc["lanes"] == 2 and doc["context"] == 32
    # Nothing about the encoder's machine is recorded.
    assert not {"threads", "device", "dtype", "batch_size", "escape_bits"} & set(doc)
    assert doc["archive_bytes"] == text_file.with_name("note.txt.lmc").stat().st_size
    block = doc["blocks"][0]
    assert block["method"] in ("lm", "zstd", "raw")
    if block["method"] == "lm":
        assert block["streams"] == -(-block["segments"] // 2) and block["tokens"] > 0
    else:
        assert block["segments"] == block["streams"] == block["tokens"] == 0


def test_level_9_makes_the_block_one_segment(runner, text_file):
    """-9 (after the subcommand) records level 9 and a block-long segment; the archive decodes."""
    r = run(runner, "compress", "-9", "--threads", "2", "--method", "lm", text_file)
    assert r.exit_code == 0, r.output
    archive = text_file.with_name("note.txt.lmc")
    doc = json.loads(run(runner, "info", "--json", archive).stdout)
    assert doc["level"] == 9 and doc["segment_tokens"] == 64 << 20 and doc["context"] == 4096
    assert doc["blocks"][0]["segments"] == 1
    text_file.unlink()
    assert run(runner, "test", "--threads", "1", archive).exit_code == 0
    assert run(runner, "decompress", "--device", "cpu", "--threads", "1", archive).exit_code == 0
    assert text_file.read_bytes() == TEXT


def test_test_and_verify_commands(runner, text_file):
    r = run(runner, "verify", *FAST, text_file)
    assert r.exit_code == 0 and "OK" in r.stdout
    assert run(runner, "compress", *FAST, text_file).exit_code == 0
    r = runner.invoke(main, ["test", str(text_file.with_name("note.txt.lmc"))])
    assert r.exit_code == 0 and "OK" in r.stderr


def test_compress_verify_flag(runner, text_file):
    r = run(runner, "compress", "--verify", *FAST, text_file)
    assert r.exit_code == 0
    assert text_file.with_name("note.txt.lmc").exists()


def test_bpb_json(runner, text_file):
    r = run(runner, "bpb", "--json", *FAST, text_file)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    row = doc["files"][0]
    assert row["bytes"] == len(TEXT)
    for key in ("model_bpb", "lmcodec_bpb", "gzip_bpb", "zstd_bpb", "xz_bpb"):
        assert row[key] > 0
    assert doc["total"]["bytes"] == len(TEXT)


def test_bad_option_values(runner, text_file):
    r = runner.invoke(main, ["compress", "--method", "nope", str(text_file)])
    assert r.exit_code == 2
    # Options of the float engine are gone; the layout options have the v3 ranges.
    for args in (["--dtype", "float32"], ["--batch-size", "3"], ["--escape-bits", "16"], ["--lanes", "0"],
                 ["--lanes", "4097"], ["--context", "8193"], ["--context", "15"]):
        r = runner.invoke(main, ["compress", *args, "-c", str(text_file)])
        assert r.exit_code == 2, (args, r.output)
    r = runner.invoke(main, ["compress", "-o", "x", str(text_file), str(text_file)])
    assert r.exit_code == 2 and "single input" in r.stderr
    r = runner.invoke(main, ["compress", "--prompt", "a", "--prompt-file", str(text_file), str(text_file)])
    assert r.exit_code == 2


def test_entry_point_subprocess(tmp_path, text_file):
    """The installed script, stdin -> stdout, in a fresh interpreter."""
    exe = Path(sys.executable).with_name("lmcodec")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lmcodec"]
    enc = subprocess.run(cmd + ["-q", "compress", *FAST, "-c", "-"], input=TEXT, capture_output=True, check=True)
    dec = subprocess.run(cmd + ["-q", "decompress", "-c", "-"], input=enc.stdout, capture_output=True, check=True)
    assert dec.stdout == TEXT
    bad = subprocess.run(cmd + ["decompress", "-c", "-"], input=b"garbage", capture_output=True)
    assert bad.returncode == 1
    assert bad.stderr.decode().strip() == "lmcodec: error: not an lmcodec archive (bad magic bytes)"


def test_lanes_and_largest_context_are_accepted(runner, text_file):
    r = run(runner, "compress", "-c", "--method", "zstd", "--lanes", "4096", "--context", "8192", text_file)
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["-q", "decompress", "-c", "-"], input=r.stdout_bytes)
    assert r.exit_code == 0 and r.stdout_bytes == TEXT


def _v2_archive() -> bytes:
    """A format-v2 archive (as lmcodec 0.1.x wrote it: raw method, valid CRCs)."""
    import struct
    import zlib

    from lmcodec.format.container import End, digest

    head = b"\x89LMC" + bytes([2, 0, 0]) + struct.pack(
        "<16s16s8sBBHHIIBI", bytes(16), bytes(16), bytes(8), 0, 0, 2, 3, 32, 24, 16, 4096)
    head += struct.pack("<I", zlib.crc32(head))
    table = struct.pack("<BBI8sI", 0x42, 0, len(TEXT), digest(TEXT), 1)
    table += struct.pack("<III", 0, len(TEXT), zlib.crc32(TEXT))
    return head + table + struct.pack("<I", zlib.crc32(table)) + TEXT + End(len(TEXT), digest(TEXT), 1).pack()


def test_v2_archive_is_refused_naming_the_release_that_reads_it(runner, tmp_path):
    arc = tmp_path / "old.txt.lmc"
    arc.write_bytes(_v2_archive())
    for cmd in ("decompress", "test", "info"):
        r = run(runner, cmd, arc)
        assert r.exit_code == 1, r.output
        assert r.stderr.startswith("lmcodec: error: archive format version 2 ") and r.stderr.count("\n") == 1
        assert "decode it with lmcodec 0.1.x" in r.stderr
    assert not (tmp_path / "old.txt").exists()


def test_same_gguf_under_another_name_decodes(runner, text_file, tmp_path):
    """The archive's fingerprint is the model's content: a renamed copy of the GGUF
    (``--model newpath``) decodes an archive made with the registered model, and back."""
    import shutil

    from lmcodec.engine.model import registry as models

    _, directory, gguf = models.resolve("smollm2-135m")
    # A fixed name keeps lmcodec's conversion cache warm across runs (first run: ~30 s).
    copy = tmp_path / "my-copy.gguf"
    shutil.copyfile(directory / gguf, copy)
    assert run(runner, "compress", *FAST, "--method", "lm", text_file).exit_code == 0
    archive = text_file.with_name("note.txt.lmc")
    r = run(runner, "decompress", "-c", "--model", copy, archive)
    assert r.exit_code == 0, r.output
    assert r.stdout_bytes == TEXT
    # And an archive made with the copy names it, and decodes with the registered model.
    r = run(runner, "compress", "-c", *FAST, "--method", "lm", "--model", copy, text_file)
    assert r.exit_code == 0, r.output
    info = tmp_path / "copy.lmc"
    info.write_bytes(r.stdout_bytes)
    doc = json.loads(run(runner, "info", "--json", info).stdout)
    original = json.loads(run(runner, "info", "--json", archive).stdout)
    assert doc["model"] == "my-copy.gguf" and doc["model_fingerprint"] == original["model_fingerprint"]
    r = run(runner, "decompress", "-c", "--model", "smollm2-135m", info)
    assert r.exit_code == 0 and r.stdout_bytes == TEXT
    # Without --model the name is not registered: named, not guessed.
    r = run(runner, "decompress", "-c", info)
    assert r.exit_code == 1 and "'my-copy.gguf'" in r.stderr and "not registered" in r.stderr


def test_python_dash_m_runs_the_command():
    """``python -m lmcodec`` is the ``lmcodec`` command, as ``python -m gzip`` is gzip."""
    run = [sys.executable, "-m", "lmcodec"]
    version = subprocess.run(run + ["--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("lmcodec, version ")
    bad = subprocess.run(run + ["-dc", "-"], input=b"garbage", capture_output=True)
    assert bad.returncode == 1
    assert bad.stderr.decode().strip() == "lmcodec: error: not an lmcodec archive (bad magic bytes)"


SUMMARY = re.compile(r"(\d+) tokens in ([\d.]+) s: model ([\d.]+) s, coding ([\d.]+) s; (\d+) pass(es)?"
                     r"(, [\d.]+ tokens a pass)?; coding \d+ us/token")


def test_verbose_ends_each_way_with_where_the_time_went(runner, text_file):
    """-v: one summary line per file, compressing and decompressing; its times add up."""
    r = runner.invoke(main, ["compress", "-v", *FAST, str(text_file)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = SUMMARY.search(r.output.splitlines()[-1])
    assert m, r.output
    tokens, total, model, coding = int(m[1]), float(m[2]), float(m[3]), float(m[4])
    assert tokens > 0 and int(m[5]) >= 1 and 0 < model <= total and abs(model + coding - total) < 0.02
    archive = text_file.with_name("note.txt.lmc")
    r = runner.invoke(main, ["decompress", "-v", "-f", str(archive)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = SUMMARY.search(r.output.splitlines()[-1])
    assert m and int(m[1]) == tokens and int(m[5]) >= 1, r.output
    r = runner.invoke(main, ["compress", *FAST, "-f", str(text_file)], catch_exceptions=False)
    assert not SUMMARY.search(r.output)
