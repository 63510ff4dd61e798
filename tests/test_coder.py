"""The range coder: exact round trips and a size close to the ideal code length."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcodec.coder import SegmentDecoder, SegmentEncoder
from lmcodec.errors import CorruptArchiveError
from lmcodec.frequencies import probability_table, surprisal_bits


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
