"""Shared pieces of the Triton kernels (lmcodec/engine/triton/ops.py, lmcodec/engine/triton/attend.py).

The spec's constants as constexprs (a ``@triton.jit`` function reads only
constexpr globals), its integer primitives (docs/ENGINE.md, Notation) as jit
functions, the tile sizes, and the launchers' shape checks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..spec import constants as spec
from ..spec import fixedmath


@dataclass(frozen=True)
class Blocks:
    """Tile sizes (speed only: no integer result depends on them; the tests swap in a second set).

    ``cols``: elements of a row one step of a row kernel handles (norm, operand,
    residual_add, mlp, gaps, split); 1,024 int64 = 8 KB per tile, and a 576-wide
    residual row (SmolLM2) is one tile.  ``keys``: cache slots per attention
    tile; 64 keys x 64 dims of int8 = 4 KB of K and of V per tile, and it is the
    PV product's reduction dimension, which NVIDIA's int8 MMA needs >= 32.
    """

    cols: int = 1024
    keys: int = 64


BLOCKS = Blocks()

#: Query heads per attention program, padded: NVIDIA's MMA needs M >= 16 rows
#: (SmolLM2 fills 3 of them: 9 query heads over 3 KV heads).
MIN_DOT = 16
#: Smallest int8 dot reduction the NVIDIA compiler accepts (the interpreter takes less).
MIN_DOT_K = 32


# Spec constants as constexprs (a jit function reads only constexpr globals).
ACT_FRAC = tl.constexpr(spec.ACT_FRAC)
ACT_MAX = tl.constexpr(spec.ACT_MAX)
Q_MAX = tl.constexpr(spec.Q_MAX)
QKV_LIMIT = tl.constexpr(spec.QKV_LIMIT)
MLP_LIMIT = tl.constexpr(spec.MLP_LIMIT)
RESID_FRAC = tl.constexpr(spec.RESID_FRAC)
RESID_LIMIT = tl.constexpr(spec.RESID_LIMIT)
RSQRT_BITS = tl.constexpr(spec.RSQRT_BITS)
KV_MAX = tl.constexpr(spec.KV_MAX)
ATT_PRESHIFT = tl.constexpr(spec.ATT_PRESHIFT)
ATT_SHIFT = tl.constexpr(spec.ATT_SHIFT)
ATT_D_CAP = tl.constexpr(spec.ATT_D_CAP)
ATT_U_CAP = tl.constexpr(spec.ATT_U_CAP)
ATT_P_SHIFT = tl.constexpr(spec.ATT_P_SHIFT)
LOG2E_OUT = tl.constexpr(spec.LOG2E_OUT)
OUT_D_CAP = tl.constexpr(spec.OUT_D_CAP)
OUT_U_CAP = tl.constexpr(spec.OUT_U_CAP)
OUT_PRE_LIMIT = tl.constexpr(spec.OUT_PRE_LIMIT)
ROPE_BITS = tl.constexpr(fixedmath.ROPE_BITS)
ROPE_HALF = tl.constexpr(1 << (fixedmath.ROPE_BITS - 1))       # rshift's rounding term at a constant shift
SIG_SPAN = tl.constexpr(fixedmath.SIGMOID_RANGE << fixedmath.SIGMOID_STEP_BITS)
SIG_SHIFT = tl.constexpr(spec.ACT_FRAC - fixedmath.SIGMOID_STEP_BITS)
SIG_SHIFT_HALF = tl.constexpr(1 << (spec.ACT_FRAC - fixedmath.SIGMOID_STEP_BITS - 1))
SIG_BITS = tl.constexpr(fixedmath.SIGMOID_VALUE_BITS)
SIG_BITS_HALF = tl.constexpr(1 << (fixedmath.SIGMOID_VALUE_BITS - 1))
#: The largest shift count a kernel uses: every |value| shifted right is below 2^62,
#: so any larger count gives the same result, and 63+ is undefined on a GPU.
MAX_SHIFT = tl.constexpr(62)
#: Below every score z (|z| < 2^55): the maximum over an empty set of keys.
NO_KEY = tl.constexpr(-(1 << 62))
#: w = sum_k 256^k (byte_k - 128) + _W_OFFSET for 0 <= w < 2^40 (five bytes).
W_OFFSET = tl.constexpr(128 * ((1 << 40) - 1) // 255)


# -- integer helpers (docs/ENGINE.md, Notation) ------------------------------------------------
@triton.jit
def rshift(x, s):
    """x / 2^s rounded half up, for int64 x and 0 <= s <= 62."""
    return (x + ((1 << s) >> 1)) >> s


@triton.jit
def bitlen(m):
    """Bits of int64 m in [0, 2^63) (0 for 0): a binary search, six constant shifts."""
    n = m * 0
    for k in tl.static_range(5, -1, -1):
        t = m >> (1 << k)
        big = t != 0
        m = tl.where(big, t, m)
        n += tl.where(big, 1 << k, 0)
    return n + (m != 0).to(tl.int64)


@triton.jit
def fit(m, limit):
    """Least s >= 0 with rshift(m, s) <= limit, for 0 <= m < 2^62 and limit >= 2^14."""
    s = tl.maximum(bitlen(m) - 15, 0)
    return s + (rshift(m, s) > limit).to(tl.int64)


@triton.jit
def floor_div(n, d):
    """floor(n / d) for d > 0 (Triton's // truncates toward zero)."""
    return tl.where(n >= 0, n // d, -((d - 1 - n) // d))   # both numerators >= 0


@triton.jit
def requant(y, mult, c):
    """rshift(y * mult, c) for c >= 0, else clamp(y * mult, +-2^40) << min(-c, 20) (|y * mult| < 2^58)."""
    p = y * mult
    right = rshift(p, tl.minimum(tl.maximum(c, 0), MAX_SHIFT))
    left = tl.minimum(tl.maximum(p, -(1 << 40)), 1 << 40) << tl.minimum(tl.maximum(-c, 0), 20)
    return tl.where(c >= 0, right, left)


@triton.jit
def isqrt(n):
    """floor(sqrt(n)) for 0 <= n < 2^60: an IEEE float64 square root (within 1 of the root), one
    integer Newton step (in case the device's root were less precise), then exact corrections."""
    r = tl.maximum(tl.sqrt(n.to(tl.float64)).to(tl.int64), 1)
    r = (r + n // r) >> 1
    for _ in tl.static_range(2):
        r = tl.where(r * r > n, r - 1, r)
        r = tl.where((r + 1) * (r + 1) <= n, r + 1, r)
    return r


@triton.jit
def rms_root(ss, k, eps_s):
    """An RMSNorm's ``r = isqrt(k 2^48 / d)`` with d = max(ss + k eps[s], 1) (docs/ENGINE.md, RMSNorm)."""
    d = tl.maximum(ss + k * eps_s, 1)
    return isqrt((k.to(tl.int64) << (2 * RSQRT_BITS)) // d)   # both positive: // is the floor


@triton.jit
def norm16_out(t, c, limit):
    """Gemma's norm16 from ``t = xs G r``: rshift(t, c) for c >= 0, else clamp(t, +-2^40) << min(-c, 20);
    clamped to +-limit (ops_torch.norm16)."""
    c = c.to(tl.int64)
    right = rshift(t, tl.minimum(tl.maximum(c, 0), MAX_SHIFT))
    left = tl.minimum(tl.maximum(t, -RESID_LIMIT), RESID_LIMIT) << tl.minimum(tl.maximum(-c, 0), 20)
    return tl.minimum(tl.maximum(tl.where(c >= 0, right, left), -limit), limit)


@triton.jit
def row_absmax(base, n_cols, BLOCK: tl.constexpr):
    """The largest magnitude of a row of ``n_cols`` int64 values at ``base`` (norm, operand), in tiles of BLOCK."""
    m = tl.full((), 0, tl.int64)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.max(tl.abs(tl.load(base + cols, mask=cols < n_cols, other=0))))
    return m


@triton.jit
def combine(y_ptr, n_rows, n_cols, row, cols, mask):
    """256 * y[row] + y[n_rows + row] at ``cols`` as int64 (int_mm's [hi rows; lo rows])."""
    hi = tl.load(y_ptr + row * n_cols + cols, mask=mask, other=0).to(tl.int64)
    lo = tl.load(y_ptr + (n_rows + row) * n_cols + cols, mask=mask, other=0).to(tl.int64)
    return (hi << 8) + lo


# -- launcher helpers ----------------------------------------------------------------------
def expect(t: torch.Tensor, dtype: torch.dtype, ndim: int | None = None, *sizes: int) -> None:
    """A launcher's shape check: dtype, rank, and the leading sizes given."""
    if t.dtype != dtype or (ndim is not None and t.dim() != ndim) or tuple(t.shape[:len(sizes)]) != sizes:
        raise ValueError(f"expected {dtype} of rank {ndim} starting {sizes}, got {t.dtype} {tuple(t.shape)}")


def check_cache(kt, kmax, vc, vmax, nkv: int, hd: int) -> None:
    """The KVCache layout (kvcache.KVCache): slots contiguous in keys, head dims contiguous in values."""
    rows, slots = kt.shape[0], kt.shape[-1]
    expect(kt, torch.int8, 4, rows, nkv, hd, slots)
    expect(vc, torch.int8, 4, rows, nkv, slots, hd)
    expect(kmax, torch.int32, 3, rows, nkv, slots)
    expect(vmax, torch.int32, 3, rows, nkv, slots)
    if kt.stride(3) != 1 or vc.stride(3) != 1 or kmax.stride(2) != 1 or vmax.stride(2) != 1:
        raise ValueError("cache tensors need their last dimension contiguous")


@functools.cache
def _exp2_cached(device: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(fixedmath.exp2_table(), device=device).to(dtype)


def exp2_table(device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """EXP2 (1,024 entries <= 2^30, so int32 holds them) on ``device``, made once per device and type."""
    return _exp2_cached(str(device), dtype)
