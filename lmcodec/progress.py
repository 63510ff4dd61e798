"""Progress in input bytes, for bars: a block's bytes are spread evenly over its tokens."""

from __future__ import annotations

from typing import Callable

#: What a caller hands in: called with the number of input bytes just finished.
ProgressCallback = Callable[[int], None]


class Progress:
    """One coding call's progress (a fresh object per call: no state left on a codec).

    The model works in tokens while a bar counts input bytes, so inside a block
    :meth:`tokens` reports ``nbytes * done // ntokens`` as the tokens go by.
    """

    def __init__(self, callback: ProgressCallback | None = None):
        self.callback = callback
        self._block = (0, 1)
        self._done = 0
        self._reported = 0

    def bytes(self, nbytes: int) -> None:
        """``nbytes`` more input bytes are done."""
        if self.callback is not None and nbytes:
            self.callback(nbytes)

    def start_block(self, nbytes: int, ntokens: int) -> None:
        """A block of ``nbytes`` input bytes and ``ntokens`` tokens begins."""
        self._block = (nbytes, max(1, ntokens))
        self._done = self._reported = 0

    def tokens(self, n: int) -> None:
        """``n`` more tokens of the current block are done."""
        nbytes, ntokens = self._block
        self._done += n
        now = nbytes * min(self._done, ntokens) // ntokens
        self.bytes(now - self._reported)
        self._reported = now
