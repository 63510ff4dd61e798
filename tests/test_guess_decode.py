"""Exact speculative decoding (guess and verify): the guesses change how many passes, never a symbol.

The decoder may feed a row its last token plus guessed ones in one pass
(lmcodec.coding.rowdecode.Rows, lmcodec.coding.draft); tests/test_verify_pass.py proves the
engine's half (a pass over guessed positions equals single steps).  Here the whole decoder:
archives written by the encoder (unchanged) decode to the same symbols with guesses off, with
the real drafts, and with drafts corrupted at random and widths forced at random (rejections at
every place, rows of one pass with different guesses), across the ring phase of the cache and
moves of the prefix, with several lanes a stream and several streams sharing rows, with a
prompt.  A 2-layer model keeps it fast; the drafts do not depend on the model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import archive_blocks, guessed_passes, load_tiny, make_tiny_llama

from lmcodec import Codec
from lmcodec.coding import draft, draftbank, rowdecode
from lmcodec.coding.mixing import ALL, MixerConfig
from lmcodec.coding.runner import prefill
from lmcodec.coding.settings import DecodeStats
from lmcodec.coding.steps import GraphStep, RowStep
from lmcodec.coding.tokens import ByteTokenizer
from lmcodec.engine.engine import Engine
from lmcodec.engine.model import registry as models
from lmcodec.engine.model.quantize import load_int_model
from lmcodec.format.container import stream_groups

RECORD = b'{"name": "ListObjects", "input_token": "Marker", "output_token": "NextMarker", "limit_key": "MaxKeys"}\n'
TEXT = RECORD * 4 + b"Then something else entirely, \xff\xfe\x00 bytes and all.\n" + RECORD * 2


@pytest.fixture(scope="module")
def short_model(tmp_path_factory, loaded_model):
    """Trained positions 64: segments past them move the prefix (runner.sink_base)."""
    return make_tiny_llama(tmp_path_factory.mktemp("guess-llama"), loaded_model, max_positions=64, seed=3)


def blocks_of(model_dir, data: bytes, prompt: bytes | None = None, **settings):
    codec = Codec(model_dir, method="lm", mixer=ALL, threads=2, guesses=0, **settings)
    blob = codec.compress(data, prompt)
    im, tok = load_tiny(model_dir)
    header, blocks = archive_blocks(blob)
    return codec, blob, im, tok, header, blocks


def decode(im, tok, header, block, rows: int, guesses: int, prefix: list[int]) -> tuple[np.ndarray, DecodeStats]:
    lengths = list(block.tokens)
    groups = stream_groups(len(lengths), header.lanes)
    stats = DecodeStats()
    engine = Engine(im, "cpu")
    with torch.inference_mode():
        pre = prefill(engine, prefix)
        symbols = rowdecode.decode_streams(engine, pre, groups, block.payloads, lengths, header.context, tok,
                                           MixerConfig(header.mixer), rows, guesses=guesses, stats=stats)
    return np.concatenate(symbols), stats


@pytest.fixture
def scrambled(monkeypatch):
    """Drafts corrupted at random (a wrong token at a random place, random lengths, guesses where no
    match was found) and the pass width drawn at random: guesses rejected at every place, rows with
    different k.  The decoder's drafts are a DraftBank: what its plan proposes is scrambled after the
    real proposals were watched (scored), so only what is fed changes."""
    rng = np.random.default_rng(17)
    real = draftbank.DraftBank.plan

    def plan(self, pushed, symbols, slots, spans, most):
        guesses, counts, _, _ = real(self, pushed, symbols, slots, spans, most)
        guesses, counts = guesses.copy(), counts.copy()
        for i in range(len(slots)):
            m, c = int(most[i]), int(counts[i])
            if not c and m and rng.random() < 0.3:
                c = int(rng.integers(1, m + 1))
                guesses[i, :c] = rng.integers(0, 49152, c)
            elif c and rng.random() < 0.3:
                c = int(rng.integers(0, c + 1))
            if c and rng.random() < 0.4:
                guesses[i, int(rng.integers(0, c))] = int(rng.integers(0, 49152))
            counts[i] = c
        stream = np.array([counts[a:b].min() for a, b in zip(spans[:-1], spans[1:])], dtype=np.int64)
        return guesses, counts, stream, np.full((len(stream), guesses.shape[1]), 0.5)

    monkeypatch.setattr(draftbank.DraftBank, "plan", plan)
    monkeypatch.setattr(rowdecode, "choose_width", lambda live, rows, chances, cost, most:
                        int(rng.integers(1, 2 + min(most, max(len(c) for c in chances)))))


@pytest.mark.parametrize("lanes,segment,rows", [(1, 4096, 1), (2, 40, 3), (1, 30, 4)])
def test_guesses_change_no_symbol(tiny_model_dir, lanes, segment, rows, scrambled):
    codec, blob, im, tok, header, blocks = blocks_of(tiny_model_dir, TEXT, lanes=lanes, segment_tokens=segment,
                                                     context=512)
    want = tok.encode(TEXT)
    plain, s0 = decode(im, tok, header, blocks[0], rows, 0, [tok.start_token])
    got, s8 = decode(im, tok, header, blocks[0], rows, 8, [tok.start_token])
    assert np.array_equal(plain, want) and np.array_equal(got, want)
    assert s0.tried == 0 and s0.tokens == len(want)
    assert s8.tokens == len(want) and s8.held > 0 and s8.tried > s8.held     # guesses held and failed
    assert s8.row_passes < s0.row_passes


@pytest.mark.parametrize("level", range(1, 10))
def test_every_level_decodes_the_same_with_guesses(tiny_model_dir, level, scrambled):
    """Each level's settings (segments, lanes, context, online models) through the public API:
    the archive written with guesses off decodes to the input with corrupted drafts and random widths."""
    data = TEXT
    blob = Codec(tiny_model_dir, level=level, method="lm", threads=1, guesses=0).compress(data)
    c = Codec(tiny_model_dir, level=level, method="lm", threads=1, guesses=8)
    assert c.decompress(blob) == data
    stats = c.last_decode
    assert stats.tokens > 0 and stats.held > 0 and stats.tried > stats.held and stats.row_passes < stats.tokens


def test_guesses_across_the_ring_and_prefix_moves(short_model, scrambled):
    """One segment of ~300 tokens in a context of 40 on a model trained to 64 positions: the
    cache turns into a ring (its spare slots take the guesses) and the prefix moves every 16."""
    data = RECORD * 12
    codec, blob, im, tok, header, blocks = blocks_of(short_model, data, segment_tokens=100000, context=40)
    assert blocks[0].tokens[0] > 200
    got, stats = decode(im, tok, header, blocks[0], 1, 8, [tok.start_token])
    assert np.array_equal(got, tok.encode(data)) and stats.held > 0


def test_graph_step_takes_the_same_guessed_passes(short_model):
    """GraphStep (the CUDA step; eager here) with guesses: static inputs per width, the whole
    context as its cache, and every output RowStep gives, through the ring and prefix moves."""
    loaded = models.load(short_model)
    tok = ByteTokenizer(loaded.tokenizer, loaded.arch.vocab_size)
    engine = Engine(load_int_model(loaded, tok.fingerprint), "cpu")
    outs = []
    with torch.inference_mode():
        pre = prefill(engine, [tok.start_token, 5])
        for step in (RowStep, GraphStep):
            outs.append(guessed_passes(step(engine, pre, 3, 40, 150, spare=8), tok.vocab_size, 60, seed=4))
    for (h1, e1), (h2, e2) in zip(*outs):
        assert torch.equal(h1, h2) and torch.equal(e1, e2)


def test_room_keeps_guesses_between_prefix_moves_and_below_the_bound(short_model):
    loaded = models.load(short_model)
    tok = ByteTokenizer(loaded.tokenizer, loaded.arch.vocab_size)
    engine = Engine(load_int_model(loaded, tok.fingerprint), "cpu")
    with torch.inference_mode():
        pre = prefill(engine, [tok.start_token, 5])            # P = 2; prefix moves at 2 + 16 k for k >= 4
        run = RowStep(engine, pre, 4, 40, 200, spare=8)        # window 38 in a ring of 46, bound 202
        run.position[:] = [2, 35, 60, 198]
        # 8 spare (in the ring too); the prefix moves at 66; the bound
        assert run.room([0, 1, 2, 3]).tolist() == [8, 8, 5, 3]
        run.position[:] = [2, 2, 2, 2]
        with pytest.raises(ValueError):
            run.advance(np.zeros((4, 10), dtype=np.int64), guesses=np.array([9, 0, 0, 0]))
        run.position[:] = [2, 65, 2, 2]                        # across the prefix's move at 66
        with pytest.raises(ValueError):
            run.advance(np.zeros((4, 2), dtype=np.int64), guesses=np.array([0, 1, 0, 0]))


def test_a_prompt_is_guessed_from(tiny_model_dir):
    """The prefix (here a prompt holding the records) is where a record's draft comes from."""
    prompt = RECORD * 2
    codec, blob, im, tok, header, blocks = blocks_of(tiny_model_dir, RECORD, prompt=prompt, segment_tokens=4096)
    for guesses in (0, 8):
        c = Codec(tiny_model_dir, threads=2, guesses=guesses)
        assert c.decompress(blob, prompt) == RECORD
        assert c.last_decode.tokens == blocks[0].tokens[0]
    # The copy from the prompt is right almost every time; how wide passes go is the cost model's call.
    stats = c.last_decode
    assert stats.held > 0.9 * stats.tried and stats.tried > stats.tokens // 2
    assert stats.tokens_per_row_pass > 1.5 and c.last_decode_passes == stats.row_passes


