"""Integer symbol weights -> the integer frequencies the range coder uses.

The alphabet is the vocabulary plus 256 escape symbols (:mod:`lmcodec.coding.tokens`),
padded to ``256 * width`` and cut into 256 *buckets* of ``width`` consecutive
symbols (SmolLM2: 49,152 + 256 = 256 x 193; Gemma 3: 262,144 + 256 = 256 x 1,025;
no padding in either).  A symbol is coded in
two stages, each with 24-bit integer frequencies summing to exactly 2^24:

* stage 1: its bucket, under the buckets' masses;
* stage 2: its place in the bucket, under the masses within that bucket.

So only rows of 256 and ``width`` integers ever reach the host and the coder,
and the coder needs no branch: every token is two symbols.

Everything is integer arithmetic (docs/ENGINE.md).  The engine's output step
(:meth:`lmcodec.engine.engine.Engine.weights`) gives each symbol a weight p: tokens
2^30 * 2^-(logit gap * log2 e) in fixed point, each escape max(1, sum p >> 24).
Then, with m_b the sum of p over bucket b and m'_b = m_b >> max(0, bitlen(width) - 8):

    stage 1: g_b = 256 + floor(m'_b (2^24 - 2^16) / sum m'), the rest to the largest m'_b
    stage 2: g_j = 1 + floor(p_j (2^24 - width) / m_b), the rest to the largest p_j

The shift keeps m' below 2^38 at any width, so every product stays below 2^62 for
a vocabulary of up to 2^24 tokens (docs/ENGINE.md, "Limits"; ``spec.bucket_width``
refuses a larger one).

Every bucket keeps at least 256 / 2^24, so the other 255 buckets hold at least
65,280 / 2^24 of stage 1: a token always costs more than
:data:`MIN_TOKEN_BITS`, which bounds how many tokens a payload can declare.
Ties for "the largest" go to the lowest index.

:class:`CodingTables` makes whole tables: the tensor path (CUDA), the probe's probabilities, the
selftest's digest and the tests use it.  The CPU's compiled coding computes the same rows with
:mod:`lmcodec.coding.tables_cpu`, stage 2 for the chosen bucket only.
"""

from __future__ import annotations

import numpy as np
import torch

from ..engine.spec.constants import (  # noqa: F401  (re-exported)
    BUCKET_FLOOR,
    BUCKETS,
    MIN_TOKEN_BITS,
    PRECISION,
    TOTAL,
    bucket_width,
)


def _bitlen(n: int) -> int:
    return int(n).bit_length()


def _spread_rest(freq: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Add what the floors left of 2^24 to the entry of largest mass (first on ties)."""
    rest = TOTAL - freq.sum(dim=-1, keepdim=True)
    top = mass.argmax(dim=-1, keepdim=True)
    return freq.scatter_add(-1, top, rest)


class CodingTables:
    """Coding frequencies for ``N`` positions, kept on the model's device.

    :meth:`stage1` gives the bucket rows, :meth:`stage2` the within-bucket row
    of one chosen bucket per position; both as int64 numpy arrays whose rows
    sum to 2^24 with every entry >= 1.
    """

    def __init__(self, weights: torch.Tensor, alphabet: int):
        """``weights``: [N, 256, width] int64 from :meth:`lmcodec.engine.engine.Engine.weights`."""
        self.alphabet = alphabet
        self.width = bucket_width(alphabet)
        if weights.shape[1:] != (BUCKETS, self.width):
            raise ValueError("weights do not match the alphabet")
        self.p = weights
        self.mass = self.p.sum(dim=-1)                                  # [N, 256] < width * 2^30
        pre = max(0, _bitlen(self.width) - 8)
        m = self.mass >> pre                                            # so m * 2^24 < 2^62
        free = TOTAL - BUCKETS * BUCKET_FLOOR
        g = BUCKET_FLOOR + torch.div(m * free, m.sum(dim=-1, keepdim=True).clamp(min=1), rounding_mode="floor")
        self._stage1 = _spread_rest(g, m)

    def __len__(self) -> int:
        return self.p.shape[0]

    def stage1(self) -> np.ndarray:
        return self._stage1.cpu().numpy()

    def _stage2_rows(self, p: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        free = TOTAL - self.width
        g = 1 + torch.div(p * free, mass.clamp(min=1), rounding_mode="floor")
        return _spread_rest(g, p)

    def stage2(self, buckets: np.ndarray) -> np.ndarray:
        """Within-bucket rows [N, width] for one bucket per position."""
        idx = torch.as_tensor(np.asarray(buckets, dtype=np.int64), device=self.p.device)
        rows = torch.arange(len(self), device=self.p.device)
        return self._stage2_rows(self.p[rows, idx], self.mass[rows, idx].unsqueeze(-1)).cpu().numpy()

    def split(self, symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Symbols -> (bucket, place in bucket)."""
        return np.divmod(np.asarray(symbols, dtype=np.int64), self.width)

    def probabilities(self) -> torch.Tensor:
        """The exact coding probability of every symbol, float64 [N, alphabet] (to measure)."""
        g2 = self._stage2_rows(self.p, self.mass.unsqueeze(-1))       # [N, 256, width]
        prob = (self._stage1.unsqueeze(-1).to(torch.float64) * g2.to(torch.float64)) / float(TOTAL) ** 2
        return prob.view(len(self), -1)[:, : self.alphabet]

    def bits(self, symbols: np.ndarray) -> np.ndarray:
        """Exact code length, -log2 of the coding probability, of one symbol per position."""
        b, j = self.split(symbols)
        g1 = self.stage1()[np.arange(len(self)), b]
        g2 = self.stage2(b)[np.arange(len(self)), j]
        return 2 * PRECISION - np.log2(g1.astype(np.float64)) - np.log2(g2.astype(np.float64))
