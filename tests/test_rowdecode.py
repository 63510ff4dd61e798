"""The scheduled decoder: any admission order, any row count, the same symbols.

Archives are what the encoder writes (unchanged); decoding them with the batch
kept full (lmcodec.coding.rowdecode: rows refilled as segments end, rows at their own
positions) must give back exactly the encoded symbols whatever order streams
are admitted in and however many rows there are.  A 2-layer model keeps it fast.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import archive_blocks, load_tiny

from lmcodec import Codec
from lmcodec.coding.mixing import ALL, MixerConfig
from lmcodec.coding.rowdecode import decode_streams
from lmcodec.coding.runner import prefill
from lmcodec.engine.engine import Engine
from lmcodec.format.container import Method, stream_groups

TEXT = (b"It was the best of times, it was the worst of times, it was the age of wisdom, "
        b"it was the age of foolishness; 12345 \xff\xfe end.\n")
SETTINGS = dict(method="lm", segment_tokens=7, lanes=2, context=16, mixer=ALL, threads=2)


@pytest.fixture(scope="module")
def archive(tiny_model_dir):
    codec = Codec(tiny_model_dir, **SETTINGS)
    blob = codec.compress(TEXT)
    assert codec.decompress(blob) == TEXT          # the codec's own decoder
    im, tok = load_tiny(tiny_model_dir)
    header, blocks = archive_blocks(blob)
    assert len(blocks) == 1 and blocks[0].method == Method.LM
    return im, tok, header, blocks[0]


@pytest.mark.parametrize("halves", [1, 2])
@pytest.mark.parametrize("rows,order", [(2, None), (2, "reversed"), (3, "shuffled"), (4, "reversed"), (5, "shuffled"),
                                        (64, None)])
def test_any_admission_order_and_row_count_decode_the_same_symbols(archive, rows, order, halves):
    """halves=2: the streams split over two sets of rows taking turns (rowdecode.Overlap;
    asynchronous on CUDA, in turn here)."""
    im, tok, header, block = archive
    lengths = list(block.tokens)
    groups = stream_groups(len(lengths), header.lanes)
    assert len(groups) >= 3 and len(set(lengths)) == 2     # several streams, a short last segment
    perm = {None: None, "reversed": list(range(len(groups)))[::-1],
            "shuffled": list(np.random.default_rng(rows).permutation(len(groups)))}[order]
    engine = Engine(im, "cpu")
    ticks = []
    with torch.inference_mode():
        pre = prefill(engine, [tok.start_token])
        symbols = decode_streams(engine, pre, groups, block.payloads, lengths, header.context, tok,
                                 MixerConfig(header.mixer), rows, perm, ticks.append, halves=halves)
    assert np.array_equal(np.concatenate(symbols), tok.encode(TEXT))
    assert sum(ticks) == sum(lengths) and max(ticks) <= max(rows, header.lanes)


@pytest.mark.parametrize("guesses", [0, 8])
def test_cudas_plain_path_on_cpu_tensors_decodes_the_same_symbols(tiny_model_dir, monkeypatch, guesses):
    """Streams without online models on CUDA keep the gaps on the device and move only bucket masses and
    the chosen buckets' weights (coding.devicepass): the same symbols as the CPU's whole-pass decode,
    with several streams sharing rows, lanes ending, guesses held and missed, and a damaged payload
    refused as the CPU's path refuses it."""
    from lmcodec.coding import rowdecode
    from lmcodec.errors import CorruptArchiveError

    data = TEXT * 3
    blob = Codec(tiny_model_dir, **dict(SETTINGS, mixer=0), guesses=0).compress(data)
    im, tok = load_tiny(tiny_model_dir)
    header, (block,) = archive_blocks(blob)
    lengths = list(block.tokens)
    groups = stream_groups(len(lengths), header.lanes)
    engine = Engine(im, "cpu")
    got = {}
    with torch.inference_mode():
        pre = prefill(engine, [tok.start_token])
        for device in (False, True):
            monkeypatch.setattr(rowdecode.Rows, "device_plain", device)
            stats = rowdecode.DecodeStats()
            symbols = decode_streams(engine, pre, groups, block.payloads, lengths, header.context, tok,
                                     MixerConfig(0), 3, guesses=guesses, stats=stats)
            bad = [bytes(p[:4]) + bytes(reversed(p[4:])) for p in block.payloads]
            try:
                damaged = np.concatenate(decode_streams(engine, pre, groups, bad, lengths, header.context, tok,
                                                        MixerConfig(0), 3, guesses=guesses)).tolist()
            except CorruptArchiveError as exc:
                damaged = str(exc)
            got[device] = (np.concatenate(symbols).tolist(), stats.tried, stats.held, damaged)
    assert got[True][0] == tok.encode(data).tolist() and got[True] == got[False]
    assert got[True][3] != got[True][0]


def test_streams_are_dealt_by_tokens_in_admission_order():
    from lmcodec.coding.rowdecode import split_streams

    groups = [range(0, 2), range(2, 3), range(3, 5), range(5, 6)]
    lengths = [10, 10, 30, 5, 5, 1]
    assert split_streams(groups, lengths, [0, 1, 2, 3], 2) == [[0, 2, 3], [1]]   # 20 | 30; 10 -> 30 | 30; tie: first
    assert split_streams(groups, lengths, [3, 2, 1, 0], 2) == [[3, 1], [2, 0]]
    assert split_streams(groups, lengths, [0, 1], 1) == [[0, 1]]
    assert split_streams(groups[:1], lengths, [0], 2) == [[0]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (scripts/gpu/check.sh runs it)")
def test_cuda_halves_on_their_own_streams_decode_the_same_symbols(archive):
    """On CUDA: two row sets on their own streams (GraphStep each), and the encoder's batched
    pass, give the CPU's symbols and rows."""
    from lmcodec.coding import runner

    im, tok, header, block = archive
    lengths = list(block.tokens)
    groups = stream_groups(len(lengths), header.lanes)
    engine = Engine(im, "cuda")
    with torch.inference_mode():
        pre = prefill(engine, [tok.start_token])
        for halves in (1, 2):
            symbols = decode_streams(engine, pre, groups, block.payloads, lengths, header.context, tok,
                                     MixerConfig(header.mixer), 4, halves=halves)
            assert np.array_equal(np.concatenate(symbols), tok.encode(TEXT))
        ids = tok.model_inputs(tok.encode(TEXT))
        inputs = [ids[:30], ids[5:12], ids[:0]]
        cpu = Engine(im, "cpu")
        cpu_pre = prefill(cpu, [tok.start_token])
        for rows, x in zip(runner.batch_rows(runner.score_batch(engine, pre, inputs, header.context), 3), inputs):
            h, e = runner.score_segment(cpu, cpu_pre, x, header.context)
            hc, ec = rows.take(0, len(x) + 1)
            assert torch.equal(hc.cpu(), h) and torch.equal(ec.cpu(), e)
