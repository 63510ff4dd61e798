"""What block jobs run with in one process, beside their settings (:mod:`lmcodec.executors`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .modelcache import ModelCache
from .settings import DecodeStats


@dataclass
class BlockContext:
    """The process's side of a block job: the loaded models, where the decoder records what it
    did, and a benchmark's memo of the parallel pass's rows.

    ``decode_stats``: model passes, rows and guesses of the decodes run here
    (:attr:`lmcodec.Codec.last_decode`; a cluster's workers keep their own).
    ``score_memo``: None, or a dict that keeps segments' hidden rows between calls, so a
    benchmark codes one text under several online-model settings with one LM pass
    (:class:`lmcodec.coding.encoder.SegmentScorer`; the rows do not depend on the mixer).
    """

    models: ModelCache
    decode_stats: DecodeStats = field(default_factory=DecodeStats)
    score_memo: dict | None = None
