"""Model logits -> the probability table the entropy coder quantizes.

The alphabet is the vocabulary plus 256 escape symbols (see :mod:`lmcodec.tokens`).
The model's softmax gets mass ``1 - 2**-escape_bits``; the escapes share the rest
evenly.  The table is computed in float64 from float32 logits with fixed torch
ops, so identical logits give identical tables on both sides of the coder.

Quantization to integers happens in constriction's ``Categorical(perfect=False)``
model: a deterministic leaky quantizer to 24-bit fixed point (total 2**24) that
gives every symbol a frequency of at least 1, so any symbol stays codable.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .tokens import ESCAPES

LOG2E = 1.0 / math.log(2.0)


def probability_table(logits: torch.Tensor, escape_bits: int) -> np.ndarray:
    """[B, V] float32 logits -> [B, V + 256] float64 probabilities (rows sum to 1)."""
    eps = 2.0 ** -escape_bits
    probs = torch.softmax(logits.to("cpu", torch.float64), dim=-1) * (1.0 - eps)
    esc = torch.full((probs.shape[0], ESCAPES), eps / ESCAPES, dtype=torch.float64)
    return torch.cat([probs, esc], dim=1).numpy()


def surprisal_bits(table: np.ndarray, symbols: np.ndarray) -> np.ndarray:
    """-log2 p(symbol) under each row: the ideal code length the coder approaches."""
    return -np.log2(table[np.arange(len(symbols)), symbols])
