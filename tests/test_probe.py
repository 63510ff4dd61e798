"""The memorization probe (lmcodec.probe.probe, probe_render, `lmcodec probe`) on the real default model."""

from __future__ import annotations

import json
import math
import zlib
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner

from lmcodec.cli.main import main
from lmcodec.errors import UsageError
from lmcodec.probe.probe import (
    SCHEMA_VERSION,
    Thresholds,
    TokenScore,
    build_words,
    flag_spans,
    group_words,
    plan_windows,
    probe,
)
from lmcodec.probe.render import render_html, render_png, surprisal_rgb

TEXT = (b"The quick brown fox jumps over the lazy dog. It was a bright cold day in April, "
        b"and the clocks were striking thirteen.\n")
PROMPT = b"A pangram, then the first line of George Orwell's novel 1984:"
REPEATED = b"My hovercraft is full of eels, said the tourist to the shopkeeper. " * 3

TOP_KEYS = {"schema", "model", "bytes", "bits", "bpb", "zlib_bpb", "zlib_ratio", "prompt_bytes",
            "prompt_tokens", "bits_without_prompt", "prompt_saves_bits", "settings", "tokens", "words",
            "flagged_spans"}
TOKEN_KEYS = {"text", "id", "offset", "probability", "surprisal_bits", "rank", "word", "alternatives"}
WORD_KEYS = {"text", "start_token", "end_token", "probability", "surprisal_bits"}
SPAN_KEYS = {"start_token", "end_token", "text", "mean_probability"}
SETTINGS_KEYS = {"window", "min_context", "top_k", "device", "min_probability", "min_tokens", "min_words"}


@pytest.fixture(scope="module")
def result(loaded_model):
    return probe(TEXT, model=loaded_model)


@pytest.fixture(scope="module")
def prompted(loaded_model):
    return probe(TEXT, prompt=PROMPT, model=loaded_model)


@pytest.fixture
def runner():
    return CliRunner()


# -- pure logic ---------------------------------------------------------------------------

