"""The two-stage frequencies at Gemma's alphabet (262,144 + 256 = 256 x 1,025) and at the extremes.

Every row is checked against the formulas of docs/ENGINE.md ("Frequencies") computed
with Python's unbounded integers: an int64 overflow anywhere would make them differ.
Then the rows go through the real range coder and back.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcodec.coding.coder import StreamDecoder, StreamEncoder
from lmcodec.coding.frequencies import CodingTables, bucket_width
from lmcodec.engine import ops_torch
from lmcodec.engine.spec.constants import BUCKET_FLOOR, BUCKETS, ESCAPES, MAX_VOCAB, MIN_TOKEN_BITS, TOTAL

GEMMA_VOCAB = 262_144
ALPHABET = GEMMA_VOCAB + ESCAPES
WIDTH = 1025
TOP = 1 << 30           # the LM's largest weight (EXP2[0])
MIXED = (1 << 38) - 1   # the online mixture's rows stay below 2^38 (docs/ENGINE.md, "Online models")


def _argmax_first(values: list[int]) -> int:
    best = max(values)
    return values.index(best)


def reference_stage1(row: list[int], width: int) -> list[int]:
    """Stage 1 with Python integers: bucket masses shifted by bitlen(width) - 8, floors of 256."""
    pre = max(0, width.bit_length() - 8)
    m = [sum(row[b * width:(b + 1) * width]) >> pre for b in range(BUCKETS)]
    total = max(sum(m), 1)
    g = [BUCKET_FLOOR + mb * (TOTAL - BUCKETS * BUCKET_FLOOR) // total for mb in m]
    g[_argmax_first(m)] += TOTAL - sum(g)
    return g


def reference_stage2(bucket: list[int]) -> list[int]:
    """Stage 2 with Python integers: one unit each, the rest in proportion, the remainder to the largest."""
    mass = max(sum(bucket), 1)
    g = [1 + p * (TOTAL - len(bucket)) // mass for p in bucket]
    g[_argmax_first(bucket)] += TOTAL - sum(g)
    return g


def _row(kind: str, seed: int) -> np.ndarray:
    """One row of symbol weights [256 * 1025]: an extreme, or the engine's output of random gaps."""
    rng = np.random.default_rng(seed)
    spot = int(rng.integers(0, ALPHABET))
    if kind == "engine":        # the engine's own weights from token gaps (escapes: max(1, sum >> 24))
        gaps = torch.from_numpy(rng.integers(0, 31 * 1024 + 1, size=(1, GEMMA_VOCAB)) >> int(rng.integers(0, 15)))
        return ops_torch.weights_from_gaps(gaps, ALPHABET, WIDTH).reshape(-1).numpy()
    if kind == "all_top":
        return np.full(ALPHABET, TOP, dtype=np.int64)
    row = np.full(ALPHABET, {"one_top_rest_one": 1, "one_top_rest_zero": 0, "all_zero": 0,
                             "mixed_one": 0, "mixed_bucket": 0, "random": 0}[kind], dtype=np.int64)
    if kind.startswith("one_top"):
        row[spot] = TOP
    elif kind == "mixed_one":
        row[spot] = MIXED
    elif kind == "mixed_bucket":    # a whole row's 2^38 in the bucket of ``spot``
        b = spot // WIDTH
        row[b * WIDTH:(b + 1) * WIDTH] = MIXED // WIDTH
    elif kind == "random":
        row[:] = rng.integers(0, TOP + 1, size=ALPHABET) >> rng.integers(0, 31, size=ALPHABET)
    return row


KINDS = ["engine", "all_top", "one_top_rest_one", "one_top_rest_zero", "all_zero", "mixed_one", "mixed_bucket",
         "random"]


def _check_row(row: np.ndarray) -> CodingTables:
    tables = CodingTables(torch.from_numpy(row.copy()).view(1, BUCKETS, WIDTH), ALPHABET)
    s1 = tables.stage1()[0]
    values = row.tolist()
    assert s1.tolist() == reference_stage1(values, WIDTH)
    assert s1.sum() == TOTAL and s1.min() >= BUCKET_FLOOR
    for b in range(BUCKETS):
        s2 = tables.stage2(np.array([b]))[0]
        assert s2.tolist() == reference_stage2(values[b * WIDTH:(b + 1) * WIDTH]), b
        assert s2.sum() == TOTAL and s2.min() >= 1
    return tables


