"""``lmcodec.open()``: file objects over archives, reading pulled block by block, writing
byte-identical to ``Codec.compress``.

The model runs on one tiny text only (the session's FAST codec); block cutting,
buffering, text mode and memory are tested with stored methods, which take the
same path through the writer and the reader.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import textwrap

import pytest

import lmcodec
from lmcodec import Codec, PromptMismatchError, TruncatedArchiveError

#: The smallest block size (4 KiB), so a few hundred KB make many blocks.
SMALL_BLOCKS = dict(method="zstd", block_size=4096)


def lines_and_a_long_run(n: int) -> bytes:
    """Lines (blocks cut after a line break) and a run without one (cut at the block size)."""
    text = b"".join(b"row %d: %s\n" % (i, b"x" * (i % 97)) for i in range(n))
    return text + b"y" * 9000 + text[:5000]


def written(data: bytes, step: int, **kw) -> bytes:
    out = io.BytesIO()
    with lmcodec.open(out, "wb", **kw) as f:
        for at in range(0, len(data), step):
            assert f.write(data[at:at + step]) == len(data[at:at + step])
    return out.getvalue()


@pytest.mark.parametrize("step", [1, 4095, 10**6])
def test_writer_bytes_equal_compress_whatever_the_write_sizes(step):
    data = lines_and_a_long_run(2500)
    assert len(data) > 25 * 4096
    expected = Codec(**SMALL_BLOCKS).compress(data)
    assert written(data, step, **SMALL_BLOCKS) == expected


def test_writer_through_the_model_equals_compress(codec):
    text = b"Alice was beginning to get very tired.\n"
    expected = codec.compress(text)
    assert codec.last_stats.methods == ["lm"]
    out = io.BytesIO()
    with lmcodec.open(out, "wb", codec=codec) as f:
        for at in range(len(text)):
            f.write(text[at:at + 1])
    assert out.getvalue() == expected
    with lmcodec.open(io.BytesIO(expected), codec=codec) as f:     # the reader pulls from the model
        assert f.read(6) == b"Alice " and f.read() == text[6:]


def test_csv_reads_through_text_mode(tmp_path):
    rows = [["name", "qty"], ["äpple", "3"], ["pear, green", "1"]] + [[f"item {i}", str(i)] for i in range(900)]
    path = tmp_path / "t.csv.lmc"
    with lmcodec.open(path, "wt", encoding="utf-8", newline="", **SMALL_BLOCKS) as f:
        csv.writer(f).writerows(rows)
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(rows)
    assert path.read_bytes() == Codec(**SMALL_BLOCKS).compress(buf.getvalue().encode("utf-8"))
    with lmcodec.open(path, "rt", encoding="utf-8", newline="") as f:
        assert list(csv.reader(f)) == rows


def test_copyfileobj_lines_seek_and_tell(tmp_path):
    data = lines_and_a_long_run(600)
    path = tmp_path / "d.lmc"
    with lmcodec.open(path, "wb", **SMALL_BLOCKS) as f:
        shutil.copyfileobj(io.BytesIO(data), f, 1000)
        assert f.tell() == len(data)
    assert f.closed and f.stats.input_bytes == len(data) and f.stats.output_bytes == path.stat().st_size
    with lmcodec.open(path) as f:
        assert f.readline() == data[:data.index(b"\n") + 1]
        assert list(f)[:2] == data.splitlines(keepends=True)[1:3]
        assert f.seek(5000) == 5000 and f.read(10) == data[5000:5010]
        assert f.seek(100) == 100 and f.tell() == 100 and f.read(20) == data[100:120]  # backward: decodes again
        assert f.seek(-3, io.SEEK_END) == len(data) - 3 and f.read() == data[-3:]
    out = io.BytesIO()
    with lmcodec.open(str(path), "rb") as f:
        shutil.copyfileobj(f, out, 777)
    assert out.getvalue() == data


class Pipe(io.RawIOBase):
    """Bytes that arrive as from a pipe: readable, not seekable, no size."""

    def __init__(self, data: bytes):
        self._src = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self._src.readinto(b)


def test_errors_and_argument_checks(tmp_path):
    blob = Codec(**SMALL_BLOCKS).compress(lines_and_a_long_run(200))
    for cut in (len(blob) - 1, len(blob) // 2, 20):
        with pytest.raises(TruncatedArchiveError):
            lmcodec.open(io.BytesIO(blob[:cut])).read()
    with pytest.raises(TruncatedArchiveError):            # a pipe: no size, checked as it streams
        lmcodec.open(Pipe(blob[:-2])).read()
    for bad in (dict(mode="ab"), dict(mode="rtb"), dict(mode="rb", encoding="utf-8")):
        with pytest.raises(ValueError):
            lmcodec.open(io.BytesIO(blob), **bad)
    with pytest.raises(TypeError):
        lmcodec.open(io.BytesIO(blob), codec=Codec(), level=3)
    f = lmcodec.open(io.BytesIO(blob))
    with pytest.raises(io.UnsupportedOperation):
        f.write(b"x")
    f.close()
    with pytest.raises(ValueError):
        f.read()
    keyed = io.BytesIO()
    with lmcodec.open(keyed, "wb", prompt="key", **SMALL_BLOCKS) as f:
        f.write(b"secret-ish\n")
    with pytest.raises(PromptMismatchError):
        lmcodec.open(io.BytesIO(keyed.getvalue())).read()
    assert lmcodec.open(io.BytesIO(keyed.getvalue()), prompt=b"key").read() == b"secret-ish\n"
    (tmp_path / "x.lmc").write_bytes(b"")
    with pytest.raises(FileExistsError):
        lmcodec.open(tmp_path / "x.lmc", "xb")


def test_closefd_and_stream_shapes():
    data = lines_and_a_long_run(100)
    codec = Codec(**SMALL_BLOCKS)
    sink = io.BytesIO()
    with lmcodec.open(sink, "wb", codec=codec) as f:       # a file object given: left open
        f.write(data)
    assert not sink.closed
    inner = io.BytesIO()
    with codec.stream_writer(inner, closefd=False) as w:    # python-zstandard's shape
        w.write(data)
    assert inner.getvalue() == sink.getvalue() == codec.compress(data)
    with codec.stream_reader(io.BytesIO(sink.getvalue())) as r:
        assert r.read(5) + r.read() == data


BOUNDED = textwrap.dedent("""
    import hashlib, json, sys
    import lmcodec
    MB = 1 << 20
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    path, total = sys.argv[1], int(sys.argv[2])
    piece = bytes(range(256)) * 4096            # 1 MiB, varied by a counter below
    codec = lmcodec.Codec(method="raw")
    # Reset the peak (VmHWM) to the current RSS: the import's own peak must not count, and a
    # busy machine may have evicted library pages since (which makes a lower starting RSS).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    want = hashlib.sha256()
    with lmcodec.open(path, "wb", codec=codec) as f:
        for i in range(total // MB):
            chunk = i.to_bytes(8, "little") + piece[8:]
            want.update(chunk)
            f.write(chunk)
    got = hashlib.sha256()
    with lmcodec.open(path, codec=codec) as f:
        while chunk := f.read(MB // 3):
            got.update(chunk)
    print(json.dumps({"before": before, "peak": status("VmHWM"), "same": got.digest() == want.digest()}))
""")


def test_bounded_memory_on_a_large_stored_input(tmp_path):
    """64 MiB through the writer and the reader in a fresh process: the peak RSS grows by a few
    4 MiB blocks (~22 MiB measured; ~85 MiB when the 64 MiB are held)."""
    total = 64 << 20
    r = subprocess.run([sys.executable, "-c", BOUNDED, str(tmp_path / "big.lmc"), str(total)],
                       capture_output=True, check=True, timeout=300)
    doc = json.loads(r.stdout)
    assert doc["same"]
    grown = doc["peak"] - doc["before"]
    assert grown < 40 << 20, f"peak RSS grew {grown / 2**20:.1f} MiB for a {total >> 20} MiB input"
    assert (tmp_path / "big.lmc").stat().st_size > total
