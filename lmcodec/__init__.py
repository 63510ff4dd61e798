"""lmcodec: lossless compression with a language model as the probability model.

>>> import lmcodec
>>> blob = lmcodec.compress(b"Hello, world!\\n")
>>> lmcodec.decompress(blob)
b'Hello, world!\\n'

Use :class:`Codec` to keep a model loaded across many calls, and
:func:`lmcodec.open` for a file object (as ``gzip.open``).
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from .codec import Codec, Settings, Stats
    from .dictionary.adapter import Adapter
    from .fileobj import LMCodecFile

__version__ = "0.2.0"

__all__ = [
    "Adapter", "ArchiveError", "ChecksumError", "Codec", "CorruptArchiveError", "DictionaryError",
    "DictionaryMismatchError", "EnvironmentMismatchError",
    "LMCodecError", "ModelError", "ModelMismatchError", "NotAnArchiveError", "PromptMismatchError",
    "ResourceLimitError", "Settings", "Stats", "TruncatedArchiveError", "UnsupportedFormatError", "UsageError",
    "LMCodecFile", "compress", "decompress", "open", "train",
]

#: The public classes, imported on first use: ``import lmcodec`` (and every command that only
#: reads an archive or prints) stays free of torch, numba and the engine.
_LAZY = {"Codec": "codec", "Settings": "codec", "Stats": "codec", "Adapter": "dictionary.adapter",
         "LMCodecFile": "fileobj"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


_codecs: dict[str | None, Codec] = {}


def _codec(model: str | os.PathLike | None) -> Codec:
    from .codec import Codec

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
    """Fit a dictionary to ``samples`` (an iterable of bytes); see :func:`lmcodec.dictionary.training.train_adapter`.

    The float training code is imported here, on first use, not with the package.
    """
    from .dictionary.training import train_adapter

    return train_adapter(samples, model=model, **options)


def open(filename, mode: str = "rb", *, codec: Codec | None = None, prompt: bytes | str | None = None,
         encoding: str | None = None, errors: str | None = None, newline: str | None = None,
         closefd: bool | None = None, **settings):
    """Open an lmcodec archive in binary or text mode, as :func:`lzma.open` does.

    ``mode``: "rb" (default), "wb", "xb" (or without "b"), or "rt", "wt", "xt"
    for text, wrapped in :class:`io.TextIOWrapper` with ``encoding``,
    ``errors`` and ``newline``.  ``codec``/``settings``, ``prompt``,
    ``closefd``: see :class:`LMCodecFile`; without ``codec``, one is made
    from ``settings`` (``model=``, ``level=``, ``method=`` ...).  A damaged or truncated archive
    raises the decoder's :class:`~lmcodec.errors.ArchiveError` subclasses
    (e.g. ``TruncatedArchiveError``, never ``EOFError``).
    """
    if "t" in mode:
        if "b" in mode:
            raise ValueError(f"Invalid mode: {mode!r}")
    else:
        for name, value in (("encoding", encoding), ("errors", errors), ("newline", newline)):
            if value is not None:
                raise ValueError(f"Argument '{name}' not supported in binary mode")
    from .codec import Codec
    from .fileobj import LMCodecFile

    if codec is None:
        codec = Codec(settings.pop("model", None), **settings)
    elif settings:
        raise TypeError("give codec= or settings (model=, level=, ...), not both")
    binary = LMCodecFile(filename, mode.replace("t", ""), codec=codec, prompt=prompt, closefd=closefd)
    if "t" in mode:
        return io.TextIOWrapper(binary, io.text_encoding(encoding), errors, newline)
    return binary
