"""Round trips through the real default model (SmolLM2-135M), and every way they can fail."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import FAST, SAMPLES

import lmcodec
from lmcodec import Codec
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
from lmcodec.format.container import Method, stream_groups
from lmcodec.format.reader import Reader

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
    # Range coder flush costs up to a few words per stream; far from 0.5% on tiny streams
    # but bounded: at most 8 bytes per stream (``lanes`` segments) over the ideal.
    n_segments = -(-stats.tokens // FAST["segment_tokens"])
    n_streams = len(stream_groups(n_segments, FAST["lanes"]))
    assert stats.model_bits / 8 <= stats.lm_payload_bytes <= stats.model_bits / 8 + 8 * n_streams


def test_defaults_round_trip(loaded_model):
    c = Codec()
    blob = c.compress(TEXT)
    assert c.decompress(blob) == TEXT
    assert lmcodec.decompress(blob) == TEXT


def test_sliding_window_and_many_batches(codec):
    """Segments far longer than the context (ring buffer), more streams than a decoder batch."""
    c = Codec(segment_tokens=70, lanes=1, context=20, threads=2, decode_rows=2)
    data = TEXT * 4
    blob = c.compress(data)
    assert len(c.layout(c.last_stats.tokens, 70)) >= 3
    assert c.decompress(blob) == data


def test_block_boundaries(codec):
    c = Codec(block_size=4096, **{**FAST, "lanes": 64})
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


def test_same_model_under_another_name_decodes(tiny_model_dir, tmp_path):
    """The fingerprint is the integer engine's model (weights, tables, tokenizer), not
    the path: a copy of the model directory under a new name decodes the archive."""
    import shutil

    other = Codec(tiny_model_dir, method="lm", **FAST)
    blob = other.compress(TEXT)
    header = Reader_header(blob)
    assert header.model_name == tiny_model_dir.name
    copy = tmp_path / "renamed-tiny-llama"
    shutil.copytree(tiny_model_dir, copy)
    assert Codec(copy).decompress(blob) == TEXT
    blob2 = Codec(copy, method="lm", **FAST).compress(TEXT)
    assert Reader_header(blob2).model_fingerprint == header.model_fingerprint
    assert Codec(tiny_model_dir).decompress(blob2) == TEXT


def test_archive_names_the_model_directory_it_was_given(tiny_model_dir, tmp_path):
    """Two paths with the same files share one loaded model, but each archive names its own."""
    import shutil

    Codec(tiny_model_dir, method="lm", **FAST).compress(TEXT)  # loads (and names) the original first
    copy = tmp_path / "renamed-tiny-llama"
    shutil.copytree(tiny_model_dir, copy)
    blob = Codec(copy, method="lm", **FAST).compress(TEXT)
    assert Reader_header(blob).model_name == "renamed-tiny-llama"


def Reader_header(blob):
    import io

    return Reader(io.BytesIO(blob), len(blob)).header()


def test_truncated_archive(codec):
    blob = codec.compress(TEXT)
    for cut in (0, 3, 10, len(blob) // 2, len(blob) - 1):
        with pytest.raises(ArchiveError):
            codec.decompress(blob[:cut])


def test_flipped_payload_bit_is_caught(codec):
    """A one-block archive (the short form) finds it by its check after decoding, as a ChecksumError
    (or a symbol the alphabet does not have); the general form by a payload CRC before decoding."""
    blob = bytearray(codec.compress(TEXT))
    blob[-2] ^= 0x10   # the payload is the archive's last bytes
    with pytest.raises(CorruptArchiveError):
        codec.decompress(bytes(blob))


def test_trailing_garbage(codec):
    with pytest.raises(CorruptArchiveError, match="trailing"):
        codec.decompress(codec.compress(b"abc") + b"x")


def test_checksum_catches_a_wrong_decode(codec):
    """An archive whose check is wrong (a block digest, or the short form's one check) is refused
    after decoding: the decoder must refuse, not return bytes."""
    import io

    blob = bytearray(codec.compress(TEXT))
    reader = Reader(io.BytesIO(bytes(blob)), len(blob))
    block = reader.next(reader.header())
    assert reader.short_form and block.method == Method.LM and len(block.check) == 4
    assert len(block.streams) == len(stream_groups(len(block.tokens), FAST["lanes"]))
    check_at = len(blob) - sum(len(p) for p in block.payloads) - 4   # the check, then the payloads
    assert blob[check_at:check_at + 4] == block.check
    blob[check_at] ^= 0xFF
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
c = lmcodec.Codec(segment_tokens=24, lanes=2, context=32, threads=int(sys.argv[3]), decode_rows=int(sys.argv[5]))
if sys.argv[1] == 'compress':
    open(sys.argv[4], 'wb').write(c.compress(data, prompt='key'))
else:
    sys.stdout.write('OK' if c.decompress(open(sys.argv[4], 'rb').read(), prompt='key') == data else 'BAD')
"""


@pytest.mark.parametrize("encode_threads,decode_threads,decode_rows", [("2", "1", "1"), ("1", "2", "3")])
def test_decoder_in_another_process_with_other_thread_settings(tmp_path, encode_threads, decode_threads,
                                                               decode_rows):
    """Nothing about the encoder's machine is recorded: another process with another
    OMP_NUM_THREADS, thread count and decoder batch decodes the archive."""
    src = tmp_path / "in.txt"
    src.write_bytes(TEXT * 2 + "naïve café ☕\n".encode())
    arc = tmp_path / "in.lmc"
    base = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", _SUBPROCESS, "compress", src, encode_threads, arc, "64"], check=True,
                   env={**base, "OMP_NUM_THREADS": encode_threads, "MKL_NUM_THREADS": encode_threads})
    out = subprocess.run([sys.executable, "-c", _SUBPROCESS, "decompress", src, decode_threads, arc, decode_rows],
                         check=True, capture_output=True, text=True,
                         env={**base, "OMP_NUM_THREADS": decode_threads, "MKL_NUM_THREADS": decode_threads})
    assert out.stdout == "OK"
    # The encoder is deterministic too: this process, with its own threads, writes the same bytes.
    here = Codec(segment_tokens=24, lanes=2, context=32, threads=2).compress(src.read_bytes(), prompt="key")
    assert here == arc.read_bytes()


