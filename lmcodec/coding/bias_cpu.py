"""The adaptive bias's per-token work as numba kernels on a CPU: one pass over the vocabulary
where tensor operations take about ten, each with its own [rows, V] temporary.

:meth:`lmcodec.coding.mixing.Mixer.lm_weights` (the LM's symbol weights after the
bias) and :meth:`~lmcodec.coding.mixing.Mixer._learn_bias` (one gradient step of the
bias) touch every token of the vocabulary at every decoding step: with Gemma 3's
262,144 tokens that is most of the online models' time.  These kernels compute
exactly the integers of the tensor code in ``mixing.py`` (which stays for other
devices; ``tests/test_mixing.py`` checks the two equal), in the same order of
floors and clamps, so an archive's bytes do not depend on which ran.
"""

from __future__ import annotations

import numpy as np
import torch

from ..engine.cpu.jit import JIT, njit, prange, sync_threads
from ..engine.spec.constants import ESCAPES, OUT_U_CAP
from ..engine.spec.fixedmath import exp2_table

_EXP2 = exp2_table()


@njit(parallel=True, **JIT)
def _lm_weights(u, bias, has_bias, frac, exp2, out):  # pragma: no cover - compiled
    """out [n, 256 width] <- the symbol weights of gaps ``u`` [n, V], after the bias when ``has_bias``."""
    n, vocab = u.shape
    for i in prange(n):
        g = np.empty(vocab, np.int64)
        low = np.int64(1 << 62)
        for v in range(vocab):
            g[v] = u[i, v] - (bias[v] >> frac) if has_bias else u[i, v]
            low = min(low, g[v])
        if not has_bias:
            low = 0
        total = np.int64(0)
        for v in range(vocab):
            e = min(g[v] - low, OUT_U_CAP) if has_bias else g[v]
            p = exp2[e & 1023] >> (e >> 10)
            out[i, v] = p
            total += p
        esc = max(total >> 24, np.int64(1))
        for v in range(vocab, vocab + ESCAPES):
            out[i, v] = esc
        for v in range(vocab + ESCAPES, out.shape[1]):
            out[i, v] = 0


@njit(**JIT)
def _count(coded, y, cap):  # pragma: no cover - compiled
    for t in y:
        coded[t] = min(coded[t] + 1, cap)


@njit(parallel=True, **JIT)
def _learn(q, rows, y, coded, rates, bias, cap, up):  # pragma: no cover - compiled
    """bias <- clamp(bias + up - down, +-cap): down_v = sum over ``rows`` of floor(q_rv rate_v / sum_v q_rv),
    up (zeros on entry) gets rate_y once per coded token y."""
    vocab = bias.shape[0]
    m = rows.shape[0]
    sums = np.zeros(m, np.int64)
    for k in prange(m):
        s = np.int64(0)
        for v in range(vocab):
            s += q[rows[k], v]
        sums[k] = s
    for t in y:
        up[t] += rates[coded[t]]
    for v in prange(vocab):
        rate = rates[coded[v]]
        down = np.int64(0)
        for k in range(m):
            down += q[rows[k], v] * rate // sums[k]
        b = bias[v] + up[v] - down
        bias[v] = min(max(b, -cap), cap)


def lm_weights(u: torch.Tensor, bias: torch.Tensor | None, frac: int, alphabet: int, width: int) -> torch.Tensor:
    """The LM's symbol weights [n, 256, width] int64 from gaps ``u`` [n, V] (``bias``: the adaptive bias,
    applied as ``Mixer.lm_weights`` does; None: ``ops_torch.weights_from_gaps`` alone)."""
    sync_threads()
    n = u.shape[0]
    out = np.empty((n, 256 * width), np.int64)
    b = bias.numpy() if bias is not None else np.zeros(1, np.int64)
    _lm_weights(np.ascontiguousarray(u.numpy()), b, bias is not None, frac, _EXP2, out)
    return torch.from_numpy(out).view(n, 256, width)