def test_choose_width_pays_for_columns_only_when_guesses_hold():
    cost = draft.PassCost(prior=0.1)
    cost.record(1, 0.030)
    assert draft.choose_width(1, 1, [np.array([0.02, 0.01])], cost, 8) == 1         # unlikely: no guess
    assert draft.choose_width(1, 1, [np.array([0.9, 0.8, 0.7, 0.6])], cost, 8) == 5
    cost.record(5, 0.150)                                                           # a costly wide pass
    assert draft.choose_width(1, 1, [np.array([0.5, 0.25])], cost, 8) == 1
    acc = draft.Acceptance(4)
    assert acc.chances(3, 2).tolist() == [0.5, 0.25]
    for _ in range(8):
        acc.record(3, 1, True)
    assert acc.chances(3, 1)[0] == 0.9


def test_lane_draft_copies_what_followed_the_longest_match():
    idx = draft.PrefixIndex([1, 10, 11, 12, 13, 14, 10, 11, 99])
    lane = idx.lane()
    assert lane.propose(4) == ([], 0)              # (11, 99) never occurred before
    for x in (10, 11):
        lane.push(x)
    assert lane.propose(3) == ([99, 10, 11], 2)  # the latest occurrence of (10, 11), on into the lane
    lane.push(12)
    assert lane.propose(3) == ([13, 14, 10], 3)   # (10, 11, 12): longer, earlier
    assert lane.propose(0) == ([], 0)


def test_every_watched_proposal_is_scored_fed_or_not():
    """A proposal counts at each place up to its first miss, as the symbols arrive, whether or not
    its guesses were fed: one early miss must not stop a draft from ever being measured again."""
    acc = draft.Acceptance(4)
    lane = draft.PrefixIndex([1, 5, 6, 7, 8]).lane(acc)
    lane.watch([7, 8, 9], 3)
    lane.watch([6, 7], 2)                          # a second proposal, overlapping the first
    for x in (7, 8, 4):
        lane.push(x)
    assert acc.tried[3, 1:4].tolist() == [1, 1, 1] and acc.held[3, 1:4].tolist() == [1, 1, 0]
    assert acc.tried[2, 1:3].tolist() == [1, 0] and acc.held[2, 1:3].tolist() == [0, 0]
    assert lane.watched == []                      # both decided: nothing left to score
    lane.watch([], 2)
    unscored = draft.PrefixIndex([1]).lane()       # no Acceptance: watching records nothing
    unscored.watch([3], 2)
    unscored.push(3)
    assert acc.tried.sum() == 4 and unscored.watched == []
