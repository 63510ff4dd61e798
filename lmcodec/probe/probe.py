"""Memorization probe: how much of a text the model already "knows".

Training compresses the training data into the weights.  A text the model has
memorized therefore costs far fewer bits under the model than its content
needs; a merely *predictable* text (boilerplate, repetition) is cheap under
zlib too.  Following Carlini et al. 2021 ("Extracting Training Data from Large
Language Models"), the signal is the ratio of the model's code length to
zlib's: ``zlib_ratio = bpb / zlib_bpb``.  A low ratio means the model finds
the text much easier than its surface statistics would explain.

Per token we report what the coder pays: the probability the exact engine's
integer coding frequencies give the actual continuation (so escaped bytes have
a probability too, and the figures are the same on every machine), its
surprisal in bits and the model's top alternatives.  Runs of confidently predicted tokens that span
several words are flagged as likely memorized spans.

With a prompt, the text is scored twice -- after the prompt and without it --
and the difference is the number of bits the prompt saves: a direct measure
of how much the prompt tells the model about the text.

Long texts are scored in overlapping windows (every scored token keeps at
least ``min_context`` tokens of context), several windows per forward pass.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..coding.frequencies import CodingTables
from ..coding.runner import score_ids
from ..coding.tokens import ByteTokenizer
from ..engine.engine import Engine, pick_device
from ..engine.model import registry as models
from ..engine.model.quantize import load_int_model
from ..engine.spec.constants import MAX_KEYS
from ..errors import UsageError
from .thresholds import DEFAULT_MIN_CONTEXT, DEFAULT_TOP_K, DEFAULT_WINDOW, Thresholds  # noqa: F401  (re-exported)

#: Version of the JSON document :meth:`ProbeResult.to_json` produces.  Bump it
#: whenever a key is added, removed or changes meaning.
SCHEMA_VERSION = 2
#: Bytes of float32 logits one forward pass may produce (batch x window x vocab).
LOGITS_BUDGET = {"cpu": 1 << 30, "cuda": 4 << 30}   # hidden rows of a batch (their tables go in chunks)
#: Probability-table rows converted to float64 at once (bounds peak memory).
TABLE_CHUNK = 256

#: ``progress(done, total)``: tokens scored so far, out of ``total``.
Progress = Callable[[int, int], None]


@dataclass
class Alternative:
    """One of the model's top predictions at a position."""

    text: str
    probability: float


@dataclass
class TokenScore:
    """What the model thought of one token of the text."""

    id: int               # symbol id; >= vocab size means an escaped raw byte
    raw: bytes            # the token's exact bytes
    offset: int           # byte offset of the token in the text
    probability: float    # p(token | context), from the coder's probability table
    surprisal_bits: float  # -log2 probability
    rank: int             # 1 = the model's top prediction
    alternatives: list[Alternative]
    word: int | None      # index into ProbeResult.words; None for whitespace-only tokens

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", errors="replace")


@dataclass
class WordScore:
    """A whitespace-delimited word: the tokens ``[start_token, end_token)``."""

    text: str
    start_token: int
    end_token: int
    surprisal_bits: float

    @property
    def probability(self) -> float:
        return float(2.0 ** -self.surprisal_bits)


@dataclass
class Span:
    """Tokens ``[start_token, end_token)`` the model predicted confidently in a row."""

    start_token: int
    end_token: int
    text: str
    mean_probability: float


