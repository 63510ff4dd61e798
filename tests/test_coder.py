"""The range coder: exact round trips and a size close to the ideal code length."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcodec.coder import SegmentDecoder, SegmentEncoder
from lmcodec.errors import CorruptArchiveError
from lmcodec.frequencies import MIN_TOKEN_BITS, OTHER_FLOOR, StepTables, probability_table, surprisal_bits
from lmcodec.tokens import ESCAPES


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 60), st.integers(2, 300), st.floats(0.1, 20))
def test_round_trip_any_distribution(seed, n, vocab, temperature):
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(size=(n, vocab)).astype(np.float32) * temperature)
    table = probability_table(logits, escape_bits=12)
    # Mostly likely symbols, some escapes and some near-impossible ones.
    symbols = np.where(rng.random(n) < 0.8, table.argmax(1), rng.integers(0, table.shape[1], n))
    enc = SegmentEncoder()
    for sym, row in zip(symbols, table):
        enc.encode(int(sym), row)
    payload = enc.finish()
    dec = SegmentDecoder(payload)
    assert [dec.decode(row) for row in table] == symbols.tolist()


def test_size_is_close_to_the_cross_entropy():
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(4000, 5000)).astype(np.float32) * 4)
    table = probability_table(logits, escape_bits=16)
    cdf = table.cumsum(1)
    symbols = np.minimum((cdf < rng.random((4000, 1))).sum(1), table.shape[1] - 1)
    enc = SegmentEncoder()
    for sym, row in zip(symbols, table):
        enc.encode(int(sym), row)
    ideal = surprisal_bits(table, symbols).sum()
    actual = 8 * len(enc.finish())
    assert ideal < actual < ideal * 1.005 + 64


def test_table_rows_sum_to_one_and_keep_escape_mass():
    table = probability_table(torch.randn(3, 100), escape_bits=10)
    assert table.shape == (3, 356)
    assert np.allclose(table.sum(1), 1.0)
    assert np.allclose(table[:, 100:].sum(1), 2.0 ** -10)


def test_payload_must_be_whole_words():
    with pytest.raises(CorruptArchiveError):
        SegmentDecoder(b"abc")


# -- two-stage coding rows (top-k + other, then the full alphabet) -----------------------

@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(2, 400), st.integers(1, 64),
       st.floats(0.1, 20))
def test_two_stage_round_trip(seed, n, vocab, top_k, temperature):
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(size=(n, vocab)).astype(np.float32) * temperature)
    tables = StepTables(logits, escape_bits=12, top_k=top_k)
    full = probability_table(logits, escape_bits=12)
    # Likely tokens (stage 1), unlikely ones and escapes (stage 2).
    symbols = np.where(rng.random(n) < 0.6, full.argmax(1), rng.integers(0, vocab + ESCAPES, n))
    enc = SegmentEncoder()
    bits = [enc.encode_token(tables, i, int(s)) for i, s in enumerate(symbols)]
    dec = SegmentDecoder(enc.finish())
    assert [dec.decode_token(tables, i) for i in range(n)] == symbols.tolist()
    # The two stages multiply out to the full table wherever no floor applies: the
    # *other* floor, or the quantizer's 2^-24 (where a float32 share may underflow).
    plain = (tables.head[:, -1] > OTHER_FLOOR) & (full[np.arange(n), symbols] > 2.0 ** -20)
    ideal = surprisal_bits(full, symbols)
    assert np.allclose(np.array(bits)[plain], ideal[plain], rtol=1e-5, atol=1e-6)
    assert max(bits) < 24 + 24 + 1e-9  # each stage is counted at most at the quantizer's floor


def test_two_stage_rows_are_the_full_table_split():
    logits = torch.randn(4, 1000) * 3
    tables = StepTables(logits, escape_bits=16, top_k=50)
    full = probability_table(logits, escape_bits=16)
    assert tables.head.shape == (4, 51) and tables.top_ids.shape == (4, 50)
    for i in range(4):
        assert np.allclose(tables.head[i, :50], full[i, tables.top_ids[i]])
        assert np.allclose(tables.head[i].sum(), 1.0)
        tail = tables.tail(i)
        assert (tail[tables.top_ids[i]] == 0).all()
        assert np.allclose(tail.sum(), tables.head[i, -1])
        # stage-1 indices are the top-k ranks; anything else is *other*
        assert tables.index(i, int(tables.top_ids[i, 7])) == 7
        assert tables.index(i, 1000 + 3) == tables.other  # an escape


def test_every_token_costs_at_least_the_floor():
    # A near-certain model: the likeliest token still pays MIN_TOKEN_BITS.
    logits = torch.full((1, 300), -50.0)
    logits[0, 5] = 50.0
    tables = StepTables(logits, escape_bits=30, top_k=16)
    enc = SegmentEncoder()
    for _ in range(20000):
        enc.encode_token(tables, 0, 5)
    assert 8 * len(enc.finish()) >= 20000 * MIN_TOKEN_BITS
    assert tables.head[0, -1] == OTHER_FLOOR


def test_two_stage_size_is_close_to_the_cross_entropy():
    rng = np.random.default_rng(2)
    logits = torch.from_numpy(rng.normal(size=(3000, 5000)).astype(np.float32) * 4)
    full = probability_table(logits, escape_bits=16)
    symbols = np.minimum((full.cumsum(1) < rng.random((3000, 1))).sum(1), full.shape[1] - 1)
    tables = StepTables(logits, escape_bits=16, top_k=64)
    enc = SegmentEncoder()
    for i, s in enumerate(symbols):
        enc.encode_token(tables, i, int(s))
    ideal = surprisal_bits(full, symbols).sum()
    assert ideal < 8 * len(enc.finish()) < ideal * 1.005 + 64
