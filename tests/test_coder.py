"""The range coder and the integer frequencies: exact round trips, exact code lengths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcodec.coding.coder import StreamDecoder, StreamEncoder
from lmcodec.coding.frequencies import CodingTables, bucket_width
from lmcodec.coding.tokens import ESCAPES
from lmcodec.engine import ops_torch
from lmcodec.engine.spec.constants import BUCKETS, MIN_TOKEN_BITS, TOTAL
from lmcodec.errors import CorruptArchiveError


def random_rows(rng, n: int, k: int, spread: float) -> np.ndarray:
    """Integer frequency rows (each >= 1, summing to 2^24), some very skewed."""
    w = np.exp(rng.normal(size=(n, k)) * spread)
    g = 1 + np.floor(w / w.sum(1, keepdims=True) * (TOTAL - k)).astype(np.int64)
    g[np.arange(n), w.argmax(1)] += TOTAL - g.sum(1)
    return g


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 50), st.integers(2, 300), st.floats(0.1, 12),
       st.integers(1, 6))
def test_round_trip_any_rows_in_batches(seed, n, k, spread, calls):
    rng = np.random.default_rng(seed)
    batches = [random_rows(rng, n, k, spread) for _ in range(calls)]
    symbols = [np.where(rng.random(n) < 0.7, b.argmax(1), rng.integers(0, k, n)) for b in batches]
    enc = StreamEncoder()
    for s, b in zip(symbols, batches):
        enc.encode(s, b)
    dec = StreamDecoder(enc.finish())
    for s, b in zip(symbols, batches):
        assert dec.decode(b).tolist() == s.tolist()


def test_the_coder_uses_exactly_the_integer_frequencies():
    # A symbol of frequency g costs exactly 24 - log2(g) bits: for g = 2^10,
    # 14 bits each.  If constriction requantized the row at all, the total
    # would drift by far more than the coder's few words of slack.
    k = 193
    row = np.ones(k, dtype=np.int64)
    row[7] = 1 << 10
    row[0] = TOTAL - row.sum() + 1
    n = 20000
    enc = StreamEncoder()
    enc.encode(np.full(n, 7), np.repeat(row[None], n, axis=0))
    assert abs(8 * len(enc.finish()) - 14 * n) <= 64
    # And a symbol of frequency 1 costs exactly 24 bits.
    enc = StreamEncoder()
    enc.encode(np.full(1000, 3), np.repeat(row[None], 1000, axis=0))
    assert abs(8 * len(enc.finish()) - 24 * 1000) <= 64


def test_size_is_the_exact_code_length():
    rng = np.random.default_rng(1)
    rows = random_rows(rng, 5000, 256, 3.0)
    p = rows / TOTAL
    symbols = np.minimum((p.cumsum(1) < rng.random((5000, 1))).sum(1), 255)
    enc = StreamEncoder()
    enc.encode(symbols, rows)
    ideal = float(-np.log2(p[np.arange(5000), symbols]).sum())
    assert ideal <= 8 * len(enc.finish()) <= ideal + 64


def test_payload_must_be_whole_words():
    with pytest.raises(CorruptArchiveError):
        StreamDecoder(b"abc")


def test_garbage_is_an_error_or_some_symbols_never_a_crash():
    rows = random_rows(np.random.default_rng(2), 50, 256, 2.0)
    dec = StreamDecoder(bytes(range(40)))
    try:
        out = dec.decode(rows)
        assert out.min() >= 0 and out.max() < 256
    except CorruptArchiveError:
        pass


# -- integer frequencies from symbol weights ---------------------------------------------

def weights_from_logits(logits: torch.Tensor, exp: int = -20) -> tuple[torch.Tensor, int]:
    """[N, V] integer logits (real = lam * 2^exp) -> coding weights, as the engine's output step."""
    v = logits.shape[1]
    alphabet = v + ESCAPES
    width = bucket_width(alphabet)
    # ops_torch.weights takes the int32 [hi; lo] product and multipliers: feed lam as y * 1.
    lam = logits.to(torch.int64)
    hi = (lam + 128) >> 8
    lo = lam - (hi << 8)
    y = torch.cat([hi, lo]).to(torch.int32)
    exp_t = torch.full((logits.shape[0], 1), exp, dtype=torch.int64)
    return ops_torch.weights(y, torch.ones(v, dtype=torch.int64), exp_t, alphabet, width), alphabet


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 20), st.integers(2, 2000), st.integers(0, 1 << 24))
def test_tables_are_valid_and_round_trip(seed, n, vocab, scale):
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.integers(-scale - 1, scale + 1, size=(n, vocab)))
    w, alphabet = weights_from_logits(logits)
    tables = CodingTables(w, alphabet)
    s1 = tables.stage1()
    assert s1.shape == (n, BUCKETS) and (s1.sum(1) == TOTAL).all() and s1.min() >= 256
    symbols = np.where(rng.random(n) < 0.6, logits.argmax(1).numpy(), rng.integers(0, alphabet, n))
    b, j = tables.split(symbols)
    s2 = tables.stage2(b)
    assert (s2.sum(1) == TOTAL).all() and s2.min() >= 1
    enc = StreamEncoder()
    enc.encode(b, s1)
    enc.encode(j, s2)
    payload = enc.finish()
    dec = StreamDecoder(payload)
    bb = dec.decode(s1)
    jj = dec.decode(tables.stage2(bb))
    assert (bb * tables.width + jj).tolist() == symbols.tolist()
    bits = tables.bits(symbols)
    assert bits.sum() <= 8 * len(payload) <= bits.sum() + 64
    assert (bits >= MIN_TOKEN_BITS).all() and (bits <= 16 + 24 + 1e-9).all()


def test_probabilities_are_the_two_stages_multiplied_and_sum_to_one():
    logits = torch.from_numpy(np.random.default_rng(3).integers(-2**22, 2**22, size=(3, 1000)))
    w, alphabet = weights_from_logits(logits)
    tables = CodingTables(w, alphabet)
    p = tables.probabilities().numpy()
    assert p.shape == (3, alphabet)
    assert np.allclose(p.sum(1), 1.0, atol=1e-4)  # the padding slots hold the rest
    syms = np.array([5, 999, alphabet - 1])
    assert np.allclose(-np.log2(p[np.arange(3), syms]), tables.bits(syms))


def test_escapes_get_a_share_and_the_best_token_the_most():
    logits = torch.zeros((1, 500), dtype=torch.int64)
    logits[0, 42] = 1 << 22   # real logit 4: e^4 times likelier than the rest
    w, alphabet = weights_from_logits(logits)
    p = CodingTables(w, alphabet).probabilities().numpy()[0]
    assert p.argmax() == 42
    assert (p[500:alphabet] > 0).all()
    assert math.isclose(p[42] / p[0], math.e ** 4, rel_tol=1e-2)


def test_every_token_costs_at_least_the_floor():
    # A near-certain model: the likeliest token still pays MIN_TOKEN_BITS.
    logits = torch.full((1, 300), -(1 << 40), dtype=torch.int64)
    logits[0, 5] = 1 << 40
    w, alphabet = weights_from_logits(logits)
    tables = CodingTables(w, alphabet)
    assert tables.bits(np.array([5]))[0] >= MIN_TOKEN_BITS
    enc = StreamEncoder()
    b, j = tables.split(np.array([5]))
    s1, s2 = tables.stage1(), tables.stage2(b)
    for _ in range(200):
        enc.encode(b, s1)
        enc.encode(j, s2)
    assert 8 * len(enc.finish()) >= 200 * MIN_TOKEN_BITS