def test_plan_windows_covers_every_token_once_with_context():
    cases = [(10, 1, 1024, 512), (5000, 1, 1024, 512), (300, 20, 64, 32), (97, 1, 32, 8)]
    for n, prefix, window, ctx in cases:
        plan = plan_windows(n, prefix, window, ctx)
        scored = [i for _, s, e in plan for i in range(s, e)]
        assert scored == list(range(n))
        for k, (c, s, e) in enumerate(plan):
            assert prefix + e - c <= window
            if k:
                assert s - c == min(ctx, (window - prefix) // 2)
    with pytest.raises(UsageError):
        plan_windows(10, 40, 40, 8)


def _tok(raw: bytes, p: float = 0.9) -> TokenScore:
    return TokenScore(0, raw, 0, p, -math.log2(p), 1, [], None)


def test_group_words_and_spans():
    raws = [b"Color", b"less", b" green", b"\n\n", b"ideas", b".", b" ", b" sleep"]
    assert group_words(raws) == [0, 0, 1, None, 2, 2, None, 3]
    tokens = [_tok(r) for r in raws]
    for t, w in zip(tokens, group_words(raws)):
        t.word = w
    words = build_words(tokens)
    assert [w.text for w in words] == ["Colorless", "green", "ideas.", "sleep"]
    assert (words[2].start_token, words[2].end_token) == (4, 6)
    assert words[0].surprisal_bits == pytest.approx(2 * -math.log2(0.9))
    assert words[0].probability == pytest.approx(0.81)
    spans = flag_spans(tokens, Thresholds(0.5, 8, 4))
    assert [(s.start_token, s.end_token) for s in spans] == [(0, 8)]
    assert spans[0].text == b"".join(raws).decode() and spans[0].mean_probability == pytest.approx(0.9)
    assert flag_spans(tokens, Thresholds(0.5, 8, 5)) == []   # only 4 words
    assert flag_spans(tokens, Thresholds(0.95, 1, 0)) == []  # nothing that confident
    tokens[3].probability = 0.1
    assert flag_spans(tokens, Thresholds(0.5, 8, 4)) == []   # run broken in two
    with pytest.raises(UsageError):
        Thresholds(0.0).check()


# -- the real model -----------------------------------------------------------------------

def test_values_are_sane(result):
    assert b"".join(t.raw for t in result.tokens) == TEXT
    ends = np.cumsum([len(t.raw) for t in result.tokens])
    assert [t.offset for t in result.tokens] == [0, *ends[:-1].tolist()]
    for t in result.tokens:
        assert 0 < t.probability <= 1
        assert t.surprisal_bits == pytest.approx(-math.log2(t.probability))
        assert t.rank >= 1 and len(t.alternatives) == 5
        probs = [a.probability for a in t.alternatives]
        assert probs == sorted(probs, reverse=True) and all(0 < q <= 1 for q in probs)
        if t.rank <= 5:
            assert probs[t.rank - 1] == pytest.approx(t.probability)
        else:
            assert t.probability <= probs[-1]
    assert result.bits == pytest.approx(sum(t.surprisal_bits for t in result.tokens))
    assert 0 < result.bpb < 8
    assert result.zlib_bpb == pytest.approx(8 * len(zlib.compress(TEXT, 9)) / len(TEXT))
    assert result.zlib_ratio == pytest.approx(result.bpb / result.zlib_bpb) and result.zlib_ratio > 0
    assert [w.text for w in result.words] == TEXT.decode().split()
    word_bits = sum(w.surprisal_bits for w in result.words)
    space_bits = sum(t.surprisal_bits for t in result.tokens if t.word is None)
    assert word_bits + space_bits == pytest.approx(result.bits)
    assert result.prompt_saves_bits is None and result.bits_without_prompt is None


def test_json_schema_is_stable(result, prompted):
    for doc in (result.to_json(), prompted.to_json()):
        doc = json.loads(json.dumps(doc))
        assert set(doc) == TOP_KEYS and doc["schema"] == SCHEMA_VERSION == 2
        assert set(doc["settings"]) == SETTINGS_KEYS
        assert doc["model"] == "smollm2-135m" and doc["bytes"] == len(TEXT)
        assert all(set(t) == TOKEN_KEYS for t in doc["tokens"])
        assert all(set(a) == {"text", "probability"} for t in doc["tokens"] for a in t["alternatives"])
        assert all(set(w) == WORD_KEYS for w in doc["words"])
        assert all(set(s) == SPAN_KEYS for s in doc["flagged_spans"])
    doc = result.to_json()
    assert doc["prompt_bytes"] is doc["bits_without_prompt"] is doc["prompt_saves_bits"] is None
    assert doc["tokens"][0]["text"] == "The" and doc["words"][1]["text"] == "quick"


def test_prompt_saves_bits(result, prompted):
    assert prompted.prompt_bytes == len(PROMPT) and prompted.prompt_tokens > 0
    assert prompted.bits_without_prompt == pytest.approx(result.bits, rel=1e-5)
    assert prompted.prompt_saves_bits == pytest.approx(prompted.bits_without_prompt - prompted.bits)
    assert prompted.prompt_saves_bits > 0


def test_windows_and_batches_agree(loaded_model):
    # A 32-token window scores the first 31 tokens with the same context as one long window;
    # the later windows (padded to the first one's length in a batch) see 8 tokens of context.
    text = TEXT * 2
    small = probe(text, model=loaded_model, window=32, min_context=8, batch_size=3, top_k=0)
    one = probe(text, model=loaded_model, window=32, min_context=8, batch_size=1, top_k=0)
    n = 31
    a = np.array([t.probability for t in probe(text, model=loaded_model, top_k=0).tokens])
    b = np.array([t.probability for t in small.tokens])
    c = np.array([t.probability for t in one.tokens])
    assert len(a) > n
    np.testing.assert_allclose(b[:n], a[:n], rtol=1e-3)
    np.testing.assert_allclose(b, c, rtol=1e-3)  # batching (and padding) changes nothing
    assert 0 < small.bpb < 8 and not np.allclose(b[n:], a[n:], rtol=1e-6)


def test_repetition_is_flagged_and_progress_reported(loaded_model):
    seen = []
    r = probe(REPEATED, model=loaded_model, progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1] == len(r.tokens)
    assert r.flagged_spans, "an in-context repetition should be predicted with high probability"
    first = len(r.tokens) // 3
    span = max(r.flagged_spans, key=lambda s: s.end_token - s.start_token)
    assert span.start_token >= first - 1 and span.mean_probability >= 0.5
    assert "hovercraft" in span.text or "eels" in span.text
    assert all(t.probability >= 0.5 for t in r.tokens[span.start_token:span.end_token])


def test_escaped_bytes_have_probabilities(loaded_model):
    r = probe(b"ok \xff\xfe end", model=loaded_model, top_k=2)
    escaped = [t for t in r.tokens if t.id >= loaded_model.arch.vocab_size]
    assert escaped and all(0 < t.probability < 1e-4 and t.text == "\ufffd" for t in escaped)
    assert all(len(t.alternatives) == 2 for t in r.tokens)
    assert b"".join(t.raw for t in r.tokens) == b"ok \xff\xfe end"


def test_usage_errors(loaded_model):
    with pytest.raises(UsageError):
        probe(b"", model=loaded_model)
    with pytest.raises(UsageError):
        probe(b"x", model=loaded_model, window=8)
    with pytest.raises(UsageError):
        probe(b"x", model=loaded_model, thresholds=Thresholds(min_probability=2.0))


# -- rendering ----------------------------------------------------------------------------

class _Balance(HTMLParser):
    VOID = {"meta", "br", "hr", "img", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.tags, self.data, self.errors = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)

    def handle_data(self, data):
        self.data.append(data)


def test_html_is_well_formed_and_escaped(loaded_model):
    nasty = b'<script>alert("x")</script> & \'quotes\' <b>bold</b>\n'
    r = probe(nasty, model=loaded_model)
    page = render_html(r, title="<title> & co")
    p = _Balance()
    p.feed(page)
    p.close()
    assert not p.errors and not p.stack
    assert "script" not in p.tags and "b" not in p.tags
    assert "<script" not in page and "<b>" not in page and "&lt;title&gt; &amp; co" in page
    heat = page[page.index('<div class="heat">'):]
    assert "".join(p.data).count('<script>alert("x")</script>') >= 1
    assert heat.count("<span") == len(r.tokens) and heat.count("title=") == len(r.tokens)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert surprisal_rgb(0) == (255, 255, 204) and surprisal_rgb(100) == (128, 0, 38)


def test_png_is_written(result, tmp_path):
    out = tmp_path / "heat.png"
    render_png(result, out, title="test $x$ <y>")
    blob = out.read_bytes()
    assert blob.startswith(b"\x89PNG\r\n\x1a\n") and len(blob) > 2000


# -- command line -------------------------------------------------------------------------

def test_cli_text_table(runner):
    r = runner.invoke(main, ["probe", TEXT.decode()])
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert '"The"' in out and '" quick"' in out and "top alternatives" in out
    assert "bpb:" in out and "zlib_ratio:" in out and "flagged spans" in out


def test_cli_json_html_png_and_prompt(runner, tmp_path, prompted):
    src = tmp_path / "t.txt"
    src.write_bytes(TEXT)
    (tmp_path / "prompt.txt").write_bytes(PROMPT)
    html_out, png_out = tmp_path / "o.html", tmp_path / "o.png"
    r = runner.invoke(main, ["-q", "probe", "--file", str(src), "--prompt-file", str(tmp_path / "prompt.txt"),
                             "--json", "--html", str(html_out), "--png", str(png_out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc) == TOP_KEYS and doc["bytes"] == len(TEXT)
    assert doc["prompt_saves_bits"] == pytest.approx(prompted.prompt_saves_bits, rel=1e-4)
    assert html_out.read_text().startswith("<!DOCTYPE html>")
    assert png_out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = runner.invoke(main, ["probe", "--summary", "--prompt", PROMPT.decode(), TEXT.decode()])
    assert r.exit_code == 0 and "prompt saves:" in r.stdout and "top alternatives" not in r.stdout


@pytest.mark.parametrize("args, code, needle", [
    (["probe", "hello", "--file", "x.txt"], 2, "not both"),
    (["probe"], 2, "nothing to probe"),
    (["probe", ""], 2, "empty"),
    (["probe", "hi", "--prompt", "a", "--prompt-file", "p.txt"], 2, "not both"),
    (["probe", "--file", "/nonexistent/file.txt"], 1, "No such file"),
    (["probe", "hi", "--model", "no-such-model"], 1, "unknown model"),
    (["probe", "hi", "--min-probability", "0"], 2, "min-probability"),
])
def test_cli_errors_are_one_line(runner, args, code, needle):
    r = runner.invoke(main, args)
    assert r.exit_code == code, r.output
    assert needle in r.stderr and "Traceback" not in r.output
    if code != 2 or needle != "min-probability":  # click's own usage errors print a usage block
        assert r.stderr.startswith("lmcodec: error:") and r.stderr.count("\n") == 1
