"""The compiled coding layer (coding.passes, coding.mixedpass) against today's tensor path as the oracle.

The oracle is what the codec ran before the layer was compiled, and still runs on CUDA: StreamMixer
(online models and adaptive bias as tensors and Python dicts), CodingTables, constriction through
coder.StreamEncoder / StreamDecoder.  For random LM gaps, lanes ending at different steps, every mixer
setting and both a small and SmolLM2's alphabet, both paths must write the same archive bytes and the
compiled decoder must read back the symbols.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcodec.coding.coder import StreamDecoder, StreamEncoder
from lmcodec.coding.frequencies import CodingTables, bucket_width
from lmcodec.coding.lanes import RunningLanes, new_record
from lmcodec.coding.mixedpass import MixedStream
from lmcodec.coding.mixing import ALL, BIAS_BIT, MixerConfig, StreamMixer
from lmcodec.coding.passes import DecoderBank, EncoderBuffer, OutputRows, PlainPasses, encode_plain
from lmcodec.coding.schedule import Running
from lmcodec.engine.spec.constants import ESCAPES, OUT_U_CAP
from lmcodec.errors import CorruptArchiveError

SMALL = 512 + ESCAPES          # 256 buckets of 3 symbols: contexts repeat, tables halve
SMOL = 49_152 + ESCAPES        # SmolLM2's: 256 buckets of 193
GEMMA = 262_144 + ESCAPES      # Gemma 3's: 256 buckets of 1,025


def gaps(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    """Token gaps shaped like Engine.gaps: the best token 0, the rest up to the cap, some rows peaked."""
    u = rng.integers(0, OUT_U_CAP + 1, size=(n, vocab), dtype=np.int64) >> rng.integers(0, 6, size=(n, 1))
    u[np.arange(n), rng.integers(0, vocab, size=n)] = 0
    return u


def stream_case(rng: np.random.Generator, lanes: int, steps: int, alphabet: int):
    """Lane lengths (some shorter), per step the live lanes' gaps and symbols (repetitive, some escapes)."""
    vocab = alphabet - ESCAPES
    lengths = [steps] + [int(rng.integers(1, steps + 1)) for _ in range(lanes - 1)]
    motif = rng.integers(0, alphabet, size=int(rng.integers(1, 8)))
    seqs = [np.resize(motif, n) if rng.random() < 0.7 else rng.integers(0, alphabet, size=n) for n in lengths]
    for s in seqs:
        s[rng.random(len(s)) < 0.03] = vocab + rng.integers(0, ESCAPES)
    plan = []
    for t in range(steps):
        live = [i for i, n in enumerate(lengths) if t < n]
        plan.append((live, gaps(rng, len(live), vocab), np.array([seqs[i][t] for i in live], dtype=np.int64)))
    return lengths, plan


def oracle_encode(config: MixerConfig, lanes: int, plan, alphabet: int) -> bytes:
    enc, mix = StreamEncoder(), StreamMixer(config, lanes, alphabet)
    for live, u, sym in plan:
        tables = CodingTables(mix.mix(live, torch.from_numpy(u)), alphabet)
        b, j = tables.split(sym)
        enc.encode(b, tables.stage1())
        enc.encode(j, tables.stage2(b))
        mix.update(sym.tolist())
    return enc.finish()


def compiled_encode(config: MixerConfig, lengths: list[int], plan, alphabet: int, chunk: int) -> bytes:
    """The encoder's compiled path, ``chunk`` steps a call (encoder.encode_stream's chunks)."""
    coder = EncoderBuffer()
    mixed = MixedStream(config, lengths, alphabet) if config.mask else None
    outputs = OutputRows(alphabet)
    for a in range(0, len(plan), chunk):
        part = plan[a:a + chunk]
        u = np.concatenate([p[1] for p in part])
        spans = np.cumsum([0] + [len(p[0]) for p in part])
        lanes = np.concatenate([np.asarray(p[0], np.int64) for p in part])
        ys = np.concatenate([p[2] for p in part])
        if mixed is not None:
            mixed.encode(u, spans, lanes, ys, coder)
        else:
            p, mass, _ = outputs(u)
            coder.room(2 * len(ys))
            coder.n, _ = encode_plain(p, mass, spans, ys, coder.state, 0, coder.out, coder.n, outputs.width)
    return coder.finish()


