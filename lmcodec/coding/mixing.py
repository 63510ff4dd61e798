"""Online models mixed with the language model, in exact integer arithmetic.

The language model sees at most ``context`` tokens and never learns.  Beside it,
a stream keeps *online* models that learn from the symbols coded so far, on both
sides identically:

* **n-gram counts** of orders 0..4 over symbols: order 0 is a cache of recent
  symbols (its counts are halved often, so it follows the text), orders 1..4
  count what followed the last 1..4 symbols;
* a **match model**: the longest earlier occurrence of the last
  :data:`MATCH_MIN` symbols predicts the symbol that followed it (long repeats:
  logs, code, repeated passages, anything beyond the LM's window).

Their predictions are mixed with the LM's integer symbol weights ``p``
(:meth:`lmcodec.engine.engine.Engine.weights`) as a linear mixture whose weights are
learned online (one weight vector per small *mixing context*: how long the
current match is, the highest n-gram order that has seen its context).  After a
symbol is coded, each active component's weight moves towards its share of
that symbol's mixed mass (online EM for mixture weights).

Everything here is integer arithmetic on Python ints and int64 tensors, with
every shift and floor written down, so the encoder and the decoder compute the
same mixture on any machine.  The output is again a row of integer symbol
weights, which :class:`lmcodec.coding.frequencies.CodingTables` turns into coding
frequencies summing to 2^24: a mixture that does not sum to one cannot exist
here, because the coder only ever sees normalised integer frequencies.

Order of work (the decoder's constraint): a stream's lanes advance in
lockstep, so at step ``t`` every lane is predicted from the state after step
``t - 1`` -- including the symbols the *other* lanes have coded so far -- and
the state then takes step ``t``'s symbols in lane order.  The encoder replays
exactly that order.

Who runs this code: the tensor path (CUDA) and the tests, for which it is the definition.
On a CPU the same integers come from compiled code on arrays (:mod:`lmcodec.coding.online`,
:mod:`lmcodec.coding.mixedpass`), held to :class:`StreamMixer` archive byte for archive byte
by ``tests/test_passes.py`` and ``tests/test_online.py``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine.ops_torch import weights_from_gaps
from ..engine.spec.constants import ESCAPES, OUT_U_CAP
from . import bias_cpu
from .frequencies import bucket_width
from .mixerconfig import ALL, BIAS_BIT, MATCH_BIT, ORDER_BITS, MixerConfig  # noqa: F401  (re-exported)

MATCH_MIN = 6           # symbols of context a match must share
MATCH_CAP = 64          # match lengths are measured up to this
MATCH_BUCKETS = (0, 15, 31)     # mixing context by match length: none, up to 15, up to 31, longer
WEIGHT_ONE = 1 << 16    # mixture weights are fractions of 2^16
WEIGHT_FLOOR = 16       # no active component's weight drops below 16 / 2^16
LM_START = WEIGHT_ONE - 1024   # the LM starts with almost all the weight
RATE_SHIFT = 5          # weights move 1/32 of the way to each symbol's responsibilities
MASS_BITS = 20          # a component of weight w contributes w * 2^20 to a row's total (~2^36)
#: Per order: counts of one context are halved when their total exceeds this.
COUNT_LIMIT = {0: 1 << 10, 1: 1 << 12, 2: 1 << 12, 3: 1 << 12, 4: 1 << 12}
#: The adaptive bias: one value per token in units of 2^-20 bits, applied to the
#: LM's gaps (2^-10 bits) shifted right by BIAS_FRAC; it stays within +-BIAS_CAP.
#: A token's learning rate falls with the number of times it has been coded in the
#: stream (``bias_rates``): BIAS_RATE (1 bit) for a token not coded yet, then
#: BIAS_RATE / sqrt(count + 1): fast for new tokens, slow for the frequent ones.
BIAS_FRAC = 10
BIAS_RATE = 1 << 20
BIAS_CAP = 16 << 20
BIAS_COUNT_CAP = 1 << 16


def bias_rates(rate: int = BIAS_RATE, cap: int = BIAS_COUNT_CAP) -> tuple[int, ...]:
    """Rate of a token coded ``c`` times so far, for c = 0 .. cap: ``floor(rate / sqrt(c + 1))``.

    Computed exactly as ``isqrt(rate^2 // (c + 1))`` (the same number: the floor of
    a square root does not change when its argument is floored first), so every
    implementation builds the same table.
    """
    return tuple(math.isqrt(rate * rate // (c + 1)) for c in range(cap + 1))


@functools.cache
def _rate_array() -> np.ndarray:
    """:func:`bias_rates` as an int64 array, built once and only read (the CPU kernels, bias_cpu)."""
    return np.asarray(bias_rates(BIAS_RATE, BIAS_COUNT_CAP), dtype=np.int64)


@functools.cache
def _rate_table(device: torch.device) -> torch.Tensor:
    """:func:`_rate_array` as a tensor, made once per device and only read (shared by every stream)."""
    return torch.as_tensor(_rate_array(), device=device)


def biased_weights(u: torch.Tensor, bias: torch.Tensor | None, alphabet: int) -> torch.Tensor:
    """:meth:`Mixer.lm_weights` as tensor operations (any device; on a CPU bias_cpu computes the same)."""
    if bias is not None:
        u = u - (bias >> BIAS_FRAC)
        u = (u - u.amin(dim=1, keepdim=True)).clamp(max=OUT_U_CAP)
    return weights_from_gaps(u, alphabet, bucket_width(alphabet))


def bias_step(q: torch.Tensor, symbols: list[int], coded: torch.Tensor, bias: torch.Tensor, vocab: int) -> torch.Tensor:
    """:meth:`Mixer._learn_bias` as tensor operations (any device): counts ``coded`` in place, returns the new bias."""
    y = torch.as_tensor(symbols, dtype=torch.int64, device=q.device)
    ok = y < vocab
    if not bool(ok.any()):
        return bias
    y = y[ok]
    coded.index_add_(0, y, torch.ones_like(y)).clamp_(max=BIAS_COUNT_CAP)
    rate = _rate_table(y.device)[coded]
    q = q[ok, :vocab]
    down = torch.div(q * rate, q.sum(dim=1, keepdim=True), rounding_mode="floor").sum(dim=0)
    up = torch.zeros_like(down).index_add_(0, y, rate[y])
    return (bias + up - down).clamp(-BIAS_CAP, BIAS_CAP)


def _match_bucket(length: int) -> int:
    """Mixing context of a match length: 0 none, 1 short, 2 medium, 3 long."""
    return sum(1 for lo in MATCH_BUCKETS if length > lo)


def _confidence(total: int) -> int:
    """Mixing context of the LM's certainty: its weights total ``total``, its best symbol 2^30."""
    spread = total.bit_length() - 31      # 0: the top symbol holds over half the mass
    return 0 if spread <= 0 else (1 if spread <= 3 else 2)


