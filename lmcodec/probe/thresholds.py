"""The probe's defaults and when a run of tokens counts as memorized: what the command line
shows as options, importable without the model (no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError

#: Tokens of the text the model sees at once, and the least context a scored token has.
DEFAULT_WINDOW = 1024
DEFAULT_MIN_CONTEXT = 512
#: Alternatives listed per token.
DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class Thresholds:
    """When a run of tokens counts as a likely memorized span.

    Defaults: at least 8 consecutive tokens, each predicted with p >= 0.5,
    touching at least 4 words.  Eight tokens at p >= 0.5 cost at most 8 bits
    together -- about one bit per word for text the model would normally pay
    10+ bits per word for.  The word minimum keeps a single long, predictable
    identifier or number (many tokens, one word) from being flagged.
    """

    min_probability: float = 0.5
    min_tokens: int = 8
    min_words: int = 4

    def check(self) -> None:
        if not 0.0 < self.min_probability <= 1.0:
            raise UsageError("the minimum probability must be in (0, 1]")
        if self.min_tokens < 1 or self.min_words < 0:
            raise UsageError("the minimum span must be >= 1 token and >= 0 words")
