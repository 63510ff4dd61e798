"""Format v6's payload check: damage to a one-block archive worth checking is refused before the model runs.

A short-form LM archive of PAYLOAD_CHECK_TOKENS tokens or more carries a 4-byte check over
every byte but itself (docs/FORMAT.md, "Payload check").  Real archives of the real model are
damaged every way hypothesis finds -- bit flips anywhere, any value in any byte of the framing
(every coding field), splices of two archives, truncations -- and decoded from a file and
from a pipe by a codec whose model may not be loaded: each must be refused with a one-line
:class:`LMCodecError`, and the model never loaded or stepped.
"""

from __future__ import annotations

import io
from unittest import mock

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lmcodec
from lmcodec.coding.modelcache import ModelCache
from lmcodec.errors import LMCodecError
from lmcodec.format.container import PAYLOAD_CHECK_TOKENS, End
from lmcodec.format.reader import Reader

SMALL = dict(segment_tokens=16, context=32, lanes=2, mixer=64 | 1)
TEXTS = (
    b"It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
    b"of foolishness, it was the epoch of belief, it was the epoch of incredulity.\n"
    b"def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Grüße aus Köln! Ein naïves Café, 日本語のテキスト, и немного русского текста. Emoji: 😀👍🏽.\n"
    "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n".encode(),
)
HYPO = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class ModelReached(BaseException):
    """Raised by the stubbed model entry points (not an Exception: nothing may swallow it)."""


@pytest.fixture(scope="module")
def archives() -> list[tuple[bytes, bytes]]:
    """(archive, original) pairs: real short-form LM archives above the threshold."""
    codec = lmcodec.Codec(method="lm", **SMALL)
    out = []
    for text in TEXTS:
        blob = codec.compress(text)
        reader = Reader(io.BytesIO(blob), len(blob))
        header = reader.header()
        block = reader.next(header)
        assert reader.short_form and block.n_tokens >= PAYLOAD_CHECK_TOKENS and block.payload_checked
        assert isinstance(reader.next(header), End)
        out.append((blob, text))
    return out


class Pipe(io.RawIOBase):
    """A non-seekable stream, as standard input is."""

    def __init__(self, data: bytes):
        self._b = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._b.read(len(b))
        b[:len(data)] = data
        return len(data)


def _refused_before_the_model(blob: bytes) -> None:
    """Decode ``blob`` from a buffer and from a pipe: a one-line LMCodecError, the model untouched."""
    def reached(*args, **kwargs):
        raise ModelReached()

    with mock.patch.object(ModelCache, "load", reached), mock.patch.object(ModelCache, "engine", reached):
        for pipe in (False, True):
            codec = lmcodec.Codec(**SMALL)
            with pytest.raises(LMCodecError) as info:
                if pipe:
                    codec.decompress_stream(io.BufferedReader(Pipe(blob)), io.BytesIO())
                else:
                    codec.decompress(blob)
            assert str(info.value).strip() and "\n" not in str(info.value)


def _framing_end(blob: bytes) -> int:
    """Where the payloads start: everything before is header, lengths and the two checks."""
    reader = Reader(io.BytesIO(blob), len(blob))
    block = reader.next(reader.header())
    return len(blob) - sum(len(p) for p in block.payloads)


def test_an_intact_archive_decodes(archives):
    for blob, text in archives:
        assert lmcodec.Codec(**SMALL).decompress(blob) == text


@HYPO
@given(data=st.data())
def test_bit_flips_anywhere_are_refused_before_the_model(archives, data):
    blob, _ = data.draw(st.sampled_from(archives))
    buf = bytearray(blob)
    for bit in data.draw(st.lists(st.integers(0, 8 * len(blob) - 1), min_size=1, max_size=3, unique=True)):
        buf[bit // 8] ^= 1 << (bit % 8)
    _refused_before_the_model(bytes(buf))


@HYPO
@given(data=st.data())
def test_any_value_in_any_coding_field_is_refused_before_the_model(archives, data):
    """Every byte of the header, the lengths and the two checks, set to any other value."""
    blob, _ = data.draw(st.sampled_from(archives))
    at = data.draw(st.integers(0, _framing_end(blob) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != blob[at]))
    _refused_before_the_model(blob[:at] + bytes([value]) + blob[at + 1:])


@HYPO
@given(data=st.data())
def test_splices_and_truncations_are_refused_before_the_model(archives, data):
    (a, _), (b, _) = data.draw(st.permutations(archives))
    i = data.draw(st.integers(0, len(a)))
    j = data.draw(st.integers(0, len(b)))
    spliced = a[:i] + b[j:] if data.draw(st.booleans()) else a[:i]
    assume(spliced not in (a, b))   # a splice that rebuilt a whole archive is not damage
    _refused_before_the_model(spliced)


def test_the_stub_would_see_the_model(archives):
    """The check above is not vacuous: an intact archive does reach the stubbed model."""
    blob, _ = archives[0]
    with mock.patch.object(ModelCache, "load", side_effect=ModelReached()):
        with pytest.raises(ModelReached):
            lmcodec.Codec(**SMALL).decompress(blob)