@dataclass
class _Lane:
    history: list[int] = field(default_factory=list)
    match_lane: int = -1       # where the current match continues: history[match_lane][match_pos]
    match_pos: int = 0
    match_len: int = 0


@dataclass
class _Pending:
    """What a row's prediction used, kept until its symbol is known."""

    lane: int
    ctx: tuple
    active: list[int]          # component ids: 0 = LM, 1 + i = orders[i], last = match
    weights: list[int]         # effective (renormalised) weights of the active components
    sparse: list[tuple[np.ndarray, np.ndarray, int]]   # per active sparse component: symbols, counts, total
    lm_scale: int              # R: the LM's term of symbol v is (p_v * R) >> MASS_BITS


class StreamMixer:
    """The online models of one stream (its ``lanes`` segments) and their mixer."""

    def __init__(self, config: MixerConfig, lanes: int, alphabet: int):
        self.config = config
        self.alphabet = alphabet
        self.lanes = [_Lane() for _ in range(lanes)]
        self.orders = config.orders
        self.n_components = 1 + len(self.orders) + (1 if config.match else 0)
        self.counts: dict[int, dict[tuple, dict[int, int]]] = {k: {} for k in self.orders}
        self.totals: dict[int, dict[tuple, int]] = {k: {} for k in self.orders}
        self.index: dict[tuple, tuple[int, int]] = {}     # last MATCH_MIN symbols -> (lane, next position)
        self.weights: dict[tuple, list[int]] = {}
        self.bias: torch.Tensor | None = None      # [vocab] int64, created on the rows' device
        self.coded: torch.Tensor | None = None     # [vocab] int64: times each token was coded, up to BIAS_COUNT_CAP
        self._pending: list[_Pending] = []
        self._lm_rows: torch.Tensor | None = None

    # -- prediction ---------------------------------------------------------------------
    def _initial(self) -> list[int]:
        rest = (WEIGHT_ONE - LM_START) // max(1, self.n_components - 1)
        w = [LM_START] + [rest] * (self.n_components - 1)
        w[0] += WEIGHT_ONE - sum(w)
        return w

    def _match(self, lane: _Lane) -> tuple[int, int]:
        """(predicted symbol, match length) of a lane, or (-1, 0)."""
        if lane.match_len:
            src = self.lanes[lane.match_lane].history
            if lane.match_pos < len(src):
                return src[lane.match_pos], lane.match_len
            lane.match_len = 0
        h = lane.history
        if len(h) < MATCH_MIN:
            return -1, 0
        hit = self.index.get(tuple(h[-MATCH_MIN:]))
        if hit is None:
            return -1, 0
        j, pos = hit
        src = self.lanes[j].history
        if pos >= len(src):
            return -1, 0
        n = MATCH_MIN
        while n < MATCH_CAP and n < pos and n < len(h) and src[pos - 1 - n] == h[-1 - n]:
            n += 1
        lane.match_lane, lane.match_pos, lane.match_len = j, pos, n
        return src[pos], n

    def lm_weights(self, u: torch.Tensor) -> torch.Tensor:
        """The LM's symbol weights [n, 256, width] from its token gaps ``u`` [n, V], after the adaptive bias.

        With the bias on, a token's gap drops by its bias (``bias >> BIAS_FRAC``)
        and the row is shifted so that its best token again has gap 0: the
        weights are those of the LM's logits plus a learned per-token offset.
        """
        if self.config.bias and self.bias is None:
            self.bias = torch.zeros(u.shape[1], dtype=torch.int64, device=u.device)
        bias = self.bias if self.config.bias else None
        if u.device.type == "cpu":  # one numba pass over the vocabulary (the same integers)
            return bias_cpu.lm_weights(u, bias, BIAS_FRAC, self.alphabet, bucket_width(self.alphabet))
        return biased_weights(u, bias, self.alphabet)

    def mix(self, lanes: list[int], u: torch.Tensor) -> torch.Tensor:
        """Mixed integer symbol weights for one row per lane.

        ``u``: the LM's token gaps [n, V] int64 (:meth:`lmcodec.engine.engine.Engine.gaps`,
        rows in the order of ``lanes``).  Returns weights [n, 256, width] whose
        rows total about 2^36 (2^30 times the LM's spread when only the bias or
        nothing is on).  Must be followed by :meth:`update` with the rows' symbols.
        """
        self._pending = []
        p = self.lm_weights(u)
        n = p.shape[0]
        flat = p.reshape(n, p.shape[1] * p.shape[2])
        self._lm_rows = flat
        if self.n_components == 1 or not lanes:
            return p
        totals = flat.sum(dim=1).tolist()
        scales, adds = [], []
        for row, li in enumerate(lanes):
            lane = self.lanes[li]
            h = lane.history
            active, sparse, top = [0], [], -1
            for i, k in enumerate(self.orders):
                if len(h) < k:
                    continue
                key = tuple(h[len(h) - k:])
                total = self.totals[k].get(key, 0)
                if total:
                    table = self.counts[k][key]
                    sparse.append((np.fromiter(table.keys(), np.int64, len(table)),
                                   np.fromiter(table.values(), np.int64, len(table)), total))
                    active.append(1 + i)
                    top = k
            length = 0
            if self.config.match:
                sym, length = self._match(lane)
                if length:
                    sparse.append((np.array([sym], dtype=np.int64), np.ones(1, dtype=np.int64), 1))
                    active.append(self.n_components - 1)
            ctx = (_match_bucket(length), top + 1, _confidence(totals[row]))
            w = self.weights.setdefault(ctx, self._initial())
            ws = sum(w[c] for c in active)
            eff = [(w[c] << 16) // ws for c in active]
            scale = (eff[0] << 40) // max(1, totals[row])
            scales.append(scale)
            for (sym, cnt, total), wk in zip(sparse, eff[1:]):
                adds.append((row, sym, (wk * cnt << MASS_BITS) // total))
            self._pending.append(_Pending(li, ctx, active, eff, sparse, scale))
        scale_t = torch.tensor(scales, dtype=torch.int64, device=p.device).unsqueeze(1)
        out = (flat * scale_t) >> MASS_BITS
        for row, sym, val in adds:
            idx = torch.as_tensor(sym, device=p.device)
            out[row].index_add_(0, idx, torch.as_tensor(val, device=p.device))
        # Escapes keep a floor of about 2^-24 of the LM's share, as in the engine's weights.
        vocab = self.alphabet - ESCAPES
        floor = torch.tensor([[max(1, pend.weights[0] >> (24 - MASS_BITS))] for pend in self._pending],
                             dtype=torch.int64, device=p.device)
        out[:, vocab:self.alphabet] = torch.maximum(out[:, vocab:self.alphabet], floor)
        return out.view_as(p)

    # -- learning -----------------------------------------------------------------------
    def update(self, symbols: list[int]) -> None:
        """Learn the symbols of the rows of the last :meth:`mix` (one per lane, same order)."""
        if not symbols or self._lm_rows is None:
            return
        if self.config.bias:
            self._learn_bias(symbols)
        if self.n_components == 1:
            return
        lm = self._lm_rows[torch.arange(len(symbols)), torch.as_tensor(symbols)].tolist()
        for pend, x, px in zip(self._pending, symbols, lm):
            self._learn(pend, x, px)
        for pend, x in zip(self._pending, symbols):
            self._append(pend.lane, x)
        self._pending = []

    def _learn_bias(self, symbols: list[int]) -> None:
        """One online gradient step of the code length on the bias, summed over the step's rows.

        First every row's token is counted (``coded``); then, for a row with
        adapted token weights q and coded token y, token v moves by
        ``r_v * ([v = y] - q_v / sum q)`` with ``r_v = bias_rates()[coded_v]`` (counts stop at BIAS_COUNT_CAP),
        each term floored; rows whose symbol is an escape teach nothing.
        Summing before applying makes the result independent of the rows' order.
        """
        vocab = self.alphabet - ESCAPES
        if self.coded is None:
            self.coded = torch.zeros(vocab, dtype=torch.int64, device=self._lm_rows.device)
        if self._lm_rows.device.type == "cpu":  # one numba pass over the vocabulary (the same integers)
            sym = np.asarray(symbols, dtype=np.int64)
            rows = np.flatnonzero(sym < vocab)
            if len(rows):
                bias_cpu.learn_bias(self._lm_rows, rows, sym[rows], self.coded, _rate_array(), self.bias,
                                    BIAS_COUNT_CAP, BIAS_CAP)
            return
        self.bias = bias_step(self._lm_rows, symbols, self.coded, self.bias, vocab)

    def _learn(self, pend: _Pending, x: int, px: int) -> None:
        terms = [(px * pend.lm_scale) >> MASS_BITS]
        for (sym, cnt, total), wk in zip(pend.sparse, pend.weights[1:]):
            hit = np.nonzero(sym == x)[0]
            c = int(cnt[hit[0]]) if len(hit) else 0
            terms.append((wk * c << MASS_BITS) // total)
        mass = sum(terms)
        if mass == 0:
            return
        w = self.weights[pend.ctx]
        ws = sum(w[c] for c in pend.active)
        for c, t, e in zip(pend.active, terms, pend.weights):
            target = (t << 16) // mass           # this component's share of the symbol's mass
            e += (target - e) >> RATE_SHIFT      # online EM step on the effective weights
            w[c] = max(WEIGHT_FLOOR, (e * ws) >> 16)
        s = sum(w)
        for c in range(len(w)):
            w[c] = max(WEIGHT_FLOOR, (w[c] << 16) // s)

    def _append(self, li: int, x: int) -> None:
        lane = self.lanes[li]
        h = lane.history
        for k in self.orders:
            if len(h) < k:
                continue
            key = tuple(h[len(h) - k:])
            table = self.counts[k].setdefault(key, {})
            table[x] = table.get(x, 0) + 1
            total = self.totals[k].get(key, 0) + 1
            if total > COUNT_LIMIT[k]:
                total = 0
                for s in list(table):
                    c = table[s] >> 1
                    if c:
                        table[s] = c
                        total += c
                    else:
                        del table[s]
            self.totals[k][key] = total
        if self.config.match:
            if lane.match_len:
                src = self.lanes[lane.match_lane].history
                if lane.match_pos < len(src) and src[lane.match_pos] == x:
                    lane.match_pos += 1
                    lane.match_len = min(lane.match_len + 1, MATCH_CAP)
                else:
                    lane.match_len = 0
            if len(h) >= MATCH_MIN:
                self.index[tuple(h[-MATCH_MIN:])] = (li, len(h))
        h.append(x)
