"""The gzip/zstd form (``lmcodec [FILE...]``, ``unlmc``, ``lmcat``) through real programs.

tar and the pipelines run the installed scripts as subprocesses; flag-by-flag
checks use click's runner on ``lmcodec.cli.main:main``, the same entry point. Only
the pipeline test runs the model (a ~60-byte text at -1); the rest use stored
archives (``--method zstd``) or tar data, which is stored automatically, since
they test plumbing, not coding.
"""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lmcodec.cli.main import main
from lmcodec.format.header import MAGIC5

BIN = Path(sys.executable).parent
TEXT = b"The quick brown fox jumps over the lazy dog.\nIt barked.\n"
STORED = ["--method", "zstd"]


def env() -> dict:
    """PATH with this venv's scripts first, so tar -I lmcodec finds this lmcodec."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def script(name: str) -> str:
    exe = BIN / name
    if not exe.exists():
        pytest.skip(f"{name} is not installed in {BIN} (pip install -e .)")
    return str(exe)


def sh(cmd: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=cwd, env=env(), capture_output=True, **kw)


def cli(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.txt").write_bytes(TEXT)
    return tmp_path


@pytest.fixture
def stored(work):
    """f.txt.lmc, a stored (zstd) archive of f.txt made by the gzip form."""
    r = cli(*STORED, "f.txt")
    assert r.exit_code == 0, r.output
    return Path("f.txt.lmc")   # relative, as users name files (the tests run in ``work``)


def test_pipeline_through_the_model(work):
    """cat f | lmcodec | lmcodec -d | cmp - f, the model coding the text (-1: shortest context)."""
    script("lmcodec")
    r = sh("cat f.txt | lmcodec -1 | tee f.lmc | lmcodec -d | cmp - f.txt", work)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stderr == b""
    listed = cli("-l", "f.lmc").output.splitlines()[1].split()
    assert listed[1:5] == [str(len(TEXT)), listed[2], "1", "1"] and listed[5] == "lm"


def test_tar_dash_capital_i(work):
    if shutil.which("tar") is None or b"GNU tar" not in subprocess.run(["tar", "--version"],
                                                                        capture_output=True).stdout:
        pytest.skip("GNU tar is not installed")
    script("lmcodec")
    src = work / "tree"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_bytes(TEXT)
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)) * 8)
    (src / "sub" / "deeper" / "empty").write_bytes(b"")
    (src / "sub" / "deeper" / "c.txt").write_bytes(TEXT * 3)
    r = sh("tar -I lmcodec -cf tree.tar.lmc tree", work)
    assert r.returncode == 0, r.stderr.decode()
    assert (work / "tree.tar.lmc").read_bytes().startswith(MAGIC5)
    r = sh("tar -I lmcodec -tf tree.tar.lmc", work)
    assert r.returncode == 0, r.stderr.decode()
    assert set(r.stdout.decode().split()) == {"tree/", "tree/a.txt", "tree/sub/", "tree/sub/b.bin",
                                              "tree/sub/deeper/", "tree/sub/deeper/empty",
                                              "tree/sub/deeper/c.txt"}
    (work / "out").mkdir()
    r = sh("tar -I lmcodec -xf tree.tar.lmc -C out && diff -r tree out/tree", work)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


def test_dc_lmcat_unlmc(stored):
    work = stored.parent
    for cmd in ("lmcodec -dc f.txt.lmc", "lmcat < f.txt.lmc"):
        script(cmd.split()[0])
        r = sh(cmd, work)
        assert (r.returncode, r.stdout, r.stderr) == (0, TEXT, b""), cmd
    (work / "f.txt").unlink()
    r = sh("unlmc f.txt.lmc", work)
    assert r.returncode == 0, r.stderr.decode()
    assert (work / "f.txt").read_bytes() == TEXT and stored.exists()  # input kept, as zstd


def test_a_reader_that_stops_early_ends_lmcat_by_sigpipe(work):
    """lmcat big.lmc | head: silent, killed by SIGPIPE as zcat is (tar -t accepts only that)."""
    Path("big").write_bytes(os.urandom(8 << 20))      # far more than the pipe holds when head exits
    assert cli("--method", "raw", "big").exit_code == 0
    script("lmcat")
    r = sh("lmcat big.lmc | head -c 10 >/dev/null; echo ${PIPESTATUS[0]}", work)
    assert r.stdout == b"141\n" and r.stderr == b""                       # 128 + SIGPIPE


def test_test_mode_on_good_and_corrupted_archives(stored):
    blob = stored.read_bytes()
    bad = bytearray(blob)
    bad[len(blob) // 2] ^= 0x40
    Path("bad.lmc").write_bytes(bytes(bad))
    Path("short.lmc").write_bytes(blob[:-3])
    r = cli("-t", stored)
    assert (r.exit_code, r.output) == (0, "")        # quiet on success, as gzip -t
    r = cli("-tv", stored)
    assert r.exit_code == 0 and r.stderr == f"{stored.name}: OK ({len(TEXT)} bytes)\n"
    r = cli("-tv", "bad.lmc", stored, "short.lmc")
    assert r.exit_code == 1                          # every file tried; an error wins
    lines = r.stderr.splitlines()
    # A one-block archive (format v5's short form) has no CRCs: its one check names the damage.
    assert lines[0].startswith("lmcodec: error: ") and "damaged" in lines[0]
    assert lines[1] == f"{stored.name}: OK ({len(TEXT)} bytes)"
    assert lines[2].startswith("lmcodec: error: archive truncated") and len(lines) == 3
    assert sorted(os.listdir()) == ["bad.lmc", "f.txt", "f.txt.lmc", "short.lmc"]   # test writes nothing


def test_list_output(stored):
    cli("-9", *STORED, "-o", "nine.lmc", "f.txt")
    r = cli("-l", stored, "nine.lmc")
    assert r.exit_code == 0, r.output
    head, one, nine, total = r.output.splitlines()
    assert head.split() == ["compressed", "uncompressed", "bits/byte", "blocks", "level", "methods", "name"]
    size = stored.stat().st_size
    assert one.split() == [str(size), str(len(TEXT)), f"{8 * size / len(TEXT):.3f}", "1", "6", "zstd", "f.txt.lmc"]
    assert nine.split()[4] == "9"                    # -9 is the level; -l never is
    assert total.split()[:2] == [str(size + Path("nine.lmc").stat().st_size), str(2 * len(TEXT))]
    assert total.endswith("(totals)")


def _on_a_terminal(args: list[str], cwd: Path, stdin=None, stdout_tty=True) -> tuple[int, bytes, bytes]:
    """Run lmcodec with stdout (or stdin) on a pseudo-terminal; return status, what the terminal got, stderr."""
    master, slave = pty.openpty()
    try:
        p = subprocess.run([script("lmcodec"), *args], cwd=cwd, env=env(), stderr=subprocess.PIPE, timeout=120,
                           stdin=slave if stdin is None else stdin, stdout=slave if stdout_tty else subprocess.PIPE)
        os.close(slave)
        got = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            got += chunk
        return p.returncode, got if stdout_tty else p.stdout, p.stderr
    finally:
        os.close(master)


def test_refuses_compressed_data_on_a_terminal(stored):
    work = stored.parent
    with open(work / "f.txt", "rb") as f:
        code, seen, err = _on_a_terminal(["-c", *STORED, "f.txt"], work, stdin=f)
    assert (code, seen) == (2, b"")
    assert err == b"lmcodec: error: refusing to write compressed data to a terminal; use -o, redirect, or -f\n"
    code, seen, err = _on_a_terminal(["-d"], work, stdout_tty=False)   # stdin is the terminal
    assert code == 2 and err.startswith(b"lmcodec: error: refusing to read compressed data from a terminal")
    code, seen, err = _on_a_terminal(["-dc", "f.txt.lmc"], work)      # decompressed data may go there
    assert code == 0 and seen.replace(b"\r\n", b"\n") == TEXT


def test_double_dash_and_a_file_named_dash_d(work):
    Path("-d").write_bytes(TEXT)
    assert cli(*STORED, "--", "-d").exit_code == 0
    assert Path("-d.lmc").exists()
    Path("-d").unlink()
    r = cli("-d", "--", "-d.lmc")
    assert r.exit_code == 0, r.output
    assert Path("-d").read_bytes() == TEXT
    Path("test").write_bytes(TEXT)                   # a file named like a subcommand
    assert cli(*STORED, "--", "test").exit_code == 0 and Path("test.lmc").exists()
    r = cli("-c", *STORED, "-", input=TEXT)          # '-' is stdin
    assert r.exit_code == 0 and cli("-d", input=r.stdout_bytes).stdout_bytes == TEXT


def test_modes_last_one_wins_and_aliases_prepend(stored):
    r = cli("-d", "-z", "-c", *STORED, "f.txt")      # -z after -d: compress
    assert r.exit_code == 0 and r.stdout_bytes.startswith(MAGIC5)
    r = cli("-z", "-dc", stored)
    assert r.exit_code == 0 and r.stdout_bytes == TEXT


def test_exit_codes_and_nothing_half_written(stored):
    assert cli("--no-such-option").exit_code == 2
    r = cli("missing.txt")
    assert (r.exit_code, r.stderr) == (1, "lmcodec: error: missing.txt: No such file or directory\n")
    r = cli("-d", "f.txt")                           # unknown suffix: a usage error, nothing written
    assert r.exit_code == 2 and "unknown suffix" in r.stderr
    r = cli("f.txt.lmc")
    assert r.exit_code == 2 and "already has the .lmc suffix" in r.stderr
    r = cli("-d", "f.txt", "missing.lmc")            # an error outranks a usage error
    assert r.exit_code == 1 and len(r.stderr.splitlines()) == 2
    assert cli("-o", "x.lmc", "f.txt", "f.txt").exit_code == 2
    assert cli("-c", "f.txt", "f.txt").exit_code == 2   # concatenated archives do not decode
    before = stored.read_bytes()
    r = cli(*STORED, "f.txt")                        # output exists: refused, untouched
    assert r.exit_code == 1 and stored.read_bytes() == before
    bad = bytearray(before)
    bad[-5] ^= 1
    Path("bad.lmc").write_bytes(bytes(bad))
    r = cli("-d", "bad.lmc")
    assert r.exit_code == 1 and len(r.stderr.splitlines()) == 1
    assert not Path("bad").exists() and not [n for n in os.listdir() if n.endswith(".tmp")]
    r = cli(*STORED, "--rm", "-f", "f.txt")          # --rm: the input goes after success only
    assert r.exit_code == 0 and not Path("f.txt").exists()
    assert cli("-d", "--rm", stored).exit_code == 0 and not stored.exists()
    assert Path("f.txt").read_bytes() == TEXT


def test_help_shows_both_forms_and_subcommands_still_run(stored):
    r = cli("--help")
    assert r.exit_code == 0
    assert "COMMAND [ARGS]" in r.output and "Or as gzip/zstd" in r.output
    for flag in ("-d, --decompress", "-c, --stdout", "-l, --list", "-T, --threads", "--rm", "-k, --keep"):
        assert flag in r.output
    r = cli("-q", "test", stored)                   # a subcommand, with the group's flag first
    assert r.exit_code == 0
    r = cli("-d", "--help")
    assert r.exit_code == 0 and "[OPTIONS] [FILE]..." in r.output and "COMMAND" not in r.output
