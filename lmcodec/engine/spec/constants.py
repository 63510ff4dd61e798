"""The exact engine's constants (docs/ENGINE.md), in one place.

Changing any of them changes the bits an archive depends on: bump
:data:`lmcodec.engine.model.quantize.SPEC_VERSION` with them.
"""

from __future__ import annotations

import math

from . import fixedmath

RESID_FRAC = 16              # residual stream: int64 at 16 fractional bits
RESID_LIMIT = 1 << 40
ACT_FRAC = 16                # q, k, v, gate, up, attention output
QKV_LIMIT = (1 << 24) - 1
MLP_LIMIT = (1 << 26) - 1
ACT_MAX = 32639              # operands: x = 256 hi + lo with hi, lo in [-128, 127]
Q_MAX = 32767                # queries stay int16 inside attention
RSQRT_BITS = 24              # 1/rms at 24 fractional bits
KV_MAX = 127                 # int8 keys and values

#: Scores -> base-2 exponent for head dim 64: round(2^30 log2(e) / 127); any head dim
#: uses fixedmath.att_log2e(head_dim) (the softmax's 1/sqrt(hd) and the keys' 1/127 folded in).
LOG2E_ATT = fixedmath.att_log2e(64)
MAX_HEAD_DIM = 256           # |s| = |q16 . k8| < 256 * 2^15 * 127 < 2^31
ATT_SHIFT = 36
ATT_PRESHIFT = 19
ATT_D_CAP = 1 << 30
ATT_U_CAP = 17 << fixedmath.EXP2_FRAC_BITS
ATT_P_SHIFT = fixedmath.EXP2_VALUE_BITS - 16   # the best key weighs 2^16
MAX_KEYS = 8192

#: round(2^30 log2(e)): logit differences -> base-2 exponent.
LOG2E_OUT = fixedmath.log2e_over(1, 30)
OUT_U_CAP = 31 << fixedmath.EXP2_FRAC_BITS
OUT_D_CAP = (1 << 31) - 1
OUT_PRE_LIMIT = 36

#: The alphabet adds one escape symbol per byte value to the model's vocabulary (lmcodec.coding.tokens).
ESCAPES = 256
PRECISION = 24               # coding frequencies sum to 2^24
TOTAL = 1 << PRECISION
BUCKETS = 256
BUCKET_FLOOR = 256
#: Bits every coded token costs at least (stage 1 keeps 255 * 256 / 2^24 off the top bucket).
MIN_TOKEN_BITS = -math.log2(1.0 - (BUCKETS - 1) * BUCKET_FLOOR / TOTAL)


#: The largest vocabulary the frequencies' bounds are proved for (docs/ENGINE.md, "Limits"):
#: an escape then weighs at most 2^30, as a token does, and a bucket holds at most 65,537 symbols.
MAX_VOCAB = 1 << 24


def bucket_width(alphabet: int) -> int:
    """Symbols per bucket of the coder's two stages: the alphabet padded to a multiple of 256.

    Refuses a vocabulary (alphabet less the escapes) outside 1..MAX_VOCAB, where the
    bounds that keep every product below 2^63 are not proved.
    """
    if not ESCAPES < alphabet <= MAX_VOCAB + ESCAPES:
        raise ValueError(f"a vocabulary of {alphabet - ESCAPES} tokens is outside 1..{MAX_VOCAB}")
    return -(-alphabet // BUCKETS)