@dataclass
class ProbeResult:
    """The probe of one text; :meth:`to_json` is the documented, versioned form."""

    model: str
    data: bytes
    tokens: list[TokenScore]
    words: list[WordScore]
    flagged_spans: list[Span]
    bits: float
    zlib_bytes: int
    prompt_bytes: int | None = None
    prompt_tokens: int | None = None
    bits_without_prompt: float | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    settings: dict = field(default_factory=dict)

    @property
    def bpb(self) -> float:
        """Model bits per byte: the ideal code length lmcodec's coder approaches."""
        return self.bits / len(self.data) if self.data else 0.0

    @property
    def zlib_bpb(self) -> float:
        """``8 * len(zlib.compress(data, 9)) / len(data)``, header and checksum included."""
        return 8 * self.zlib_bytes / len(self.data) if self.data else 0.0

    @property
    def zlib_ratio(self) -> float:
        """Carlini et al.'s signal: model entropy over zlib entropy; low = suspicious."""
        return self.bpb / self.zlib_bpb if self.zlib_bpb else 0.0

    @property
    def prompt_saves_bits(self) -> float | None:
        if self.bits_without_prompt is None:
            return None
        return self.bits_without_prompt - self.bits

    def to_json(self) -> dict:
        """The ``--json`` document (schema :data:`SCHEMA_VERSION`, see docs/PROBE.md)."""
        return {
            "schema": SCHEMA_VERSION,
            "model": self.model,
            "bytes": len(self.data),
            "bits": self.bits,
            "bpb": self.bpb,
            "zlib_bpb": self.zlib_bpb,
            "zlib_ratio": self.zlib_ratio,
            "prompt_bytes": self.prompt_bytes,
            "prompt_tokens": self.prompt_tokens,
            "bits_without_prompt": self.bits_without_prompt,
            "prompt_saves_bits": self.prompt_saves_bits,
            "settings": dict(self.settings, min_probability=self.thresholds.min_probability,
                             min_tokens=self.thresholds.min_tokens, min_words=self.thresholds.min_words),
            "tokens": [
                {"text": t.text, "id": t.id, "offset": t.offset, "probability": t.probability,
                 "surprisal_bits": t.surprisal_bits, "rank": t.rank, "word": t.word,
                 "alternatives": [{"text": a.text, "probability": a.probability} for a in t.alternatives]}
                for t in self.tokens
            ],
            "words": [
                {"text": w.text, "start_token": w.start_token, "end_token": w.end_token,
                 "probability": w.probability, "surprisal_bits": w.surprisal_bits}
                for w in self.words
            ],
            "flagged_spans": [
                {"start_token": s.start_token, "end_token": s.end_token, "text": s.text,
                 "mean_probability": s.mean_probability}
                for s in self.flagged_spans
            ],
        }


# -- windows ---------------------------------------------------------------------------

