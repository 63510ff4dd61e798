"""A local (sliding-window) layer's attention on the CPU: Gemma 3's "sliding" layers.

The spec's attention (docs/ENGINE.md, "Attention" and "Gemma 3") over a query's
key set ``[0, a) + [b, c)`` of its cache row, less the keys that stand before
the query's window: a key at position ``kpos`` is seen by a query whose lowest
visible position is ``lowest`` when ``kpos >= lowest``.  The key set is
gathered first, so a query costs what its window holds (512 keys for Gemma 3
270M), not what the segment holds.  The integers are :func:`ops_torch.attend`'s
with the same window, bit for bit (``tests/test_gemma.py``): the maximum, the
fixed-point exponentials and the rounded quotient are taken over the gathered
keys only, and a query that sees no key (a padding column, which reads slot 0)
gets 0, as there.
"""

from __future__ import annotations

import numpy as np
import torch

from .cpu_rows import _EXP2, _JIT, _softmax_values, njit, prange  # numba configured there (cache, threads)
from .spec import ATT_PRESHIFT


@njit(parallel=True, **_JIT)
def _attend_window(q16, qe, kt, kmax, vc, vmax, crow, a, b, c, kpos, lowest, exp2, lc,
                   out):  # pragma: no cover - compiled
    n_q, nh, hd = q16.shape
    nkv = kt.shape[1]
    group = nh // nkv
    for item in prange(n_q * nh):
        n = item // nh
        head = item % nh
        h = head // group
        r = crow[n]
        n1 = a[n]
        off = b[n]
        length = n1 + max(c[n] - off, 0)
        seen = np.empty(length, np.int64)         # the slots of the key set inside the window
        cnt = 0
        for jj in range(length):
            j = jj if jj < n1 else off + jj - n1
            if kpos[r, j] >= lowest[n]:
                seen[cnt] = j
                cnt += 1
        s = np.zeros(cnt, np.int32)               # |s| < 2^31 for head dims up to 256
        for d in range(hd):
            qd = np.int32(q16[n, head, d])
            kr = kt[r, h, d]
            for m in range(cnt):
                s[m] += qd * np.int32(kr[seen[m]])
        _softmax_values(s, seen, cnt, kmax[r, h], vmax[r, h], vc[r, h], ATT_PRESHIFT - qe[n, head], lc, exp2,
                        out[n, head])


def attend(q16, qe, kt, kmax, vc, vmax, crow, a, b, c, kpos, lowest, lc: int) -> torch.Tensor:
    """[N, nh, hd] int64: query n (``crow[n]``'s cache row) over the keys of its set and window."""
    out = np.empty(tuple(q16.shape), np.int64)
    arrays = (q16, qe, kt, kmax, vc, vmax, crow, a, b, c, kpos, lowest)
    _attend_window(*(t.numpy() for t in arrays), _EXP2, lc, out)
    return torch.from_numpy(out)