@pytest.fixture(scope="module")
def multi_stream():
    """An archive with several streams of several segments, and a partial last stream."""
    data = PROSE + "naïve café ☕ 中文\n".encode()
    c = Codec(segment_tokens=10, lanes=4, context=24, threads=2)
    blob = c.compress(data)
    block = _blocks(blob)[0]
    assert block.method.name == "LM" and len(block.tokens) == 9 and len(block.streams) == 3
    assert block.tokens[-1] < 10  # a short last segment, alone in the last stream
    return data, blob


def _blocks(blob):
    import io

    from lmcodec.format.container import End

    reader = Reader(io.BytesIO(blob), len(blob))
    header = reader.header()
    out = []
    while not isinstance(rec := reader.next(header), End):
        out.append(rec)
    return out


@pytest.mark.parametrize("decode_rows", [1, 5, 8, 9, 64])
@pytest.mark.parametrize("threads", [1, 2])
def test_any_decoder_batch_and_thread_count_decodes(multi_stream, decode_rows, threads):
    """decode_rows and threads are the decoder's own choice: every choice gives the original.

    Streams of 4, 4 and 1 segments: rows 1 decodes one stream at a time, 5 the
    first alone then the other two, 8 two then one, 9 and 64 all three at once."""
    data, blob = multi_stream
    assert Codec(threads=threads, decode_rows=decode_rows).decompress(blob) == data


def test_encoder_threads_do_not_change_the_archive(multi_stream):
    data, blob = multi_stream
    for threads in (1, 2, 3):
        assert Codec(segment_tokens=10, lanes=4, context=24, threads=threads).compress(data) == blob


def test_lanes_change_the_streams_not_the_model_bits():
    """Lanes only regroup segments into streams: the LM's coding frequencies, hence the
    model's code length, are the same; every layout decodes.  (The online models learn
    per stream, so with them the bits depend on the lanes: mixer 0 here.)"""
    data = TEXT * 2
    runs = {}
    for lanes in (1, 2, 5, 4096):
        c = Codec(segment_tokens=12, lanes=lanes, context=24, threads=2, method="lm", mixer=0)
        blob = c.compress(data)
        runs[lanes] = (blob, c.last_stats)
        n_seg = len(_blocks(blob)[0].tokens)
        assert len(_blocks(blob)[0].streams) == -(-n_seg // lanes)
        assert Codec(threads=2, decode_rows=2).decompress(blob) == data
    bits = {round(st.model_bits, 6) for _, st in runs.values()}
    assert len(bits) == 1, bits
    assert runs[1][1].lm_payload_bytes >= runs[4096][1].lm_payload_bytes


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cpu_archive_decodes_on_cuda_and_back(multi_stream):
    data, blob = multi_stream
    assert Codec(device="cuda").decompress(blob) == data
    gpu = Codec(segment_tokens=10, lanes=4, context=24, device="cuda").compress(data)
    assert gpu == blob
    assert Codec(device="cpu", threads=2).decompress(gpu) == data


def test_huge_prompt_costs_only_its_tail(codec):
    """Only the prompt's tail is tokenized; the whole prompt still keys the archive."""
    big = b"the quick brown fox jumps over the lazy dog. " * 50_000  # 2.2 MB
    blob = codec.compress(TEXT, prompt=big)
    assert codec.decompress(blob, prompt=big) == TEXT
    with pytest.raises(PromptMismatchError):
        codec.decompress(blob, prompt=b"X" + big[1:])
    assert all(len(p) <= FAST["context"] // 2 for p in codec.models._prefixes.values())


def test_forged_token_count_is_refused_before_the_model_runs(codec):
    """A 4-byte payload cannot hold a million tokens: refuse instead of running for hours."""
    import io

    from lmcodec.format.container import Block, End, Header, Method, digest, pack_short, prompt_check

    honest = Reader_header(codec.compress(TEXT))
    n = 1 << 20
    header = Header(honest.model_name, honest.model_fingerprint, honest.tokenizer_fingerprint,
                    prompt_check(None), False, 32, n, 16, 4 << 20)
    raw = b"a" * n
    block = Block.build(Method.LM, raw, [bytes(4)], [n])
    blob = header.pack() + block.pack() + End(n, digest(raw), 1).pack()
    with pytest.raises(CorruptArchiveError, match="more tokens than its 4-byte payload"):
        codec.decompress_stream(io.BytesIO(blob), io.BytesIO(), size=len(blob))
    short = pack_short(header, block, raw)   # the same block in the short form (one check, no CRCs)
    with pytest.raises(CorruptArchiveError, match="more tokens than its 4-byte payload"):
        codec.decompress_stream(io.BytesIO(short), io.BytesIO(), size=len(short))


def test_decompress_from_a_pipe_path(tmp_path):
    """A FIFO reports size 0; the CLI must treat it as a stream of unknown length."""
    arc = tmp_path / "a.lmc"
    arc.write_bytes(Codec(method="zstd").compress(TEXT))
    r = subprocess.run(["bash", "-c", f"{sys.executable} -m lmcodec.cli.main -q decompress -c <(cat {arc})"],
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == TEXT