def plan_windows(n: int, prefix_len: int, window: int, min_context: int) -> list[tuple[int, int, int]]:
    """Cover ``n`` text tokens with windows of at most ``window`` tokens.

    Returns ``(context_start, score_start, score_end)`` in text-token indices:
    a window feeds ``prefix + text[context_start:score_end]`` and scores
    ``text[score_start:score_end]``.  The first window scores everything it
    holds; each later one repeats the last ``min(min_context, usable // 2)``
    tokens before it as context only, so no scored token is ever near the
    start of a cold context (except the text's own first tokens).
    """
    usable = window - prefix_len
    if usable < 2:
        raise UsageError("the window must hold the prompt and at least two text tokens")
    overlap = min(min_context, usable // 2)
    stride = usable - overlap
    out = [(0, 0, min(n, usable))]
    start = usable
    while start < n:
        end = min(n, start + stride)
        out.append((start - overlap, start, end))
        start = end
    return out


@dataclass
class _Scores:
    """Raw per-token numbers from :func:`score_symbols`."""

    probability: np.ndarray        # [N] float64
    top_ids: np.ndarray            # [N, k] int64, best first
    top_probability: np.ndarray    # [N, k] float64
    rank: np.ndarray               # [N] int64


def _auto_batch(engine: Engine, window: int, n_windows: int) -> int:
    per_row = window * engine.arch.intermediate_size * 2 * 8 * 4   # the widest activations, int64
    return max(1, min(n_windows, LOGITS_BUDGET.get(engine.device.type, 1 << 30) // per_row))


def _score_rows(engine: Engine, h: torch.Tensor, e: torch.Tensor, symbols: np.ndarray, top_k: int,
                alphabet: int, out: _Scores, at: int) -> None:
    """Coding probability of each actual symbol (and the top-k) from hidden rows [R, H]."""
    for c in range(0, h.shape[0], TABLE_CHUNK):
        rows = slice(c, c + TABLE_CHUNK)
        table = CodingTables(engine.weights(h[rows], e[rows], alphabet), alphabet).probabilities().cpu().numpy()
        syms = symbols[c:c + TABLE_CHUNK]
        idx = np.arange(len(syms))
        p = table[idx, syms]
        sl = slice(at + c, at + c + len(syms))
        out.probability[sl] = p
        if top_k:
            part = np.argpartition(-table, top_k - 1, axis=1)[:, :top_k]
            part_p = np.take_along_axis(table, part, axis=1)
            order = np.argsort(-part_p, axis=1, kind="stable")
            out.top_ids[sl] = np.take_along_axis(part, order, axis=1)
            out.top_probability[sl] = np.take_along_axis(part_p, order, axis=1)
        out.rank[sl] = (table > p[:, None]).sum(axis=1) + 1


def score_symbols(engine: Engine, tok: ByteTokenizer, prefix: list[int], symbols: np.ndarray, *,
                  window: int = DEFAULT_WINDOW, min_context: int = DEFAULT_MIN_CONTEXT,
                  top_k: int = DEFAULT_TOP_K, batch_size: int | None = None,
                  progress: Callable[[int], None] | None = None) -> _Scores:
    """Score every symbol after ``prefix`` with causal passes over batched windows.

    Windows of one batch are right-padded to the same length; causal attention
    means padding never reaches the positions that are read.
    """
    n = len(symbols)
    inputs = tok.model_inputs(symbols)
    plan = plan_windows(n, len(prefix), window, min_context)
    batch = batch_size or _auto_batch(engine, window, len(plan))
    out = _Scores(np.zeros(n), np.zeros((n, top_k), np.int64), np.zeros((n, top_k)), np.zeros(n, np.int64))
    p = len(prefix)
    for b0 in range(0, len(plan), batch):
        group = plan[b0:b0 + batch]
        T = max(p + end - ctx for ctx, _, end in group)
        ids = np.full((len(group), T), tok.placeholder, dtype=np.int64)
        for row, (ctx, _, end) in enumerate(group):
            ids[row, :p] = prefix
            ids[row, p:p + end - ctx] = inputs[ctx:end]
        h, e = score_ids(engine, torch.from_numpy(ids))
        for row, (ctx, start, end) in enumerate(group):
            # The pass at window position i predicts the token at i + 1.
            first = row * T + p + (start - ctx) - 1
            rows = slice(first, first + end - start)
            _score_rows(engine, h[rows], e[rows], symbols[start:end], top_k, tok.alphabet_size, out, start)
            if progress is not None:
                progress(end - start)
        del h, e
    return out


# -- words and spans ------------------------------------------------------------------

def group_words(raws: list[bytes]) -> list[int | None]:
    """Word index of each token (``None`` for whitespace-only tokens).

    A word is what ``str.split()`` would give, cut at token boundaries: a new
    word starts at a token that begins with whitespace or follows whitespace.
    Byte-level BPE glues the leading space to the word (" green"), so a word's
    bits include the cost of its separator -- as the coder pays them.
    """
    out: list[int | None] = []
    word = -1
    after_space = True
    for raw in raws:
        if not raw.strip():
            out.append(None)
            after_space = True
            continue
        if after_space or raw[:1].isspace():
            word += 1
        out.append(word)
        after_space = raw[-1:].isspace()
    return out


def build_words(tokens: list[TokenScore]) -> list[WordScore]:
    """Collect tokens into :class:`WordScore` s using their ``word`` indices."""
    words: list[WordScore] = []
    for i, t in enumerate(tokens):
        if t.word is None:
            continue
        if t.word == len(words):
            words.append(WordScore("", i, i + 1, 0.0))
        w = words[t.word]
        w.end_token = i + 1
        w.surprisal_bits += t.surprisal_bits
    for w in words:
        raw = b"".join(t.raw for t in tokens[w.start_token:w.end_token])
        w.text = raw.decode("utf-8", errors="replace").strip()
    return words


def flag_spans(tokens: list[TokenScore], thresholds: Thresholds) -> list[Span]:
    """Maximal runs of tokens with p >= ``min_probability`` that are long enough."""
    spans: list[Span] = []
    i, n = 0, len(tokens)
    while i < n:
        if tokens[i].probability < thresholds.min_probability:
            i += 1
            continue
        j = i
        while j < n and tokens[j].probability >= thresholds.min_probability:
            j += 1
        run = tokens[i:j]
        n_words = len({t.word for t in run if t.word is not None})
        if len(run) >= thresholds.min_tokens and n_words >= thresholds.min_words:
            text = b"".join(t.raw for t in run).decode("utf-8", errors="replace")
            spans.append(Span(i, j, text, float(np.mean([t.probability for t in run]))))
        i = j
    return spans


# -- the API -----------------------------------------------------------------------------

_ENGINES: dict[tuple, Engine] = {}


def _engine(model: models.LoadedModel, tok: ByteTokenizer, device: str, dictionary=None) -> Engine:
    key = (model.model_fingerprint, device, None if dictionary is None else dictionary.fingerprint())
    if key not in _ENGINES:
        int_model = load_int_model(model, tok.fingerprint)
        if dictionary is not None:
            int_model = dictionary.apply(int_model)
        _ENGINES[key] = Engine(int_model, device)
    return _ENGINES[key]


def _as_bytes(x: bytes | str | None) -> bytes | None:
    if x is None:
        return None
    return x.encode("utf-8") if isinstance(x, str) else bytes(x)


def probe(data: bytes | str, *, prompt: bytes | str | None = None,
          model: str | os.PathLike | models.LoadedModel | None = None,
          top_k: int = DEFAULT_TOP_K, window: int = DEFAULT_WINDOW,
          min_context: int = DEFAULT_MIN_CONTEXT, thresholds: Thresholds = Thresholds(),
          batch_size: int | None = None, device: str = "auto",
          progress: Progress | None = None, dictionary=None) -> ProbeResult:
    """Score ``data`` token by token under ``model`` (default smollm2-135m).

    The context is ``[start token] + prompt tokens + text tokens``; only the
    text is scored.  A prompt longer than a quarter of the window keeps its
    last ``window // 4`` tokens (it stays in every window, as the codec keeps
    its prefix).  With a prompt the text is scored a second time without it,
    for ``bits_without_prompt``.  ``dictionary`` (an :class:`lmcodec.Adapter`):
    score under the adapted model, its primer as the prompt when none is given.
    """
    data = _as_bytes(data)
    prompt = _as_bytes(prompt)
    if prompt is None and dictionary is not None:
        prompt = dictionary.primer
    if not data:
        raise UsageError("nothing to probe: the text is empty")
    if not 32 <= window <= MAX_KEYS:
        raise UsageError(f"the window must be 32..{MAX_KEYS} tokens")
    if not 0 <= min_context < window:
        raise UsageError("the minimum context must be >= 0 and smaller than the window")
    if not 0 <= top_k <= 100:
        raise UsageError("top-k must be 0..100")
    if batch_size is not None and batch_size < 1:
        raise UsageError("the batch size must be >= 1")
    thresholds.check()
    m = model if isinstance(model, models.LoadedModel) else models.load(model)
    device = pick_device(device)
    tok = ByteTokenizer(m.tokenizer, m.arch.vocab_size)
    engine = _engine(m, tok, device, dictionary)
    symbols = tok.encode(data)
    prefix = [tok.start_token]
    prompt_ids: list[int] = []
    if prompt:
        prompt_ids = tok.model_inputs(tok.encode(prompt)).tolist()[-(window // 4):]
    total = len(symbols) * (2 if prompt is not None else 1)
    done = [0]

    def tick(k: int) -> None:
        done[0] += k
        if progress is not None:
            progress(done[0], total)

    common = dict(window=window, min_context=min_context, batch_size=batch_size, progress=tick)
    with torch.inference_mode():
        scores = score_symbols(engine, tok, prefix + prompt_ids, symbols, top_k=top_k, **common)
        without = None
        if prompt is not None:
            without = score_symbols(engine, tok, prefix, symbols, top_k=0, **common)

    alt_text: dict[int, str] = {}

    def text_of(i: int) -> str:
        if i not in alt_text:
            alt_text[i] = tok.decode([i]).decode("utf-8", errors="replace")
        return alt_text[i]

    raws = [tok.decode([s]) for s in symbols.tolist()]
    word_of = group_words(raws)
    bits = -np.log2(scores.probability)
    tokens: list[TokenScore] = []
    offset = 0
    for i, (sym, raw) in enumerate(zip(symbols.tolist(), raws)):
        alts = [Alternative(text_of(int(a)), float(q))
                for a, q in zip(scores.top_ids[i], scores.top_probability[i])]
        tokens.append(TokenScore(sym, raw, offset, float(scores.probability[i]), float(bits[i]),
                                 int(scores.rank[i]), alts, word_of[i]))
        offset += len(raw)
    return ProbeResult(
        model=m.name, data=data, tokens=tokens, words=build_words(tokens),
        flagged_spans=flag_spans(tokens, thresholds), bits=float(bits.sum()),
        zlib_bytes=len(zlib.compress(data, 9)),
        prompt_bytes=len(prompt) if prompt is not None else None,
        prompt_tokens=len(prompt_ids) if prompt is not None else None,
        bits_without_prompt=float(-np.log2(without.probability).sum()) if without is not None else None,
        thresholds=thresholds,
        settings={"window": window, "min_context": min_context, "top_k": top_k,
                  "device": device},
    )
