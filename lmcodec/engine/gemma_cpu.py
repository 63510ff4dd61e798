"""Gemma 3's post-norm residual add as a numba kernel (docs/ENGINE.md, "Gemma 3": ``norm16``).

As tensor steps (:class:`lmcodec.engine.gemma._TorchSteps`) the add takes about ten
operations, each with its own temporaries; at a decoding step's few rows that
per-operation cost, not arithmetic, is most of it.  Here it is one pass over the
rows, built from the helpers the CPU kernels share (:mod:`lmcodec.engine.cpu_rows`,
whose ``_norm16`` the q/k norms of :func:`lmcodec.engine.ops_cpu.qkv` use too), so
it computes the tensor steps' integers (``tests/test_gemma.py`` runs both against
the reference).
"""

from __future__ import annotations

import numpy as np

from .cpu_rows import _JIT, _clamp, _norm16, _requant, _threads, njit, prange
from .spec import ACT_FRAC, RESID_LIMIT


@njit(parallel=True, **_JIT)
def _add_normed(x, y, mult, shift, exp, gain, gain_shift, eps):  # pragma: no cover - compiled
    m_rows, n = x.shape
    for i in prange(m_rows):
        c = shift - exp[i] - ACT_FRAC
        v = np.empty(n, np.int64)
        for j in range(n):
            v[j] = _clamp(_requant((np.int64(y[i, j]) << 8) + np.int64(y[m_rows + i, j]), mult[j], c), RESID_LIMIT)
        _norm16(v, 0, n, gain, gain_shift, eps, RESID_LIMIT)
        for j in range(n):
            x[i, j] = _clamp(x[i, j] + v[j], RESID_LIMIT)


def add_normed(x, y, mult, shift: int, exp, gain, gain_shift: int, eps) -> None:
    """x += norm16(the product at 16 fractional bits, clamped), clamped (in place): a post norm's add."""
    _threads()
    _add_normed(x.numpy(), y.numpy(), mult.numpy(), shift, exp.numpy().reshape(-1), gain.numpy(), gain_shift,
                eps.numpy())
