"""The numba range coder against constriction: the same bytes, each decodes the other, same outcome on garbage."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcodec.coding import rangecoder as rc
from lmcodec.coding.coder import StreamDecoder, StreamEncoder
from lmcodec.engine.cpu.jit import JIT, njit
from lmcodec.errors import CorruptArchiveError

TOTAL = 1 << 24


def random_rows(rng, n: int, k: int, spread: float) -> np.ndarray:
    """Integer frequency rows (each >= 1, summing to 2^24), some very skewed (as test_coder's)."""
    w = np.exp(rng.normal(size=(n, k)) * spread)
    g = 1 + np.floor(w / w.sum(1, keepdims=True) * (TOTAL - k)).astype(np.int64)
    g[np.arange(n), w.argmax(1)] += TOTAL - g.sum(1)
    return g


def extreme_rows(rng, n: int, k: int) -> np.ndarray:
    """Rows of ones but for one entry of 2^24 - k + 1, or of twos but for one entry of 2^24 - 2k + 2."""
    g = np.full((n, k), 1 if rng.random() < 0.5 else min(2, TOTAL // k), dtype=np.int64)
    g[np.arange(n), rng.integers(0, k, n)] += TOTAL - g.sum(1)
    return g


def batches_for(seed: int, k: int, spread: float, sizes: list[int]):
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        rows = extreme_rows(rng, n, k) if rng.random() < 0.3 else random_rows(rng, n, k, spread)
        p = rng.random()
        sym = np.where(rng.random(n) < p, rows.argmax(1), rng.integers(0, k, n))  # likely, unlikely, mixed
        out.append((sym, rows))
    return out


def outcome(decoder, batches):
    """What a decoder makes of a stream, call by call: the symbols, up to the first error."""
    got = []
    for _, rows in batches:
        try:
            got.append(decoder.decode(rows).tolist())
        except CorruptArchiveError:
            got.append("error")
            break
    return got


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 300), st.floats(0.1, 12),
       st.lists(st.integers(0, 40), min_size=1, max_size=6))
def test_same_bytes_as_constriction_and_each_decodes_the_other(seed, k, spread, sizes):
    batches = batches_for(seed, k, spread, sizes)
    ref, port = StreamEncoder(), rc.RangeEncoder()
    for i, (sym, rows) in enumerate(batches):
        ref.encode(sym, rows)
        port.encode(sym, rows)
        if i == 1:  # sealing mid-stream leaves the encoder as it was, in both
            assert port.finish() == ref.finish()
    a, b = ref.finish(), port.finish()
    assert a == b
    assert outcome(rc.RangeDecoder(a), batches) == [s.tolist() for s, _ in batches]
    assert outcome(StreamDecoder(b), batches) == [s.tolist() for s, _ in batches]


def test_carry_chains_held_back_over_many_words():
    # Steer the encoder so that its interval straddles a word boundary when it renormalises (it
    # wraps past 2^64 after the shift), then keeps straddling 2^64: every symbol is the one holding
    # that point, so the held-back words pile up; then resolve, both ways (carry or not).
    rng = np.random.default_rng(5)
    for resolve in (0, -1):
        state = rc.new_state(1)
        rc.enc_init(state, 0)
        out = np.zeros(4096, dtype=np.uint32)
        n, most = 0, 0
        symbols, rows = [], []
        for step in range(600):
            row = random_rows(rng, 1, 256, 1.0)[0]
            cum = np.concatenate([[0], np.cumsum(row)])
            lower, scale = int(state[0, rc.ENC_LOWER]), int(state[0, rc.ENC_RANGE]) >> 24
            target = 2**64 if state[0, rc.ENC_PENDING] else ((lower >> 32) + 1) << 32
            offset = (target - lower) // scale  # the symbol holding the target (when it is inside the range)
            s = int(np.searchsorted(cum, offset, side="right") - 1) if step % 150 < 140 else resolve
            s = min(max(s, 0), 255) if s >= 0 else 255
            symbols.append(s)
            rows.append(row)
            n = rc.enc_put(state, 0, out, n, int(cum[s]), int(row[s]))
            most = max(most, int(state[0, rc.ENC_PENDING]))
        assert most >= 4
        symbols, rows = np.array(symbols), np.array(rows)
        ref = StreamEncoder()
        ref.encode(symbols, rows)
        port = rc.RangeEncoder()
        port.encode(symbols, rows)
        assert port.finish() == ref.finish()
        assert rc.RangeDecoder(ref.finish()).decode(rows).tolist() == symbols.tolist()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 300), st.sampled_from(["random", "truncated", "flipped", "ones"]),
       st.integers(0, 40))