def learn_bias(q: torch.Tensor, rows: np.ndarray, y: np.ndarray, coded: torch.Tensor, rates: np.ndarray,
               bias: torch.Tensor, count_cap: int, bias_cap: int) -> None:
    """One step of ``Mixer._learn_bias`` in place on ``coded`` and ``bias``: ``q`` [n, >= V] the step's LM
    weights, ``rows`` the rows whose symbol ``y`` is a token (not an escape)."""
    sync_threads()
    _count(coded.numpy(), y, count_cap)
    up = np.zeros(bias.shape[0], np.int64)
    _learn(q.numpy(), rows, y, coded.numpy(), rates, bias.numpy(), bias_cap, up)


@njit(inline="always", **JIT)
def floor_div(x, d, inv):  # pragma: no cover - compiled
    """``x // d`` for 0 <= x < 2^53 and d >= 1 with ``inv = 1 / d``: the float estimate is within one of the
    quotient (its relative error is below 2^-51 and quotients here stay below 2^21), and the integer
    remainder corrects it, so the result is the exact floor on any machine."""
    q = np.int64(np.float64(x) * inv)
    r = x - q * d
    if r < 0:
        q -= 1
    elif r >= d:
        q += 1
    return q


#: Rows a step may teach with the bias's running value kept in its own array: an int32 bias starts
#: within +-2^24, a coded token's rise is below 2^26 and each row lowers a token by at most its rate,
#: 2^20, so 1,024 rows stay above -2^31 before the clamp.  Wider steps work on an int64 copy.
IN_PLACE_ROWS = 1024


@njit(inline="always", **JIT)
def _teach(q, totals, ys, n, rate_now, acc, vocab, bias_cap):  # pragma: no cover - compiled
    """acc[:vocab] -= floor(q_kv rate_v / total_k) for each teaching row k, clamped to +-bias_cap after
    the last; the clamp goes into the last teaching row's loop (one pass over the bias less).  Without a
    teaching row the bias did not move and stays within the cap."""
    last = -1
    for k in range(n):
        if ys[k] < vocab:
            last = k
    for k in range(last + 1):
        if ys[k] >= vocab:
            continue
        d = max(totals[k], np.int64(1))
        inv = 1.0 / np.float64(d)
        row = q[k]
        if k < last:
            for v in range(vocab):
                acc[v] -= floor_div(np.int64(row[v]) * rate_now[v], d, inv)
        else:
            for v in range(vocab):
                b = acc[v] - floor_div(np.int64(row[v]) * rate_now[v], d, inv)
                acc[v] = min(max(b, -bias_cap), bias_cap)


@njit(inline="always", **JIT)
def learn_step(q, totals, ys, n, coded, rates, rate_now, bias, count_cap, bias_cap):  # pragma: no cover - compiled
    """:func:`learn_bias` for the ``n`` rows of one step in one thread: ``q`` [>= n, >= V] their LM weights
    (int32 or int64: weights are at most 2^30),
    ``totals`` their tokens' sums, ``ys`` their symbols (escapes, >= V, teach nothing).  ``rate_now`` [V]
    keeps ``rates[coded]`` (updated here for the tokens counted), so the vocabulary loop reads no table
    through another and vectorises.  ``bias`` may be int32 (:data:`IN_PLACE_ROWS`)."""
    vocab = bias.shape[0]
    for k in range(n):
        if ys[k] < vocab:
            coded[ys[k]] = min(coded[ys[k]] + 1, count_cap)
            rate_now[ys[k]] = rates[coded[ys[k]]]
    for k in range(n):
        if ys[k] < vocab:
            bias[ys[k]] += rate_now[ys[k]]
    if n <= IN_PLACE_ROWS:
        _teach(q, totals, ys, n, rate_now, bias, vocab, bias_cap)
    else:
        acc = bias.astype(np.int64)
        _teach(q, totals, ys, n, rate_now, acc, vocab, bias_cap)
        bias[:] = acc
