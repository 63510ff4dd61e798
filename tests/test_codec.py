"""Round trips through the real default model (SmolLM2-135M), and every way they can fail."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest

import lmcodec
from lmcodec import Codec
from lmcodec.container import Reader
from lmcodec.errors import (
    ArchiveError,
    ChecksumError,
    CorruptArchiveError,
    LMCodecError,
    ModelMismatchError,
    PromptMismatchError,
    TruncatedArchiveError,
    UsageError,
)

from conftest import FAST, SAMPLES

TEXT = (b"It was the best of times, it was the worst of times, it was the age of wisdom, "
        b"it was the age of foolishness, it was the epoch of belief.\n")
PROSE = (b"There were a king with a large jaw and a queen with a plain face, on the throne of "
         b"England; there were a king with a large jaw and a queen with a fair face, on the "
         b"throne of France. In both countries it was clearer than crystal to the lords of the "
         b"State preserves of loaves and fishes, that things in general were settled for ever.\n")


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip(codec, name):
    data = SAMPLES[name]
    blob = codec.compress(data)
    assert codec.decompress(blob) == data


def test_text_is_coded_by_the_model_and_beats_zstd():
    import zstandard

    data = TEXT + PROSE
    c = Codec(segment_tokens=256, context=256, threads=2)
    blob = c.compress(data)
    stats = c.last_stats
    assert stats.methods == ["lm"]
    assert stats.lm_payload_bytes < 0.6 * len(zstandard.ZstdCompressor(level=19).compress(data))
    assert len(blob) - stats.lm_payload_bytes < 160  # header, block table, end record
    assert c.decompress(blob) == data


def test_random_bytes_fall_back_and_stay_small(codec):
    data = os.urandom(5000)
    blob = codec.compress(data)
    assert codec.last_stats.methods == ["raw"]
    assert len(blob) <= len(data) + 200
    assert codec.decompress(blob) == data


def test_stats_report_the_model_cross_entropy(codec):
    stats = codec.analyze(TEXT * 2)
    assert stats.tokens > 20
    assert 0.2 < stats.model_bpb < 4
    # Range coder flush costs up to a few words per segment; far from 0.5% on tiny segments
    # but bounded: at most 8 bytes per segment over the ideal.
    n_segments = -(-stats.tokens // FAST["segment_tokens"])
    assert stats.model_bits / 8 <= stats.lm_payload_bytes <= stats.model_bits / 8 + 8 * n_segments


def test_defaults_round_trip(loaded_model):
    c = Codec()
    blob = c.compress(TEXT)
    assert c.decompress(blob) == TEXT
    assert lmcodec.decompress(blob) == TEXT


def test_sliding_window_and_many_batches(codec):
    """Segments far longer than the context (ring buffer) and more segments than a batch."""
    c = Codec(segment_tokens=70, batch_size=2, context=20, threads=2)
    data = TEXT * 4
    blob = c.compress(data)
    assert len(c.layout(c.last_stats.tokens, 70)) >= 3
    assert c.decompress(blob) == data


def test_block_boundaries(codec):
    c = Codec(block_size=4096, **{**FAST, "batch_size": 64})
    data = (TEXT * 70)[:9000]
    blob = c.compress(data)
    assert len(c.last_stats.methods) == 3
    assert c.decompress(blob) == data


def test_prompt_is_the_decoding_key(codec):
    prompt = "A Tale of Two Cities, by Charles Dickens."
    blob = codec.compress(TEXT, prompt=prompt)
    assert codec.decompress(blob, prompt=prompt) == TEXT
    assert codec.decompress(blob, prompt=prompt.encode()) == TEXT
    with pytest.raises(PromptMismatchError, match="wrong prompt"):
        codec.decompress(blob, prompt="another prompt")
    with pytest.raises(PromptMismatchError, match="made with a prompt"):
        codec.decompress(blob)
    plain = codec.compress(TEXT)
    with pytest.raises(PromptMismatchError, match="without a prompt"):
        codec.decompress(plain, prompt=prompt)


def test_wrong_model_is_named(codec, tiny_model_dir):
    other = Codec(tiny_model_dir, method="lm", **FAST)  # random weights: force the LM block
    blob = other.compress(TEXT)
    assert other.decompress(blob) == TEXT
    with pytest.raises(ModelMismatchError, match="not registered"):
        codec.decompress(blob)
    explicit = Codec("smollm2-135m")
    with pytest.raises(ModelMismatchError, match="wrong model"):
        explicit.decompress(blob)
    with pytest.raises(ModelMismatchError, match="wrong model"):
        other.decompress(codec.compress(TEXT))


def Reader_header(blob):
    import io

    return Reader(io.BytesIO(blob), len(blob)).header()


def test_truncated_archive(codec):
    blob = codec.compress(TEXT)
    for cut in (0, 3, 10, len(blob) // 2, len(blob) - 1):
        with pytest.raises(ArchiveError):
            codec.decompress(blob[:cut])


def test_flipped_payload_bit_is_caught_before_decoding(codec):
    blob = bytearray(codec.compress(TEXT))
    blob[-40] ^= 0x10
    with pytest.raises(CorruptArchiveError):
        codec.decompress(bytes(blob))


def test_trailing_garbage(codec):
    with pytest.raises(CorruptArchiveError, match="trailing"):
        codec.decompress(codec.compress(b"abc") + b"x")


def test_checksum_catches_a_wrong_decode(codec):
    """Re-sign a block whose digest is wrong: the decoder must refuse, not return bytes."""
    import struct

    blob = bytearray(codec.compress(TEXT))
    header = Reader_header(bytes(blob))
    start = len(header.pack())
    fmt = struct.Struct("<BBI8sI")
    tag, method, raw_len, check, n_seg = fmt.unpack_from(blob, start)
    blob[start + 6] ^= 0xFF  # first byte of the block digest
    table_end = start + fmt.size + 12 * n_seg
    struct.pack_into("<I", blob, table_end, zlib.crc32(bytes(blob[start:table_end])))
    with pytest.raises(ChecksumError):
        codec.decompress(bytes(blob))


def test_bad_settings_are_usage_errors():
    with pytest.raises(UsageError):
        Codec(method="magic").compress(b"x")
    with pytest.raises(UsageError):
        Codec(context=4).compress(b"x")
    with pytest.raises(LMCodecError):
        Codec("/no/such/model").compress(b"x")


def test_every_error_is_an_lmcodec_error():
    for exc in (ArchiveError, TruncatedArchiveError, ModelMismatchError, PromptMismatchError, UsageError):
        assert issubclass(exc, LMCodecError)


_SUBPROCESS = """
import sys, os
import lmcodec
data = open(sys.argv[2], 'rb').read()
c = lmcodec.Codec(segment_tokens=24, batch_size=int(sys.argv[3]), context=32, threads=2)
if sys.argv[1] == 'compress':
    open(sys.argv[4], 'wb').write(c.compress(data, prompt='key'))