def test_garbage_gives_constrictions_outcome_never_a_crash(seed, k, kind, cut):
    rng = np.random.default_rng(seed)
    batches = batches_for(seed, k, float(rng.uniform(0.1, 12)), [int(x) for x in rng.integers(1, 30, 4)])
    if kind == "random":
        payload = rng.integers(0, 256, 4 * cut, dtype=np.uint8).tobytes()
    else:
        enc = rc.RangeEncoder()
        for sym, rows in batches:
            enc.encode(sym, rows)
        payload = enc.finish()
        if kind == "truncated":
            payload = payload[: 4 * min(cut, len(payload) // 4)]
        elif kind == "ones":  # a valid start, then all-ones words: the point climbs to the top of the range
            payload = payload[: 4 * min(cut % 3, len(payload) // 4)] + b"\xff" * 4 * (cut + 2)
        elif payload:
            b = bytearray(payload)
            b[cut % len(b)] ^= 1 << (seed % 8)
            payload = bytes(b)
    got = outcome(rc.RangeDecoder(payload), batches)
    assert got == outcome(StreamDecoder(payload), batches)
    for part, (_, rows) in zip(got, batches):
        if part != "error":
            assert all(0 <= s < rows.shape[1] for s in part)


def test_the_only_error_is_the_uncovered_sliver():
    # All-ones words put the point at 2^64 - 1, beyond scale * 2^24 of the initial range.
    rows = random_rows(np.random.default_rng(1), 3, 256, 1.0)
    for payload in (b"\xff" * 8, b"\xff" * 12):
        with pytest.raises(CorruptArchiveError):
            rc.RangeDecoder(payload).decode(rows)
        with pytest.raises(CorruptArchiveError):
            StreamDecoder(payload).decode(rows)
    # Running out of words is no error: both read zeros past the end.
    assert rc.RangeDecoder(b"").decode(rows).tolist() == StreamDecoder(b"").decode(rows).tolist()


def test_edges_of_the_api():
    with pytest.raises(CorruptArchiveError):
        rc.RangeDecoder(b"abcde")
    assert rc.RangeEncoder().finish() == b""
    assert rc.RangeDecoder(b"").decode(np.zeros((0, 5), dtype=np.int64)).shape == (0,)
    enc = rc.RangeEncoder()
    enc.encode(np.zeros(0, dtype=np.int64), np.zeros((0, 5), dtype=np.int64))
    assert enc.finish() == b""
    with pytest.raises(ValueError):
        enc.encode(np.array([3]), np.full((1, 3), TOTAL // 4))
    # One-symbol rows (constriction will not take their all-zero weights): a round trip of seal words.
    rows = np.full((50, 1), TOTAL, dtype=np.int64)
    enc = rc.RangeEncoder()
    enc.encode(np.zeros(50, dtype=np.int64), rows)
    assert rc.RangeDecoder(enc.finish()).decode(rows).tolist() == [0] * 50
    state = rc.new_state(2)
    rc.enc_init(state, 1)
    out = np.zeros(8, dtype=np.uint32)
    assert rc.enc_put(state, 1, out, 0, 5, 0) == -1 and rc.enc_put(state, 1, out, 0, TOTAL - 1, 2) == -1
    words = np.zeros(4, dtype=np.uint32)
    assert not rc.dec_init(state, 0, words, 2, 5) and not rc.dec_init(state, 0, words, 3, 2)
    assert rc.dec_init(state, 0, words, 1, 3)
    assert not rc.dec_take(state, 0, words, 5, 1)  # the point (0) is not in that symbol's interval


@njit(**JIT)
def _two_streams(freqs, sym_a, sym_b, words_out):  # pragma: no cover - compiled
    """Code two streams interleaved in one state array, then decode them interleaved from one flat words array."""
    state = np.zeros((2, rc.STATE_WIDTH), dtype=np.uint64)
    rc.enc_init(state, 0)
    rc.enc_init(state, 1)
    m = freqs.shape[0]
    buf_a = np.zeros(m + 4, dtype=np.uint32)
    buf_b = np.zeros(m + 4, dtype=np.uint32)
    na = 0
    nb = 0
    for i in range(m):
        na = rc.encode_rows(state, 0, buf_a, na, sym_a[i:i + 1], freqs[i:i + 1])
        left = np.int64(0)
        for j in range(sym_b[i]):
            left += freqs[i, j]
        nb = rc.enc_put(state, 1, buf_b, nb, left, freqs[i, sym_b[i]])
    na = rc.enc_finish(state, 0, buf_a, na)
    nb = rc.enc_finish(state, 1, buf_b, nb)
    words_out[:na] = buf_a[:na]
    words_out[na:na + nb] = buf_b[:nb]
    ok = rc.dec_init(state, 0, words_out, 0, na) and rc.dec_init(state, 1, words_out, na, na + nb)
    dec_a = np.zeros(m, dtype=np.int64)
    dec_b = np.zeros(m, dtype=np.int64)
    for i in range(m):
        ok = ok and rc.decode_rows(state, 0, words_out, freqs[i:i + 1], dec_a[i:i + 1])
        q = rc.dec_quantile(state, 1)
        left = np.int64(0)
        j = 0
        while left + freqs[i, j] <= q:
            left += freqs[i, j]
            j += 1
        dec_b[i] = j
        ok = ok and rc.dec_take(state, 1, words_out, left, freqs[i, j])
    return ok, na, nb, dec_a, dec_b


def test_callable_from_numba_two_streams_in_one_state_array():
    rng = np.random.default_rng(7)
    freqs = random_rows(rng, 300, 193, 4.0)
    sym_a = np.where(rng.random(300) < 0.6, freqs.argmax(1), rng.integers(0, 193, 300))
    sym_b = rng.integers(0, 193, 300)
    words = np.zeros(700, dtype=np.uint32)
    ok, na, nb, dec_a, dec_b = _two_streams(freqs, sym_a, sym_b, words)
    assert ok and dec_a.tolist() == sym_a.tolist() and dec_b.tolist() == sym_b.tolist()
    for sym, part in ((sym_a, words[:na]), (sym_b, words[na:na + nb])):
        ref = StreamEncoder()
        ref.encode(sym, freqs)
        assert part.astype("<u4").tobytes() == ref.finish()
