"""lmcodec: lossless compression with a language model as the probability model.

>>> import lmcodec
>>> blob = lmcodec.compress(b"Hello, world!\\n")
>>> lmcodec.decompress(blob)
b'Hello, world!\\n'

Use :class:`Codec` to keep a model loaded across many calls, and
:func:`lmcodec.open` for a file object (as ``gzip.open``).
"""

from __future__ import annotations

import os

from .adapter import Adapter
from .codec import Codec, Settings, Stats
from .fileobj import LMCodecFile, open  # lmcodec.open, as gzip.open (shadows the builtin here only)
from .errors import (
    ArchiveError,
    ChecksumError,
    CorruptArchiveError,
    DictionaryError,
    DictionaryMismatchError,
    EnvironmentMismatchError,
    LMCodecError,
    ModelError,
    ModelMismatchError,
    NotAnArchiveError,
    PromptMismatchError,
    ResourceLimitError,
    TruncatedArchiveError,
    UnsupportedFormatError,
    UsageError,
)

__version__ = "0.2.0"

__all__ = [
    "Adapter", "ArchiveError", "ChecksumError", "Codec", "CorruptArchiveError", "DictionaryError",
    "DictionaryMismatchError", "EnvironmentMismatchError",
    "LMCodecError", "ModelError", "ModelMismatchError", "NotAnArchiveError", "PromptMismatchError",
    "ResourceLimitError", "Settings", "Stats", "TruncatedArchiveError", "UnsupportedFormatError", "UsageError",
    "LMCodecFile", "compress", "decompress", "open", "train",
]

_codecs: dict[str | None, Codec] = {}


def _codec(model: str | os.PathLike | None) -> Codec:
    key = None if model is None else str(model)
    if key not in _codecs:
        _codecs[key] = Codec(model)
    return _codecs[key]


def compress(data: bytes, *, prompt: bytes | str | None = None,
             model: str | os.PathLike | None = None) -> bytes:
    """Compress ``data`` with ``model`` (default smollm2-135m), optionally keyed by ``prompt``."""
    return _codec(model).compress(data, prompt)


def decompress(blob: bytes, *, prompt: bytes | str | None = None,
               model: str | os.PathLike | None = None) -> bytes:
    """Recover the original bytes; raises an :class:`LMCodecError` subclass on any problem."""
    return _codec(model).decompress(blob, prompt)


def train(samples, *, model: str | os.PathLike | None = None, **options) -> Adapter:
    """Fit a dictionary to ``samples`` (an iterable of bytes); see :func:`lmcodec.training.train_adapter`.

    The float training code is imported here, on first use, not with the package.
    """
    from .training import train_adapter

    return train_adapter(samples, model=model, **options)
