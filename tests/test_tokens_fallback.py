"""Byte-fallback (SentencePiece-style) vocabularies: bytes -> symbols -> bytes is exact.

A small byte-fallback BPE built with the ``tokenizers`` library covers the code path
everywhere; the real Gemma 3 tokenizer is tested where its package is installed.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from lmcodec.coding.tokens import ByteTokenizer, is_byte_fallback

HOSTILE = [
    b"", b" ", b"  leading spaces", b" " * 300, b"trailing   ", b"\x00", b"a\x00b\x00\x00c",
    b"\xff\xfe\xc3( \xed\xa0\x80 \xf4\x90\x80\x80", b"\r\n\r\n\t\x0b\x0c\x1c\x85",
    "a\u2581b \u2581\u2581 c".encode(), "\u2581".encode() * 5, "Grüße 😀👍🏽 中文字符\n".encode(),
    b"<bos><eos><unk><pad><s></s><0x41><start_of_turn>", bytes(range(256)) * 2,
    "x\udc80y".encode("utf-8", "surrogateescape"), b"line\n" * 50 + "odd \u2581 line\n".encode() + b"more\n" * 50,
]


def _synthetic() -> tuple[Tokenizer, int]:
    """A byte-fallback BPE: specials, the 256 byte tokens, "▁" and a few merged pieces."""
    pieces = ["<unk>", "<bos>", "<eos>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["\u2581", "a", "b", "c", "t", "h", "e", "ab", "\u2581a", "\u2581ab", "th", "the", "\u2581the", "\n"]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [("\u2581", "a"), ("\u2581a", "b"), ("a", "b"), ("t", "h"), ("th", "e"), ("\u2581", "the")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken("<unk>", special=True), AddedToken("<bos>", special=True),
                            AddedToken("<eos>", special=True)])
    return tok, len(vocab)


@pytest.mark.parametrize("prefix", ["normalizer", "metaspace"])
def test_a_tokenizer_that_adds_a_space_prefix_is_read_without_it(prefix):
    """SentencePiece's add_space_prefix (a Prepend normalizer, or a Metaspace pre-tokenizer) would
    make every piece start with a space that is not in the data; lmcodec tokenizes without it."""
    tok, size = _synthetic()
    if prefix == "normalizer":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    assert tok.encode("ab", add_special_tokens=False).tokens == ["\u2581ab"]      # the prefix is there
    byte_tok = ByteTokenizer(tok, size)
    vocab = tok.get_vocab()
    assert byte_tok.encode(b"ab ab").tolist() == [vocab["ab"], vocab["\u2581ab"]]
    for data in HOSTILE:
        assert byte_tok.decode(byte_tok.encode(data)) == data


@pytest.fixture(scope="module")
def synthetic() -> ByteTokenizer:
    tok, size = _synthetic()
    return ByteTokenizer(tok, size)


def test_the_vocabulary_kind_comes_from_the_tokenizer(synthetic, tokenizer):
    assert synthetic.byte_fallback and is_byte_fallback(synthetic._tok)
    assert not tokenizer.byte_fallback          # SmolLM2: byte-level BPE, its table as before


def test_byte_tokens_spell_every_byte_and_specials_are_never_emitted(synthetic):
    assert synthetic.missing_bytes == []
    vocab = synthetic._tok.get_vocab()
    assert synthetic.decode([vocab["<0x41>"], vocab["\u2581ab"], vocab["\u2581"]]) == b"A ab "
    assert synthetic.start_token == vocab["<bos>"]
    for name in ("<unk>", "<bos>", "<eos>"):
        with pytest.raises(ValueError):
            synthetic.decode([vocab[name]])
    symbols = synthetic.encode(b"<bos> ab\xff")
    assert vocab["<bos>"] not in symbols.tolist() and synthetic.decode(symbols) == b"<bos> ab\xff"
    assert not (symbols >= synthetic.vocab_size).any()     # no escapes: byte tokens spell all


def test_pieces_are_used_and_an_odd_spot_costs_only_its_line(synthetic):
    vocab = synthetic._tok.get_vocab()
    assert synthetic.encode(b" the ab").tolist() == [vocab["\u2581the"], vocab["\u2581ab"]]
    data = b" ab\n" * 20 + "a\u2581b\n".encode() + b" ab\n" * 20
    symbols = synthetic.encode(data).tolist()
    assert synthetic.decode(symbols) == data
    assert symbols.count(vocab["\u2581ab"]) == 40


@pytest.mark.parametrize("data", HOSTILE)
def test_hostile_bytes_round_trip(synthetic, data):
    assert synthetic.decode(synthetic.encode(data)) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_round_trip(synthetic, data):
    assert synthetic.decode(synthetic.encode(data)) == data


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(" abthe\n\u2581\x00\t") + ["\udc80", "é"]), max_size=200))
def test_any_text_of_the_vocabulary_round_trips(synthetic, text):
    data = text.encode("utf-8", errors="surrogateescape")
    assert synthetic.decode(synthetic.encode(data)) == data


def test_the_model_sees_tokens_only(synthetic):
    symbols = synthetic.encode(bytes(range(256)))
    assert np.array_equal(synthetic.model_inputs(symbols), symbols)


# -- the real Gemma 3 tokenizer (262,144 tokens), where its package is installed -----------------

GEMMA = "gemma3-270m"


@pytest.fixture(scope="module")
def gemma() -> ByteTokenizer:
    """Gemma 3's tokenizer as transformers builds it from the registered GGUF (assembled once)."""
    from lmcodec.engine.model import registry as registry

    if not registry.parts_present(registry.REGISTRY[GEMMA].package):
        pytest.skip("the Gemma package (lmcodec[gemma]) is not installed")
    from transformers import AutoTokenizer

    path = registry.assembled(GEMMA)
    fast = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return ByteTokenizer(fast.backend_tokenizer, 262_144)


