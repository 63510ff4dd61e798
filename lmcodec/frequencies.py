"""Model logits -> the probability rows the entropy coder quantizes.

The alphabet is the vocabulary plus 256 escape symbols (see :mod:`lmcodec.tokens`).
The model's softmax gets mass ``1 - 2**-escape_bits``; the escapes share the rest
evenly.  :func:`probability_table` builds that full table (used to *measure*).

For *coding*, :class:`StepTables` splits each row in two stages, so a
vocabulary-sized row rarely leaves the device or reaches the coder:

* stage 1 (every token): the ``TOP_K`` likeliest tokens, in the order
  ``torch.topk`` returns them, plus one *other* symbol that carries the
  remaining mass (never less than ``OTHER_FLOOR``);
* stage 2 (only after *other*): the full alphabet with the top tokens zeroed.

The product of the two stages is the full table, so the split costs no ratio
(measured in ``docs/SPEED.md``); it saves moving ``B x 49k`` float64 values to
the host and quantizing them at every step.  The softmax and top-k run in
float32 on the model's device, the small rows in float64 on the host, with
fixed operations: identical logits give identical rows on both sides.

Quantization to integers happens in constriction's ``Categorical(perfect=False)``
model: a deterministic leaky quantizer to 24-bit fixed point that normalizes
the row and gives every symbol a frequency of at least 1, so any symbol stays
codable.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .tokens import ESCAPES

#: Tokens in the stage-1 alphabet; the rest are reached through *other*.
TOP_K = 256
#: Least mass of the *other* symbol.  It makes every token cost at least
#: :data:`MIN_TOKEN_BITS`, which bounds how many tokens a payload can hold.
OTHER_FLOOR = 2.0 ** -8
#: Bits every coded token costs at least (half the floor: quantization slack).
MIN_TOKEN_BITS = -math.log2(1.0 - OTHER_FLOOR / 2)


def probability_table(logits: torch.Tensor, escape_bits: int) -> np.ndarray:
    """[B, V] float32 logits -> [B, V + 256] float64 probabilities (rows sum to 1)."""
    eps = 2.0 ** -escape_bits
    probs = torch.softmax(logits.to("cpu", torch.float64), dim=-1) * (1.0 - eps)
    esc = torch.full((probs.shape[0], ESCAPES), eps / ESCAPES, dtype=torch.float64)
    return torch.cat([probs, esc], dim=1).numpy()


def surprisal_bits(table: np.ndarray, symbols: np.ndarray) -> np.ndarray:
    """-log2 p(symbol) under each row: the ideal code length the coder approaches."""
    return -np.log2(table[np.arange(len(symbols)), symbols])


class StepTables:
    """The coding rows of one lockstep step: ``B`` rows, kept on the model's device.

    ``head[i]`` is row ``i``'s stage-1 row (``k + 1`` float64 weights) and
    ``top_ids[i]`` the tokens its first ``k`` entries stand for; :meth:`tail`
    fetches a stage-2 row only when a row needs one.
    """

    def __init__(self, logits: torch.Tensor, escape_bits: int, top_k: int = TOP_K):
        self.eps = 2.0 ** -escape_bits
        self.vocab = logits.shape[-1]
        self.k = min(top_k, self.vocab)
        self._probs = torch.softmax(logits.float(), dim=-1)
        top_p, top_i = torch.topk(self._probs, self.k, dim=-1, sorted=True)
        self._top_i = top_i
        self.top_ids = top_i.cpu().numpy()
        head = top_p.to("cpu", torch.float64).numpy() * (1.0 - self.eps)
        other = np.maximum(1.0 - head.sum(axis=1), OTHER_FLOOR)
        self.head = np.concatenate([head, other[:, None]], axis=1)

    @property
    def other(self) -> int:
        """Stage-1 index of the *other* symbol."""
        return self.k

    def index(self, row: int, symbol: int) -> int:
        """Stage-1 index of ``symbol`` in ``row``: its top-k rank, or :attr:`other`."""
        hit = np.flatnonzero(self.top_ids[row] == symbol)
        return int(hit[0]) if hit.size else self.k

    def tail(self, row: int) -> np.ndarray:
        """Stage-2 row: the full alphabet (float64) with ``row``'s top tokens zeroed."""
        p = self._probs[row].clone()
        p[self._top_i[row]] = 0.0
        out = np.empty(self.vocab + ESCAPES, dtype=np.float64)
        out[: self.vocab] = p.to("cpu", torch.float64).numpy() * (1.0 - self.eps)
        out[self.vocab:] = self.eps / ESCAPES
        return out