def compiled_decode(config: MixerConfig, lengths: list[int], plan, alphabet: int, payload: bytes) -> list:
    """The decoder's compiled path, one pass a step (no guesses), the stream's lanes as RunningLanes' arrays:
    MixedStream.decode_pass with online models, else PlainPasses."""
    bank = DecoderBank([payload])
    bank.open(0)
    mixed = MixedStream(config, lengths, alphabet) if config.mask else None
    L = len(lengths)
    lanes = RunningLanes([Running(0, tuple(lengths), tuple(range(L)))], [range(L)])
    plain = PlainPasses(alphabet, bank)
    base = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.full(int(base[-1]), -1, np.int64)
    where, feed = np.zeros((L, 1), np.int64), np.zeros((L, 1), np.int64)
    widths, decoded, log = np.ones(L, np.int64), np.zeros(L, np.int64), np.zeros((2, L), np.int64)
    out = []
    for t, (live, u, _) in enumerate(plan):
        where[live, 0] = np.arange(len(live))
        if mixed is not None:
            mixed.decode_pass(u, lanes, 0, where, bank, (flat, base), feed, widths, decoded, alphabet - ESCAPES, 0, log,
                              new_record())
        else:
            plain.masses(u)
            plain.decode(u, lanes, where, (flat, base), feed, widths, decoded, alphabet - ESCAPES, 0, log,
                         new_record())
        assert lanes.step[0] == t + 1 and np.array_equal(decoded[live], np.full(len(live), t + 1))
        out.append(flat[base[live] + t])
    return out


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), mask=st.integers(0, ALL), lanes=st.integers(1, 4), steps=st.integers(1, 30),
       chunk=st.integers(1, 8))
def test_small_alphabet_same_bytes_as_the_oracle(seed, mask, lanes, steps, chunk):
    rng = np.random.default_rng(seed)
    config = MixerConfig(mask)
    lengths, plan = stream_case(rng, lanes, steps, SMALL)
    want = oracle_encode(config, lanes, plan, SMALL)
    assert compiled_encode(config, lengths, plan, SMALL, chunk) == want
    got = compiled_decode(config, lengths, plan, SMALL, want)
    for (_, _, sym), dec in zip(plan, got):
        assert np.array_equal(sym, dec)


@pytest.mark.parametrize("alphabet,mask", [(SMOL, 0), (SMOL, ALL), (SMOL, ALL & ~BIAS_BIT), (SMOL, BIAS_BIT),
                                           (GEMMA, 0), (GEMMA, ALL)])
def test_model_alphabets_same_bytes_as_the_oracle(alphabet, mask):
    """SmolLM2's alphabet, and Gemma 3's, whose buckets (1,025 symbols) are wider than the 256 escapes."""
    rng = np.random.default_rng(mask + alphabet)
    config = MixerConfig(mask)
    lanes, steps = (3, 12) if alphabet == SMOL else (2, 5)
    lengths, plan = stream_case(rng, lanes, steps, alphabet)
    want = oracle_encode(config, lanes, plan, alphabet)
    assert compiled_encode(config, lengths, plan, alphabet, 5) == want
    got = compiled_decode(config, lengths, plan, alphabet, want)
    assert all(np.array_equal(sym, dec) for (_, _, sym), dec in zip(plan, got))
    # And the oracle's decoder reads the compiled encoder's bytes (same stream, same rows).
    dec = StreamDecoder(want)
    mix = StreamMixer(config, lanes, alphabet)
    for live, u, sym in plan:
        tables = CodingTables(mix.mix(live, torch.from_numpy(u)), alphabet)
        b = dec.decode(tables.stage1())
        x = b * bucket_width(alphabet) + dec.decode(tables.stage2(b))
        assert np.array_equal(x, sym)
        mix.update(x.tolist())


def test_long_stream_halves_the_counts_the_same_way():
    """Past order 0's limit (1,024 counts) and the orders' 4,096: halving, removal and revival of entries."""
    rng = np.random.default_rng(7)
    config = MixerConfig(ALL)
    lengths, plan = stream_case(rng, 1, 1100, SMALL)
    want = oracle_encode(config, 1, plan, SMALL)
    assert compiled_encode(config, lengths, plan, SMALL, 64) == want


@pytest.mark.parametrize("mask", [0, ALL])
def test_damaged_payload_is_a_clear_error_or_other_symbols(mask):
    rng = np.random.default_rng(3)
    config = MixerConfig(mask)
    lengths, plan = stream_case(rng, 2, 20, SMALL)
    payload = bytearray(compiled_encode(config, lengths, plan, SMALL, 4))
    with pytest.raises(CorruptArchiveError):
        DecoderBank([bytes(payload[:-1])])
    for k in range(0, len(payload), 4):
        bad = bytearray(payload)
        bad[k] ^= 0xFF
        try:
            compiled_decode(config, lengths, plan, SMALL, bytes(bad))
        except CorruptArchiveError:
            pass
