"""Who runs the block work: this process, or workers elsewhere (:mod:`lmcodec.cluster.executor`).

An archive is a sequence of independent blocks, and the exact engine gives
every worker the same bits whatever its hardware, so the driver
(:mod:`lmcodec.archive`) hands blocks to an :class:`Executor` and writes the
results in order.  A job is a small picklable object -- settings, prompt,
model argument, header -- called as ``job(context, item, progress)`` where the
worker keeps its models loaded (:class:`~lmcodec.coding.modelcache.ModelCache`);
blocks travel as bytes, never as paths.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .coding.context import BlockContext
from .coding.decoder import BlockDecoder
from .coding.encoder import BlockEncoder, EncodedBlock
from .coding.settings import Settings
from .format.container import Block, Header
from .progress import Progress


@dataclass(frozen=True)
class EncodeJob:
    """Encode one block's raw bytes (``settings`` resolved; ``model`` the user's model argument).

    ``model_check``: the header's model fingerprint bytes (empty for a stored-only
    archive); a remote worker's result must come from a model that matches it.
    ``dictionary``: the dictionary file's bytes (None without one), so that a
    remote worker merges the same adapter (the file is the whole key).
    """

    settings: Settings
    prompt: bytes | None
    model: str | None
    model_check: bytes = b""
    dictionary: bytes | None = field(default=None, repr=False)

    def __call__(self, ctx: BlockContext, raw: bytes, progress: Progress) -> EncodedBlock:
        return BlockEncoder(ctx.models, self.settings, self.prompt, ctx.score_memo).encode(raw, progress)

    @staticmethod
    def weight(raw: bytes) -> int:
        """Input bytes the item stands for (progress of a remote result)."""
        return len(raw)


@dataclass(frozen=True)
class DecodeJob:
    """Decode a group of consecutive blocks of one archive into their checked bytes."""

    settings: Settings
    header: Header
    prompt: bytes | None
    model: str | None
    dictionary: bytes | None = field(default=None, repr=False)   # see EncodeJob

    @property
    def model_check(self) -> bytes:
        """The header's model fingerprint bytes (see :class:`EncodeJob`)."""
        return self.header.model_fingerprint

    def __call__(self, ctx: BlockContext, blocks: list[Block], progress: Progress) -> list[bytes]:
        return BlockDecoder(ctx.models, self.settings, self.header, self.prompt, ctx.decode_stats).decode(
            blocks, progress)

    @staticmethod
    def weight(blocks: list[Block]) -> int:
        return sum(b.raw_len for b in blocks)


class Executor(ABC):
    """Runs a job over items and yields the results in the items' order."""

    @abstractmethod
    def map(self, job, items: Iterable, progress: Progress) -> Iterator:
        """``job(context, item, progress)`` for each item, results in order; items are pulled
        lazily, so the input is never held whole (at most the executor's in-flight bound)."""

    def check(self) -> None:
        """Raise an :class:`~lmcodec.errors.LMCodecError` if a worker cannot be trusted."""

    def close(self) -> None:
        """Release the workers."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcessExecutor(Executor):
    """The default: one item at a time in this process, with this process's models (``context``)."""

    def __init__(self, context: BlockContext):
        self.context = context

    def map(self, job, items: Iterable, progress: Progress) -> Iterator:
        for item in items:
            yield job(self.context, item, progress)
