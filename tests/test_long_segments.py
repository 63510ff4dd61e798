"""Segments past the model's trained positions: the prefix moves along (runner.sink_base).

A 2-layer random Llama trained on only 16 positions makes the moves happen every
4 positions, so the parallel pass, the lockstep steps and the codec meet many of
them in a few dozen tokens; both are checked against the independent reference.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import load_tiny, make_tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcodec import Codec
from lmcodec.coding import runner, steps
from lmcodec.coding.mixing import ALL
from lmcodec.engine.engine import Engine
from lmcodec.engine.spec import fixedmath
from lmcodec.engine.spec.reference import reference_run, sink_at

TEXT = (b"It was the best of times, it was the worst of times, it was the age of wisdom, "
        b"it was the age of foolishness, it was the epoch of belief.\n")


@pytest.fixture(scope="module")
def short_model_dir(tmp_path_factory, loaded_model):
    """A real model with 16 trained positions (SmolLM2's tokenizer, random weights)."""
    return make_tiny_llama(tmp_path_factory.mktemp("short-llama"), loaded_model, max_positions=16, seed=1)


@pytest.fixture(scope="module")
def short(short_model_dir):
    im, tok = load_tiny(short_model_dir)
    assert im.arch.max_position_embeddings == 16
    return im, tok


@given(p=st.integers(0, 1 << 27), prefix=st.integers(1, 4096), trained=st.integers(4, 1 << 16))
@settings(max_examples=300, deadline=None)
def test_sink_base_keeps_every_query_near_the_sink(p, prefix, trained):
    p += prefix
    d = runner.sink_base(p, prefix, trained)
    assert d == sink_at(p, prefix, trained)                       # engine side = reference side
    assert 0 <= p - d < prefix + trained                          # within trained positions of the sink
    q = runner.sink_step(trained)
    assert (d == 0) == (p < prefix + 4 * q)                       # nothing moves within the first 4q
    nxt = runner.next_sink_move(p, prefix, trained)
    assert nxt > p and runner.sink_base(nxt, prefix, trained) != d
    assert runner.sink_base(nxt - 1, prefix, trained) == d


def test_rope_rows_do_not_depend_on_the_range():
    full_cos, full_sin = fixedmath.rope_tables(Fraction(100000), 64, 9000)
    for start, n in [(0, 100), (64, 1), (8190, 810), (4097, 33)]:
        cos, sin = fixedmath.rope_tables(Fraction(100000), 64, n, start)
        assert np.array_equal(cos, full_cos[start:start + n]) and np.array_equal(sin, full_sin[start:start + n])


@pytest.mark.parametrize("prompt_tokens", [0, 2])
def test_long_segment_equals_reference(short, prompt_tokens, monkeypatch):
    """Pass (chunks of 5, not aligned to the moves) and steps past 16 positions equal the reference."""
    im, tok = short
    symbols = tok.encode(TEXT)[:44]
    inputs = tok.model_inputs(symbols)
    prefix = [tok.start_token] + tok.model_inputs(tok.encode(b"Dickens: "))[:prompt_tokens].tolist()
    context = 9
    lam, exp = reference_run(im, prefix + inputs[:-1].tolist(), len(prefix), context, trained=16)
    lam, exp = lam[len(prefix) - 1:], exp[len(prefix) - 1:]
    engine = Engine(im, "cpu")
    monkeypatch.setattr(runner, "SCORE_CHUNK", 5)
    with torch.inference_mode():
        pre = runner.prefill(engine, prefix)
        h, e = runner.score_segment(engine, pre, inputs[:-1], context)
        run = steps.Lockstep(engine, pre, 2, context, len(symbols))
        stepped = []
        for t in range(len(symbols)):
            stepped.append(engine.logits(run.h[0:1], run.e[0:1]).lam.numpy()[0])
            run.advance(np.array([inputs[t], 7]))
    lg = engine.logits(h, e)
    assert np.array_equal(lg.lam.numpy(), lam) and np.array_equal(lg.exp.numpy().reshape(-1), exp)
    assert np.array_equal(np.stack(stepped), lam)
    # The moves matter: without them the same pass gives other logits past position P + 16.
    plain, _ = reference_run(im, prefix + inputs[:-1].tolist(), len(prefix), context)
    plain = plain[len(prefix) - 1:]
    assert np.array_equal(plain[:16], lam[:16]) and not np.array_equal(plain, lam)


def test_segment_rows_stream_what_the_pass_computes(short, monkeypatch):
    """SegmentRows pulls score_chunks' chunks as asked and gives the rows score_segment gives."""
    im, tok = short
    inputs = tok.model_inputs(tok.encode(TEXT * 2))[:40]
    engine = Engine(im, "cpu")
    monkeypatch.setattr(runner, "SCORE_CHUNK", 5)
    with torch.inference_mode():
        pre = runner.prefill(engine, [tok.start_token])
        h, e = runner.score_segment(engine, pre, inputs, 16)
        rows = runner.SegmentRows(runner.score_chunks(engine, pre, inputs, 16))
        for t0, t1 in [(0, 3), (3, 9), (9, 24), (30, 41)]:
            ht, et = rows.take(t0, t1)
            assert torch.equal(ht, h[t0:t1]) and torch.equal(et, e[t0:t1])
        with pytest.raises(ValueError):
            rows.take(41, 41)
    assert len(h) == len(inputs) + 1


@pytest.mark.parametrize("lanes", [1, 2])
@pytest.mark.parametrize("eager_rows", [1 << 16, 8])
def test_codec_round_trip_past_the_trained_positions(short_model_dir, lanes, eager_rows, monkeypatch):
    """One segment of a whole block (as levels 8 and 9 do), online models on, a prompt too;
    the encoder scoring segments at once or streaming them chunk by chunk."""
    from lmcodec.coding import encoder as encoder_module

    monkeypatch.setattr(encoder_module, "EAGER_ROWS", eager_rows)
    monkeypatch.setattr(runner, "SCORE_CHUNK", 7)
    data = TEXT * 2
    c = Codec(short_model_dir, method="lm", segment_tokens=70, context=16, lanes=lanes, threads=2, mixer=ALL)
    for prompt in (None, b"A Tale of Two Cities"):
        blob = c.compress(data, prompt=prompt)
        assert Codec(short_model_dir).decompress(blob, prompt=prompt) == data


def test_blocks_of_one_segment_decode_side_by_side(short_model_dir):
    """Several one-segment blocks: the decoder gathers them into one lockstep batch (or not)."""
    data = b"".join(b"%d. " % i + TEXT for i in range(40))          # ~6 KB: two 4 KiB blocks
    c = Codec(short_model_dir, method="lm", segment_tokens=64 << 20, context=16, lanes=1, threads=2,
              block_size=4096, mixer=ALL)
    blob = c.compress(data)
    assert c.last_stats.methods == ["lm", "lm"]
    for rows in (1, 64):
        assert Codec(short_model_dir, decode_rows=rows, threads=2).decompress(blob) == data


def test_a_batch_pass_gives_each_segment_its_own_rows(short, monkeypatch):
    """score_batch: segments of different lengths side by side (padded past their ends), past
    the trained positions and through window slides, each get the rows of a pass of their own."""
    im, tok = short
    ids = tok.model_inputs(tok.encode(TEXT * 2))
    inputs = [ids[:40], ids[7:30], ids[3:4], ids[:0], ids[11:52]]
    engine = Engine(im, "cpu")
    monkeypatch.setattr(runner, "SCORE_CHUNK", 6)
    with torch.inference_mode():
        pre = runner.prefill(engine, [tok.start_token])
        alone = [runner.score_segment(engine, pre, x, 16) for x in inputs]
        rows = runner.batch_rows(runner.score_batch(engine, pre, inputs, 16), len(inputs))
        for (h, e), r, x in zip(alone, rows, inputs):
            assert len(h) == len(x) + 1
            ht, et = r.take(0, len(x) + 1)
            assert torch.equal(ht, h) and torch.equal(et, e)


@pytest.mark.parametrize("eager_rows", [1 << 16, 8])
def test_segments_scored_side_by_side_make_the_same_archive(short_model_dir, eager_rows, monkeypatch):
    """The encoder's batch of segments per pass (SCORE_CHUNKS: a GPU's fill) changes no byte."""
    from lmcodec.coding import encoder as encoder_module

    monkeypatch.setattr(encoder_module, "EAGER_ROWS", eager_rows)
    monkeypatch.setattr(runner, "SCORE_CHUNK", 7)
    data = TEXT * 2
    c = Codec(short_model_dir, method="lm", segment_tokens=40, context=16, lanes=4, threads=2, mixer=ALL)
    monkeypatch.setattr(encoder_module, "SCORE_CHUNKS", {"cpu": 1})        # one segment a pass
    one = c.compress(data)
    monkeypatch.setattr(encoder_module, "SCORE_CHUNKS", {"cpu": 1 << 20})  # a stream's segments together
    assert c.compress(data) == one
    assert Codec(short_model_dir).decompress(one) == data


def test_a_prompt_is_run_once_for_many_files(short_model_dir):
    """ModelCache.prefill: files coded with one prompt share its run prefix, and the archives
    are those of a codec that runs it afresh for each file."""
    prompt = b"A Tale of Two Cities, by Charles Dickens. " * 3
    files = [TEXT[:60], TEXT[60:130], TEXT[:60]]
    shared = Codec(short_model_dir, method="lm", context=64, threads=2)
    blobs = [shared.compress(f, prompt=prompt) for f in files]
    assert len(shared.models._prefilled) == 1
    for f, blob in zip(files, blobs):
        assert Codec(short_model_dir, method="lm", context=64, threads=2).compress(f, prompt=prompt) == blob
        assert shared.decompress(blob, prompt=prompt) == f
    assert len(shared.models._prefilled) == 1          # the decoder found it too