def test_gemma_is_read_as_byte_fallback(gemma):
    vocab = gemma._tok.get_vocab()
    assert gemma.byte_fallback and gemma.missing_bytes == [] and gemma.alphabet_size == 262_400
    assert gemma.start_token == vocab["<bos>"] != vocab["<s>"]     # "<s>" is a plain piece in Gemma
    assert gemma.decode([vocab["\u2581world"], vocab["<0x0A>"]]) == b" world\n"
    for name in ("<bos>", "<eos>", "<pad>", "<start_of_turn>"):
        with pytest.raises(ValueError):
            gemma.decode([vocab[name]])


def test_gemma_tokenizes_prose_with_its_pieces(gemma):
    text = b"The quick brown fox jumps over the lazy dog.  Two spaces,\ttabs and\r\nlines.\n" * 4
    symbols = gemma.encode(text)
    assert gemma.decode(symbols) == text and len(symbols) < len(text) / 3
    assert not (symbols >= gemma.vocab_size).any()


@pytest.mark.parametrize("data", HOSTILE)
def test_gemma_hostile_bytes_round_trip(gemma, data):
    assert gemma.decode(gemma.encode(data)) == data


def test_gemma_samples_round_trip(gemma):
    from conftest import SAMPLES

    for name, data in SAMPLES.items():
        assert gemma.decode(gemma.encode(data)) == data, name


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_gemma_any_bytes_round_trip(gemma, data):
    assert gemma.decode(gemma.encode(data)) == data


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_gemma_any_text_round_trips(gemma, text):
    data = text.encode("utf-8", errors="surrogatepass")
    assert gemma.decode(gemma.encode(data)) == data


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([" ", "  ", "\u2581", "\t", "\n", "\r", "\x00", "\x7f", "\udc80", "\ud800",
                                 "a", "The", "é", "中", "😀", "<0x41>", "<bos>"]), max_size=120))
def test_gemma_spaces_controls_and_surrogates_round_trip(gemma, pieces):
    data = "".join(pieces).encode("utf-8", errors="surrogatepass")
    assert gemma.decode(gemma.encode(data)) == data
