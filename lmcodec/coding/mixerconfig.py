"""Which online models run beside the LM: the mixer byte an archive records, named and parsed.

Light on purpose (no torch, no numpy): the command line reads and prints it without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..format.header import MIXER_BIAS, MIXER_MASK, MIXER_MATCH, MIXER_ORDERS

#: Bits of the mixer byte recorded in the archive header (format.header).
MATCH_BIT = MIXER_MATCH
BIAS_BIT = MIXER_BIAS
ORDER_BITS = MIXER_ORDERS
ALL = MIXER_MASK


@dataclass(frozen=True)
class MixerConfig:
    """Which online models run: a bit mask, recorded in the archive (0 = the LM alone)."""

    mask: int = 0

    def __post_init__(self):
        if self.mask & ~ALL:
            raise ValueError(f"unknown mixer bits {self.mask:#x}")

    @property
    def orders(self) -> tuple[int, ...]:
        return tuple(k for k, bit in ORDER_BITS.items() if self.mask & bit)

    @property
    def match(self) -> bool:
        return bool(self.mask & MATCH_BIT)

    @property
    def bias(self) -> bool:
        return bool(self.mask & BIAS_BIT)

    def describe(self) -> str:
        """``none`` or the models' names joined by commas (what :meth:`parse` reads)."""
        parts = ["bias"] * self.bias + ["match"] * self.match + [f"order{k}" for k in self.orders]
        return ",".join(parts) if parts else "none"

    @classmethod
    def parse(cls, text: str) -> "MixerConfig":
        """``none``, ``all`` or a comma list of ``bias``, ``match``, ``order0`` ... ``order4``."""
        names = {"bias": BIAS_BIT, "match": MATCH_BIT, **{f"order{k}": bit for k, bit in ORDER_BITS.items()}}
        mask = 0
        for part in text.replace(" ", "").split(","):
            if part == "all":
                mask |= ALL
            elif part in names:
                mask |= names[part]
            elif part != "none":
                raise ValueError(f"unknown online model {part!r} (none, all, {', '.join(names)})")
        return cls(mask)