def _round_trip(tables: CodingTables, symbols: list[int]) -> None:
    """Code ``symbols`` (all under the same row) through constriction and read them back."""
    s1 = tables.stage1()
    enc = StreamEncoder()
    for s in symbols:
        b, j = tables.split(np.array([s]))
        enc.encode(b, s1)
        enc.encode(j, tables.stage2(b))
    payload = enc.finish()
    dec = StreamDecoder(payload)
    got = []
    for _ in symbols:
        b = dec.decode(s1)
        got.append(int(b[0]) * WIDTH + int(dec.decode(tables.stage2(b))[0]))
    assert got == symbols
    bits = np.array([tables.bits(np.array([s]))[0] for s in symbols])
    assert (bits >= MIN_TOKEN_BITS).all() and (bits <= 16 + 24 + 1e-9).all()
    assert bits.sum() <= 8 * len(payload) <= bits.sum() + 64


def test_gemmas_alphabet_is_256_buckets_of_1025():
    assert bucket_width(ALPHABET) == WIDTH and BUCKETS * WIDTH == ALPHABET
    assert bucket_width(49_152 + ESCAPES) == 193                  # SmolLM2's, unchanged
    assert bucket_width(MAX_VOCAB + ESCAPES) == 65_537
    for alphabet in (ESCAPES, MAX_VOCAB + ESCAPES + 1):
        with pytest.raises(ValueError, match="vocabulary"):
            bucket_width(alphabet)


def test_the_bounds_hold_at_width_1025():
    """The products of docs/ENGINE.md "Limits" at width 1,025, with the largest inputs either stage can get."""
    pre = max(0, WIDTH.bit_length() - 8)
    assert pre == 3
    lm_mass = WIDTH * TOP                           # a bucket of LM weights, each at most 2^30
    assert (lm_mass >> pre) * (TOTAL - BUCKETS * BUCKET_FLOOR) < 1 << 62
    assert MIXED * (TOTAL - BUCKETS * BUCKET_FLOOR) < 1 << 62      # a mixed row's bucket, unshifted
    assert MIXED * (TOTAL - WIDTH) < 1 << 62                      # stage 2 of the largest mixed weight
    assert BUCKETS * (lm_mass >> pre) < 1 << 63                   # the sum of stage 1's masses
    assert GEMMA_VOCAB * TOP >> 24 <= TOP          # an escape weighs at most a token's 2^30 (V <= 2^24)


@pytest.mark.parametrize("kind", KINDS)
def test_extreme_rows_are_exact_and_round_trip(kind):
    row = _row(kind, 7)
    tables = _check_row(row)
    order = np.argsort(-row, kind="stable")
    picks = [int(order[0]), int(order[-1]), ALPHABET - 1, GEMMA_VOCAB, 0, WIDTH - 1, WIDTH]
    _round_trip(tables, picks)


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(KINDS), st.integers(0, 2**32 - 1),
       st.lists(st.tuples(st.integers(0, ALPHABET - 1), st.sampled_from([0, 1, 2, TOP - 1, TOP])), max_size=6))
def test_any_row_at_width_1025_is_exact_and_round_trips(kind, seed, spikes):
    row = _row(kind, seed)
    if kind not in ("mixed_one", "mixed_bucket"):   # keep the mixed rows' totals under 2^38
        for where, value in spikes:
            row[where] = value
    tables = _check_row(row)
    rng = np.random.default_rng(seed)
    _round_trip(tables, [int(s) for s in rng.integers(0, ALPHABET, 5)] + [int(np.argmax(row))])


def test_the_online_models_at_gemmas_alphabet_stay_in_bounds():
    """Every online model on (mixer 127) at 262,400 symbols: the LM at its widest (every gap 0, so
    sum p = 2^48), a token repeated so the n-grams and the match model predict it; each mixed row
    stays under 2^38 and its tables are the Python-integer formulas', coded and read back."""
    from lmcodec.coding.mixing import MixerConfig, StreamMixer

    mixer = StreamMixer(MixerConfig(127), 1, ALPHABET)
    gaps = torch.zeros((1, GEMMA_VOCAB), dtype=torch.int64)
    gaps[0, 1:] = torch.from_numpy(np.random.default_rng(1).integers(0, 3, GEMMA_VOCAB - 1))
    for step in range(12):
        w = mixer.mix([0], gaps)
        assert w.shape == (1, BUCKETS, WIDTH) and int(w.sum()) < 1 << 38 and int(w.min()) >= 0
        if step in (0, 11):
            tables = _check_row(w.reshape(-1).numpy())
            _round_trip(tables, [7, ALPHABET - 1, GEMMA_VOCAB + 65])
        mixer.update([7])