else:
    sys.stdout.write('OK' if c.decompress(open(sys.argv[4], 'rb').read(), prompt='key') == data else 'BAD')
"""


@pytest.mark.parametrize("encode_threads,decode_threads,batch", [("2", "1", "3"), ("1", "2", "1")])
def test_decoder_in_another_process_with_other_thread_settings(tmp_path, encode_threads, decode_threads, batch):
    """The archive fixes the thread count; the decoder's environment must not matter."""
    src = tmp_path / "in.txt"
    src.write_bytes(TEXT * 2 + "naïve café ☕\n".encode())
    arc = tmp_path / "in.lmc"
    base = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", _SUBPROCESS, "compress", src, batch, arc], check=True,
                   env={**base, "OMP_NUM_THREADS": encode_threads, "MKL_NUM_THREADS": encode_threads})
    out = subprocess.run([sys.executable, "-c", _SUBPROCESS, "decompress", src, batch, arc], check=True,
                         capture_output=True, text=True,
                         env={**base, "OMP_NUM_THREADS": decode_threads, "MKL_NUM_THREADS": decode_threads})
    assert out.stdout == "OK"


def test_huge_prompt_costs_only_its_tail(codec):
    """Only the prompt's tail is tokenized; the whole prompt still keys the archive."""
    big = b"the quick brown fox jumps over the lazy dog. " * 50_000  # 2.2 MB
    blob = codec.compress(TEXT, prompt=big)
    assert codec.decompress(blob, prompt=big) == TEXT
    with pytest.raises(PromptMismatchError):
        codec.decompress(blob, prompt=b"X" + big[1:])
    assert all(len(p) <= FAST["context"] // 2 for p in codec._prefixes.values())


def test_forged_token_count_is_refused_before_the_model_runs(codec):
    """A 4-byte payload cannot hold a million tokens: refuse instead of running for hours."""
    import io

    from lmcodec.container import Block, End, Header, Method, digest, prompt_check

    honest = Reader_header(codec.compress(TEXT))
    n = 1 << 20
    header = Header(honest.model_name, honest.model_fingerprint, honest.tokenizer_fingerprint,
                    prompt_check(None), False, "cpu", "float32", 2, 1, 32, n, 16, 4 << 20)
    raw = b"a" * n
    block = Block.build(Method.LM, raw, [bytes(4)], [n])
    blob = header.pack() + block.pack() + End(n, digest(raw), 1).pack()
    with pytest.raises(CorruptArchiveError, match="more than its 4-byte payload"):
        codec.decompress_stream(io.BytesIO(blob), io.BytesIO(), size=len(blob))


def test_decompress_from_a_pipe_path(tmp_path):
    """A FIFO reports size 0; the CLI must treat it as a stream of unknown length."""
    arc = tmp_path / "a.lmc"
    arc.write_bytes(Codec(method="zstd").compress(TEXT))
    r = subprocess.run(["bash", "-c", f"{sys.executable} -m lmcodec.cli -q decompress -c <(cat {arc})"],
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == TEXT
