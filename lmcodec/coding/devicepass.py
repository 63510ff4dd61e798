"""The streams without online models when the gaps stay on the model's device (CUDA): small rows to the host.

A pass's gaps are [rows, V] on the device; the range coder and the bookkeeping run on the host
(:mod:`lmcodec.coding.rangecoder`, :mod:`lmcodec.coding.lanes`).  Between them only what the coder reads
crosses: every row's 256 bucket masses once a pass, then per column the chosen bucket's ``width``
weights of each row decoded (193 integers a row for SmolLM2, against 49,408 in the full row).  The
symbol weights are :func:`~lmcodec.engine.ops_torch.weights_from_gaps`, the integers
:func:`~lmcodec.coding.tables_cpu.token_weights` makes on a CPU; the tables and the coder are the
compiled host functions :func:`~lmcodec.coding.passes.decode_buckets` and
:func:`~lmcodec.coding.passes.decode_places`, which share their per-row steps with the CPU's whole-pass
:func:`~lmcodec.coding.passes.decode_pass`.  On a CPU the tests run this path with CPU tensors against
that one (``tests/test_rowdecode.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..engine.ops_torch import weights_from_gaps
from ..engine.spec.constants import BUCKETS
from ..errors import CorruptArchiveError
from .frequencies import bucket_width
from .lanes import STATUS, RunningLanes, settle
from .passes import DecoderBank, decode_buckets, decode_places


class DevicePasses:
    """A pass of the streams without online models from gaps on a device (the module's docstring)."""

    def __init__(self, alphabet: int, bank: DecoderBank):
        self.alphabet = alphabet
        self.width = bucket_width(alphabet)
        self.bank = bank
        self._w: torch.Tensor | None = None
        self._mass = np.zeros((0, BUCKETS), np.int64)

    def masses(self, u: torch.Tensor) -> None:
        """The symbol weights of every row of the gaps ``u`` [n, V] (kept on the device) and their bucket
        masses (to the host): the output step."""
        self._w = weights_from_gaps(u, self.alphabet, self.width)
        self._mass = self._w.sum(dim=-1).cpu().numpy()

    def decode(self, u: torch.Tensor, lanes: RunningLanes, where: np.ndarray, symbols: tuple[np.ndarray, np.ndarray],
               feed: np.ndarray, widths: np.ndarray, decoded: np.ndarray, vocab: int, placeholder: int,
               log: np.ndarray, out: np.ndarray) -> None:
        """Decode the pass, a column at a time (what :func:`~lmcodec.coding.passes.decode_pass` does in one
        call on a CPU): stage 1 of every stream's live lanes from the masses, the chosen buckets' weights
        from the device, stage 2, then :func:`~lmcodec.coding.lanes.settle`.  ``u``: the gaps :meth:`masses`
        read (its weights are kept).  Raises CorruptArchiveError for a stream that cannot be valid."""
        flat, base = symbols
        w, dev = self._w, self._w.device
        active, j = lanes.every, 0
        while len(active):
            at, spans, lane, rows = lanes.column(active, j, where)
            streams = lanes.stream[active]
            buckets = np.empty(len(at), np.int64)
            bad = decode_buckets(self._mass, at, spans, streams, self.bank.state, self.bank.words, self.width,
                                 buckets)
            if bad < 0:
                chosen = w[torch.from_numpy(at).to(dev), torch.from_numpy(buckets).to(dev)].cpu().numpy()
                syms = np.empty(len(at), np.int64)
                bad = decode_places(chosen, self._mass, at, buckets, spans, streams, self.bank.state,
                                    self.bank.words, syms)
            if bad >= 0:
                raise CorruptArchiveError(f"range decoder failed: stream {int(bad)} cannot be a valid stream")
            going = np.empty(len(active), np.int64)
            n = settle(syms, active, spans, lane, lanes.stream, lanes.rows, lanes.segs, lanes.lengths, lanes.step, j,
                       flat, base, feed, widths, decoded, self.alphabet, vocab, placeholder, going, lanes.ended, log,
                       out)
            if out[STATUS] >= 0:
                raise CorruptArchiveError(f"stream {int(out[STATUS])} decoded a symbol outside the alphabet")
            active, j = going[:n], j + 1
