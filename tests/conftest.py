"""Shared fixtures: the real default model, loaded once per test session."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lmcodec  # noqa: E402
from lmcodec.coding.tokens import ByteTokenizer  # noqa: E402
from lmcodec.engine.model import registry as models  # noqa: E402

# Small segments keep the lockstep short (steps = segment length) so round trips
# through the real 135M model take seconds, while still exercising several
# segments, several streams (2 segments each) and the sliding window.
FAST = dict(segment_tokens=24, lanes=2, context=32, threads=2)

SAMPLES = {
    "empty": b"",
    "one_byte": b"A",
    "prose": b"Alice was beginning to get very tired of sitting by her sister on the bank.\n",
    "code": b"def f(x):\n    return x * 2  # double\n\nprint(f(21))\n",
    "emoji_cjk": "Grüße 😀👍🏽 中文字符 日本語 한국어\n".encode(),
    "invalid_utf8": b"ok \xff\xfe\xc3( \xed\xa0\x80 \xf4\x90\x80\x80 end",
    "crlf": b"line one\r\nline two\r\n\r\n",
    "nul_and_controls": b"a\x00b\x04c\x06d\x13\x14\x16\x1d\x7f e",
    "special_tokens": b"<|endoftext|><|im_start|>user\nhi<|im_end|>\n<s></s>",
    "missing_bytes": bytes([0xC0, 0xC1, 0xF1, 0xF2] + list(range(0xF5, 0x100))),
    "random": bytes(range(256)) * 3,
}


@pytest.fixture(scope="session")
def loaded_model():
    return models.load()


@pytest.fixture(scope="session")
def tokenizer(loaded_model):
    return ByteTokenizer(loaded_model.tokenizer, loaded_model.arch.vocab_size)


@pytest.fixture(scope="session")
def codec(loaded_model):
    return lmcodec.Codec(**FAST)


def make_tiny_llama(d, loaded_model, *, max_positions: int = 512, seed: int = 0):
    """Save a 2-layer random Llama sharing SmolLM2's tokenizer in ``d`` (head dim 16)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=loaded_model.arch.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_positions, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(d)
    PreTrainedTokenizerFast(tokenizer_object=loaded_model.tokenizer).save_pretrained(d)
    return d


def make_tiny_gemma(d, loaded_model, *, max_positions: int = 512, seed: int = 0, window: int = 8):
    """Save a 3-layer random Gemma 3 (local, local, global; sliding window ``window``; head dim 32,
    4 query heads, 1 KV head) sharing SmolLM2's tokenizer in ``d``.  Its RMSNorm weights are
    drawn at random too (HF initializes them to 0, i.e. gains of exactly 1)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=loaded_model.arch.vocab_size, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                           query_pre_attn_scalar=24, sliding_window=window,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
                           max_position_embeddings=max_positions, tie_word_embeddings=True)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name.endswith("norm.weight"):
                w.normal_(0.0, 0.5)
    model.save_pretrained(d)
    PreTrainedTokenizerFast(tokenizer_object=loaded_model.tokenizer).save_pretrained(d)
    return d


def load_tiny(d):
    """(integer model, tokenizer) of a model directory made by :func:`make_tiny_llama`."""
    from lmcodec.engine.model.quantize import load_int_model

    loaded = models.load(d)
    tok = ByteTokenizer(loaded.tokenizer, loaded.arch.vocab_size)
    return load_int_model(loaded, tok.fingerprint), tok


def archive_blocks(blob: bytes):
    """(header, blocks) of an archive, read with the format's Reader."""
    import io

    from lmcodec.format.container import End
    from lmcodec.format.reader import Reader

    reader = Reader(io.BytesIO(blob), len(blob))
    header = reader.header()
    blocks = []
    while not isinstance(rec := reader.next(header), End):
        blocks.append(rec)
    return header, blocks


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, loaded_model):
    """A real, different model: a 2-layer random Llama sharing SmolLM2's tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), loaded_model)


def guessed_passes(run, vocab: int, passes: int, seed: int) -> list:
    """Drive a RowStep or GraphStep through passes of random widths with random guesses per row
    (within :meth:`room`), a random number of them held, and rows restarted now and then; return
    every used output (h, e) of every pass.  Two steps driven with one seed must return the same."""
    rng = np.random.default_rng(seed)
    rows, out = run.rows, []
    for t in range(passes):
        if t % 11 == 7:
            run.start([t % rows])
        T = int(rng.integers(1, run.spare + 2))
        k = np.minimum(rng.integers(0, T, rows), run.room(np.arange(rows)))
        tokens = rng.integers(0, vocab, (rows, T))
        run.advance(tokens, guesses=k)
        used = torch.as_tensor([r * T + j for r in range(rows) for j in range(int(k[r]) + 1)])
        out.append((run.h[used].cpu().clone(), run.e[used].cpu().clone()))
        run.skip(np.arange(rows), rng.integers(0, k + 1))
    return out


def rows_by_plan(engine, run, seqs: list, plan: list, steps: int, rng=None) -> dict:
    """Drive a RowStep/GraphStep by ``plan`` [(sequence, row, first step)]: each sequence is fed
    token by token in its row from its first step on, rows idle otherwise (fed ``rng``'s random
    tokens, or 0 without one: no query reads what they write).  Returns per sequence the
    logits (lam rows, exps) of every prediction its row made, in order."""
    got = {s: ([], []) for s in range(len(seqs))}
    where = {}                                   # row -> (sequence, tokens fed)
    for step in range(steps):
        for s, row, first in plan:
            if first == step:
                run.start([row])
                where[row] = (s, 0)
        feed = (rng.integers(0, engine.arch.vocab_size, run.rows) if rng is not None
                else np.zeros(run.rows, dtype=np.int64))
        live = np.zeros(run.rows, dtype=bool)
        lg = engine.logits(run.h, run.e)
        for row, (s, k) in list(where.items()):
            got[s][0].append(lg.lam[row].numpy())
            got[s][1].append(int(lg.exp[row]))
            feed[row], live[row] = seqs[s][k], True
            if k + 1 == len(seqs[s]):
                del where[row]
            else:
                where[row] = (s, k + 1)
        run.advance(feed, live)
    assert not where, "the plan's steps end before its sequences"
    return got
