"""Every failure a user can cause is an :class:`LMCodecError` subclass.

The CLI turns these into a one-line message and a non-zero exit code; anything
else escaping is a bug in lmcodec, not a user error.
"""

from __future__ import annotations


class LMCodecError(Exception):
    """Base class of all errors lmcodec raises on purpose."""

    exit_code = 1


class UsageError(LMCodecError):
    """Bad arguments: an unknown option value, a conflicting pair of options."""

    exit_code = 2


class ArchiveError(LMCodecError):
    """The bytes handed to the decoder are not a valid lmcodec archive."""


class NotAnArchiveError(ArchiveError):
    """The input does not start with lmcodec's magic bytes."""


class TruncatedArchiveError(ArchiveError):
    """The archive ends before its structure says it should."""


class CorruptArchiveError(ArchiveError):
    """A checksum or a structural field of the archive is wrong."""


class UnsupportedFormatError(ArchiveError):
    """The archive was written by a newer (or unknown) format version."""


class ChecksumError(CorruptArchiveError):
    """Decoded bytes do not match the checksum of the original."""


class ModelError(LMCodecError):
    """A model could not be found, loaded or used."""


class ModelMismatchError(ModelError):
    """The archive was made with another model or tokenizer than the one given."""


class PromptMismatchError(LMCodecError):
    """The prompt given to the decoder is not the one the encoder used."""


class EnvironmentMismatchError(LMCodecError):
    """This machine cannot reproduce the encoder's computation (device, dtype)."""


class ClusterError(LMCodecError):
    """The Ray cluster could not be reached, or a block failed on every retry."""


class ResourceLimitError(LMCodecError):
    """Coding would need more memory than the configured limit allows."""


class DictionaryError(LMCodecError):
    """A dictionary file is unreadable, corrupted, truncated, foreign, or does not fit the model."""


class DictionaryMismatchError(ModelMismatchError):
    """The archive was made with another dictionary than the one given (or with one, and none was given)."""
