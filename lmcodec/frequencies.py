"""Exact logits -> the integer frequencies the range coder uses.

The alphabet is the vocabulary plus 256 escape symbols (:mod:`lmcodec.tokens`),
padded to ``256 * width`` and cut into 256 *buckets* of ``width`` consecutive
symbols (SmolLM2: 49,152 + 256 = 256 x 193, no padding).  A symbol is coded in
two stages, each with 24-bit integer frequencies summing to exactly 2^24:

* stage 1: its bucket, under the buckets' masses;
* stage 2: its place in the bucket, under the masses within that bucket.

So only rows of 256 and ``width`` integers ever reach the host and the coder,
and the coder needs no branch: every token is two symbols.

Everything is integer arithmetic (docs/ENGINE.md):

    d_v  = max_v lam - lam_v                           (int64)
    U_v  = base-2 exponent of e^(-d_v * 2^exp), 10 fractional bits, capped at 31 * 1024
    p_v  = EXP2[U_v mod 1024] >> (U_v div 1024)        in [0, 2^30]
    p_escape = max(1, sum_v p_v >> 24)                 (each of the 256 escapes)
    m_b  = sum of p over bucket b
    stage 1: g_b = 256 + floor(m_b (2^24 - 2^16) / sum m), the rest to the largest m_b
    stage 2: g_j = 1 + floor(p_j (2^24 - width) / m_b), the rest to the largest p_j

Every bucket keeps at least 256 / 2^24, so the other 255 buckets hold at least
65,280 / 2^24 of stage 1: a token always costs more than
:data:`MIN_TOKEN_BITS`, which bounds how many tokens a payload can declare.
Ties for "the largest" go to the lowest index.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import fixedmath
from .engine import Logits, bit_length
from .kernels import _log2e_over
from .tokens import ESCAPES

PRECISION = 24
TOTAL = 1 << PRECISION
BUCKETS = 256
BUCKET_FLOOR = 256
#: round(2^30 log2(e)): logit differences -> base-2 exponent.
LOG2E_OUT = _log2e_over(1, 30)
OUT_U_CAP = 31 << fixedmath.EXP2_FRAC_BITS
OUT_D_CAP = (1 << 31) - 1
OUT_PRE_LIMIT = 36
#: Bits every coded token costs at least (stage 1 keeps 255 * 256 / 2^24 off the top bucket).
MIN_TOKEN_BITS = -math.log2(1.0 - (BUCKETS - 1) * BUCKET_FLOOR / TOTAL)

_EXP2 = fixedmath.exp2_table()


def bucket_width(alphabet: int) -> int:
    """Symbols per bucket: the alphabet padded to a multiple of 256."""
    return -(-alphabet // BUCKETS)


def model_weights(logits: Logits) -> torch.Tensor:
    """Unnormalized integer probabilities p [N, V] in [0, 2^30] (the best token: 2^30)."""
    lam = logits.lam
    d = lam.amax(dim=-1, keepdim=True) - lam
    s = 20 - logits.exp                                   # total right shift of d * LOG2E_OUT
    pre = (s - OUT_PRE_LIMIT).clamp(min=0)
    rest = (s - pre).clamp(min=0)
    dd = (d >> pre).clamp(max=OUT_D_CAP)
    u = ((dd * LOG2E_OUT) >> rest).clamp(max=OUT_U_CAP)
    table = torch.as_tensor(_EXP2, device=lam.device)
    return table[u & 1023] >> (u >> 10)


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

    def __init__(self, logits: Logits, alphabet: int):
        p = model_weights(logits)
        n, vocab = p.shape
        if alphabet != vocab + ESCAPES:
            raise ValueError("alphabet must be the vocabulary plus the escapes")
        self.alphabet = alphabet
        self.width = bucket_width(alphabet)
        esc = (p.sum(dim=-1, keepdim=True) >> 24).clamp(min=1)
        pad = BUCKETS * self.width - alphabet
        full = torch.cat([p, esc.expand(n, ESCAPES), torch.zeros((n, pad), dtype=p.dtype, device=p.device)], 1)
        self.p = full.view(n, BUCKETS, self.width)
        self.mass = self.p.sum(dim=-1)                                  # [N, 256] < width * 2^30
        pre = max(0, int(bit_length(torch.tensor(self.width))) + 30 - 38)
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
