"""The online models of :class:`lmcodec.coding.mixing.StreamMixer` (n-gram counts, match model, mixing
weights) as numba code on numpy arrays: the same integers, without a Python dict in sight.

One stream's state is :attr:`OnlineModels.state`, a tuple of numpy arrays (layout below) that the
compiled functions take as their first argument:

* :func:`predict` (``state, row, lane, lm_total``): what ``StreamMixer.mix`` decides for one row before it
  touches the vocabulary -- the active components, the mixing context, the effective weights, the LM's
  scale, the sparse additions ``(symbol, value)`` and the escape floor -- kept as pending row ``row``;
* :func:`mix_row` (``state, row, p_row, out_row``): that row's mixed weights (``StreamMixer.mix``'s row);
* :func:`learn` (``state, row, x, px``): ``StreamMixer._learn`` of pending row ``row`` (symbol ``x``,
  the LM's weight ``px = p_row[x]`` before mixing);
* :func:`append` (``state, lane, x``): ``StreamMixer._append``.

A step runs as ``StreamMixer`` orders it: :func:`predict` for every live lane (rows 0..n-1 in lane order),
then :func:`learn` for every row in order, then :func:`append` for every row in order.  :func:`learn`
reads a symbol's count from the live tables (through the context slots :func:`predict` kept), which
equal ``StreamMixer``'s snapshot because nothing is appended between a step's predictions and its
learning.  :meth:`OnlineModels.mix` and :meth:`OnlineModels.update` are that driver in Python.

Exactness: every value is an int64 computed with the same floors (``//`` and ``>>`` floor in numba as
in Python).  The one product that could leave int64 is ``p_v * scale`` in :func:`mix_row` (and
``px * scale`` in :func:`learn`): with ``scale = (eff_0 << 40) // lm_total``, ``eff_0 <= 2^16`` and
the LM's rows holding their best symbol at 2^30 (``lm_total >= 2^30``), ``scale <= 2^26`` and
``p_v <= 2^30`` (escapes ``lm_total >> 24``, below 2^30 for any vocabulary under 2^24), so the
product stays below 2^57.  In general it is exact while ``max(p) * scale < 2^63``.  The additions are
at most ``2^16 * 4097 << 20 < 2^49``.

State layout (``S`` = the index sizes, powers of two at least twice their pool's size; ids are int32):

====  ===========  ======================  ===============================================================
 #    name         shape, dtype            contents
====  ===========  ======================  ===============================================================
 0    cfg          [8] int64               n_orders, match (0/1), n_components, alphabet, lanes, collide
                                           (hash forced into 4 slots: tests), max additions per row, -
 1    orders       [n_orders] int64        the configured orders (ascending)
 2    limits       [n_orders] int64        COUNT_LIMIT of each
 3    hist         [room] int32            the lanes' histories, lane ``i`` at ``hist[off_i: off_i + room_i]``
 4    lanest       [lanes, 6] int64        per lane: off, room, length, match_lane, match_pos, match_len
 5    used         [3] int64               contexts, entries, match keys allocated so far
 6    cidx         [S_c] int32             context index: slot -> context id, -1 empty (linear probing)
 7    ckey         [N_c, 2] int64          context key: order | s0 << 3 | s1 << 22 | s2 << 41, s3 (missing
                                           symbols 0; the order tells them apart)
 8    chead        [N_c] int32             first entry of the context's list (-1 none)
 9    ctotal       [N_c] int64             the context's total (0: not active)
10    eidx         [S_e] int32             entry index: slot -> entry id
11    ekey         [N_e, 2] int64          (context id, symbol)
12    ecount       [N_e] int64             count; 0 = removed by halving (off the list, still indexed,
                                           revived in place when the symbol comes back)
13    enext        [N_e] int32             next entry of the same context (-1 end)
14    xidx         [S_x] int32             match index: slot -> key id
15    xkey         [N_x, 2] int64          the last MATCH_MIN symbols: s0 | s1 << 19 | s2 << 38, s3 | s4 << 19 |
                                           s5 << 38
16    xval         [N_x, 2] int64          (lane, next position): the latest occurrence (dict overwrite)
17    weights      [72, n_comp] int64      mixing weights, row (bucket * 6 + top + 1) * 3 + confidence,
                                           every row starting as ``StreamMixer._initial()``
18    prow         [lanes, 6] int64        pending row: lane, ctx row, scale, floor, active count, additions
19    pact         [lanes, n_comp] int64   pending: active component ids (0 = LM, 1 + i = orders[i], last =
                                           match)
20    peff         [lanes, n_comp] int64   pending: effective weights of the active components
21    psrc         [lanes, n_comp] int64   pending: per active sparse component its context id (the match:
                                           its predicted symbol)
22    ptot         [lanes, n_comp] int64   pending: per active sparse component its total (the match: 1)
23    padd_sym     [lanes, M] int64        pending additions: symbols ...
24    padd_val     [lanes, M] int64        ... and values ``(w_k * count << MASS_BITS) // total``
====  ===========  ======================  ===============================================================

Sizing (so the tables never grow): with ``capacity`` the symbols the stream's lanes will append in all,
each append adds at most one context and one entry per order and one match key.  Pools: contexts 1 for
order 0 plus ``min(capacity, alphabet^k)`` per order k >= 1; entries ``min(capacity, alphabet)`` for order
0 plus ``capacity`` per order k >= 1; match keys ``capacity``.  Indexes: the next power of two at least twice
a pool (load <= 1/2).  Histories: ``lane_lengths`` when given (flat, with offsets), else ``capacity``
symbols for every lane.  ``M``, the additions of a row: ``sum(min(COUNT_LIMIT[k], alphabet))`` over the
orders, +1 for the match (a context's entries never outnumber its total, which stays <= its limit).
Appending past a lane's room or a pool raises.  Memory (:attr:`OnlineModels.nbytes`) at worst, per symbol
of capacity: a context 28 + 8..16 bytes (pool + index slots), an entry 28 + 8..16, a match key 32 + 8..16, a
history symbol 4 -- at level 6 (five orders and the match) about 450 B, plus 16 M bytes of pending additions
per lane (M = 17,409: 279 KB); 4 lanes of 8,192 symbols take 15 MB.
"""

from __future__ import annotations

import numpy as np

from ..engine.cpu.jit import JIT, njit
from ..engine.spec.constants import ESCAPES
from .mixerconfig import MixerConfig
from .mixing import (
    COUNT_LIMIT,
    LM_START,
    MASS_BITS,
    MATCH_BUCKETS,
    MATCH_CAP,
    MATCH_MIN,
    RATE_SHIFT,
    WEIGHT_FLOOR,
    WEIGHT_ONE,
)

SYMBOL_BITS = 19               # symbols are below 2^19 (keys pack them)
CTX_ROWS = 4 * 6 * 3           # (match bucket, top order + 1, confidence)
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_M3 = np.uint64(0x165667B19E3779F9)


# The state tuple's fields: ``state[PADD_SYM]`` (static indices, numba reads them as constants).
CFG = 0
ORDERS = 1
LIMITS = 2
HIST = 3
LANEST = 4
USED = 5
CIDX = 6
CKEY = 7
CHEAD = 8
CTOTAL = 9
EIDX = 10
EKEY = 11
ECOUNT = 12
ENEXT = 13
XIDX = 14
XKEY = 15
XVAL = 16
WEIGHTS = 17
PROW = 18
PACT = 19
PEFF = 20
PSRC = 21
PTOT = 22
PADD_SYM = 23
PADD_VAL = 24


def ctx_row(ctx: tuple[int, int, int]) -> int:
    """The weights row of a mixing context (bucket, top order + 1, confidence)."""
    b, top, conf = ctx
    return (b * 6 + top) * 3 + conf


# -- hashing ------------------------------------------------------------------------------------


@njit(inline="always", **JIT)
def _slot(idx, k1, k2, collide):  # pragma: no cover - compiled
    mask = idx.shape[0] - 1
    h = np.uint64(k1) * _M1 ^ (np.uint64(k2) + _M3) * _M2
    h ^= h >> np.uint64(31)
    h *= _M2
    h ^= h >> np.uint64(29)
    s = np.int64(h & np.uint64(mask))
    if collide:
        s &= 3
    return s


@njit(inline="always", **JIT)
def _find(idx, keys, k1, k2, collide):  # pragma: no cover - compiled
    """The slot of key (k1, k2): the one holding it, else the empty slot where it would go."""
    mask = idx.shape[0] - 1
    s = _slot(idx, k1, k2, collide)
    while True:
        i = idx[s]
        if i < 0 or (keys[i, 0] == k1 and keys[i, 1] == k2):
            return s
        s = (s + 1) & mask


@njit(inline="always", **JIT)
def _id_of(idx, keys, k1, k2, used, pool, collide):  # pragma: no cover - compiled
    """The id of key (k1, k2) in a table (``idx`` its index, ``keys`` its pool, ``used[pool]`` the ids given
    out), given a new id if it has none; returns (id, new)."""
    s = _find(idx, keys, k1, k2, collide)
    i = idx[s]
    if i >= 0:
        return i, False
    i = used[pool]
    if i >= keys.shape[0]:
        raise ValueError("OnlineModels: a table's pool is full")
    used[pool] = i + 1
    idx[s] = i
    keys[i, 0] = k1
    keys[i, 1] = k2
    return i, True


@njit(inline="always", **JIT)
def _ctx_key(hist, end, k):  # pragma: no cover - compiled
    """The key of the order-k context ending at ``hist[end - 1]``."""
    k1 = np.int64(k)
    k2 = np.int64(0)
    base = end - k
    for j in range(k):
        s = np.int64(hist[base + j])
        if j < 3:
            k1 |= s << (3 + 19 * j)
        else:
            k2 = s
    return k1, k2


@njit(inline="always", **JIT)
def _match_key(hist, end):  # pragma: no cover - compiled
    base = end - MATCH_MIN
    k1 = np.int64(0)
    k2 = np.int64(0)
    for j in range(3):
        k1 |= np.int64(hist[base + j]) << (19 * j)
        k2 |= np.int64(hist[base + 3 + j]) << (19 * j)
    return k1, k2


# -- the compiled steps ---------------------------------------------------------------------------


@njit(**JIT)
def _match(state, lane):  # pragma: no cover - compiled
    """StreamMixer._match: (predicted symbol, match length) of a lane, or (-1, 0); updates its state."""
    cfg = state[CFG]
    hist = state[HIST]
    lanest = state[LANEST]
    xidx = state[XIDX]
    xkey = state[XKEY]
    xval = state[XVAL]
    if lanest[lane, 5]:
        j = lanest[lane, 3]
        pos = lanest[lane, 4]
        if pos < lanest[j, 2]:
            return np.int64(hist[lanest[j, 0] + pos]), lanest[lane, 5]
        lanest[lane, 5] = 0
    off = lanest[lane, 0]
    hl = lanest[lane, 2]
    if hl < MATCH_MIN:
        return np.int64(-1), np.int64(0)
    k1, k2 = _match_key(hist, off + hl)
    i = xidx[_find(xidx, xkey, k1, k2, cfg[5])]
    if i < 0:
        return np.int64(-1), np.int64(0)
    j = xval[i, 0]
    pos = xval[i, 1]
    src = lanest[j, 0]
    if pos >= lanest[j, 2]:
        return np.int64(-1), np.int64(0)
    n = np.int64(MATCH_MIN)
    while n < MATCH_CAP and n < pos and n < hl and hist[src + pos - 1 - n] == hist[off + hl - 1 - n]:
        n += 1
    lanest[lane, 3] = j
    lanest[lane, 4] = pos
    lanest[lane, 5] = n
    return np.int64(hist[src + pos]), n


@njit(**JIT)
def predict(state, row, lane, lm_total):  # pragma: no cover - compiled
    """``StreamMixer.mix`` for one row (lane ``lane``, the LM's row total ``lm_total``) up to the vocabulary.

    Keeps pending row ``row``: prow[row] = (lane, ctx row, scale, floor, active count, additions),
    the active components, effective weights and sources, and the additions (padd_sym, padd_val).
    Returns the number of additions.  The match model's state moves as in ``StreamMixer._match``.
    """
    cfg = state[CFG]
    orders = state[ORDERS]
    hist = state[HIST]
    lanest = state[LANEST]
    cidx = state[CIDX]
    ckey = state[CKEY]
    chead = state[CHEAD]
    ctotal = state[CTOTAL]
    ekey = state[EKEY]
    ecount = state[ECOUNT]
    enext = state[ENEXT]
    weights = state[WEIGHTS]
    prow = state[PROW]
    pact = state[PACT]
    peff = state[PEFF]
    psrc = state[PSRC]
    ptot = state[PTOT]
    padd_sym = state[PADD_SYM]
    padd_val = state[PADD_VAL]
    n_orders = cfg[0]
    n_comp = cfg[2]
    off = lanest[lane, 0]
    hl = lanest[lane, 2]
    na = 1
    pact[row, 0] = 0
    top = -1
    for i in range(n_orders):
        k = orders[i]
        if hl < k:
            continue
        k1, k2 = _ctx_key(hist, off + hl, k)
        c = cidx[_find(cidx, ckey, k1, k2, cfg[5])]
        if c < 0:
            continue
        total = ctotal[c]
        if total:
            pact[row, na] = 1 + i
            psrc[row, na] = c
            ptot[row, na] = total
            na += 1
            top = k
    length = np.int64(0)
    if cfg[1]:
        sym, length = _match(state, lane)
        if length:
            pact[row, na] = n_comp - 1
            psrc[row, na] = sym
            ptot[row, na] = 1
            na += 1
    bucket = (1 if length > MATCH_BUCKETS[0] else 0) + (1 if length > MATCH_BUCKETS[1] else 0) + \
        (1 if length > MATCH_BUCKETS[2] else 0)
    # _confidence: total.bit_length() - 31 <= 0 iff total < 2^31, <= 3 iff total < 2^34
    conf = 0 if lm_total < (np.int64(1) << 31) else (1 if lm_total < (np.int64(1) << 34) else 2)
    cr = (bucket * 6 + top + 1) * 3 + conf
    ws = np.int64(0)
    for j in range(na):
        ws += weights[cr, pact[row, j]]
    for j in range(na):
        peff[row, j] = (weights[cr, pact[row, j]] << 16) // ws
    eff0 = peff[row, 0]
    scale = (eff0 << 40) // max(np.int64(1), lm_total)
    nadd = 0
    for j in range(1, na):
        wk = peff[row, j]
        total = ptot[row, j]
        if pact[row, j] == n_comp - 1 and cfg[1]:
            padd_sym[row, nadd] = psrc[row, j]
            padd_val[row, nadd] = (wk << MASS_BITS) // total
            nadd += 1
        else:
            e = chead[psrc[row, j]]
            while e >= 0:
                padd_sym[row, nadd] = ekey[e, 1]
                padd_val[row, nadd] = (wk * ecount[e] << MASS_BITS) // total
                nadd += 1
                e = enext[e]
    prow[row, 0] = lane
    prow[row, 1] = cr
    prow[row, 2] = scale
    prow[row, 3] = max(np.int64(1), eff0 >> (24 - MASS_BITS))
    prow[row, 4] = na
    prow[row, 5] = nadd
    return nadd


@njit(**JIT)
def mix_row(state, row, p_row, out_row):  # pragma: no cover - compiled
    """out_row <- pending row ``row``'s mixed weights from the LM's weights ``p_row`` (both int64, same length):
    ``(p_v * scale) >> MASS_BITS``, plus the additions, escapes raised to the floor."""
    cfg = state[CFG]
    prow = state[PROW]
    padd_sym = state[PADD_SYM]
    padd_val = state[PADD_VAL]
    scale = prow[row, 2]
    for v in range(p_row.shape[0]):
        out_row[v] = (p_row[v] * scale) >> MASS_BITS
    for j in range(prow[row, 5]):
        out_row[padd_sym[row, j]] += padd_val[row, j]
    floor = prow[row, 3]
    for v in range(cfg[3] - ESCAPES, cfg[3]):
        out_row[v] = max(out_row[v], floor)


@njit(**JIT)
def learn(state, row, x, px):  # pragma: no cover - compiled
    """``StreamMixer._learn`` of pending row ``row``: its symbol ``x``, the LM's weight of it ``px``."""
    cfg = state[CFG]
    eidx = state[EIDX]
    ekey = state[EKEY]
    ecount = state[ECOUNT]
    weights = state[WEIGHTS]
    prow = state[PROW]
    pact = state[PACT]
    peff = state[PEFF]
    psrc = state[PSRC]
    ptot = state[PTOT]
    n_comp = cfg[2]
    na = prow[row, 4]
    terms = np.empty(na, np.int64)
    terms[0] = (px * prow[row, 2]) >> MASS_BITS
    mass = terms[0]
    for j in range(1, na):
        if pact[row, j] == n_comp - 1 and cfg[1]:
            c = np.int64(1) if psrc[row, j] == x else np.int64(0)
        else:
            en = eidx[_find(eidx, ekey, psrc[row, j], x, cfg[5])]
            c = ecount[en] if en >= 0 else np.int64(0)
        terms[j] = (peff[row, j] * c << MASS_BITS) // ptot[row, j]
        mass += terms[j]
    if mass == 0:
        return
    cr = prow[row, 1]
    ws = np.int64(0)
    for j in range(na):
        ws += weights[cr, pact[row, j]]
    for j in range(na):
        target = (terms[j] << 16) // mass      # this component's share of the symbol's mass
        ef = peff[row, j]
        ef += (target - ef) >> RATE_SHIFT      # online EM step on the effective weights
        weights[cr, pact[row, j]] = max(np.int64(WEIGHT_FLOOR), (ef * ws) >> 16)
    s = np.int64(0)
    for c in range(n_comp):
        s += weights[cr, c]
    for c in range(n_comp):
        weights[cr, c] = max(np.int64(WEIGHT_FLOOR), (weights[cr, c] << 16) // s)


@njit(**JIT)
def append(state, lane, x):  # pragma: no cover - compiled
    """``StreamMixer._append``: symbol ``x`` joins lane ``lane`` (counts, halving, match state and index)."""
    cfg = state[CFG]
    orders = state[ORDERS]
    limits = state[LIMITS]
    hist = state[HIST]
    lanest = state[LANEST]
    used = state[USED]
    cidx = state[CIDX]
    ckey = state[CKEY]
    chead = state[CHEAD]
    ctotal = state[CTOTAL]
    eidx = state[EIDX]
    ekey = state[EKEY]
    ecount = state[ECOUNT]
    enext = state[ENEXT]
    xidx = state[XIDX]
    xkey = state[XKEY]
    xval = state[XVAL]
    collide = cfg[5]
    off = lanest[lane, 0]
    hl = lanest[lane, 2]
    if hl >= lanest[lane, 1]:
        raise ValueError("OnlineModels: a lane appended past its room")
    for i in range(cfg[0]):
        k = orders[i]
        if hl < k:
            continue
        k1, k2 = _ctx_key(hist, off + hl, k)
        c, new = _id_of(cidx, ckey, k1, k2, used, 0, collide)
        if new:
            chead[c] = -1
            ctotal[c] = 0
        e, new = _id_of(eidx, ekey, c, x, used, 1, collide)
        if new:
            ecount[e] = 0
        if ecount[e] == 0:   # new, or removed by a halving: back on the context's list
            enext[e] = chead[c]
            chead[c] = e
        ecount[e] += 1
        total = ctotal[c] + 1
        if total > limits[i]:
            total = 0
            prev = -1
            e = chead[c]
            while e >= 0:
                nxt = enext[e]
                n = ecount[e] >> 1
                ecount[e] = n
                if n:
                    total += n
                    prev = e
                elif prev < 0:
                    chead[c] = nxt
                else:
                    enext[prev] = nxt
                e = nxt
        ctotal[c] = total
    if cfg[1]:
        if lanest[lane, 5]:
            j = lanest[lane, 3]
            pos = lanest[lane, 4]
            if pos < lanest[j, 2] and hist[lanest[j, 0] + pos] == x:
                lanest[lane, 4] = pos + 1
                lanest[lane, 5] = min(lanest[lane, 5] + 1, np.int64(MATCH_CAP))
            else:
                lanest[lane, 5] = 0
        if hl >= MATCH_MIN:
            k1, k2 = _match_key(hist, off + hl)
            i, _ = _id_of(xidx, xkey, k1, k2, used, 2, collide)
            xval[i, 0] = lane
            xval[i, 1] = hl
    hist[off + hl] = x
    lanest[lane, 2] = hl + 1


@njit(**JIT)
def _mix_rows(state, lanes, p, totals, out):  # pragma: no cover - compiled
    for r in range(lanes.shape[0]):
        predict(state, r, lanes[r], totals[r])
        mix_row(state, r, p[r], out[r])


@njit(**JIT)
def _update_rows(state, lanes, symbols, px):  # pragma: no cover - compiled
    for r in range(lanes.shape[0]):
        learn(state, r, symbols[r], px[r])
    for r in range(lanes.shape[0]):
        append(state, lanes[r], symbols[r])


# -- Python side ------------------------------------------------------------------------------------


def _index_size(n: int) -> int:
    return 1 << max(2, (2 * max(1, n) - 1).bit_length())


class OnlineModels:
    """One stream's online models (``lanes`` lanes, ``capacity`` symbols appended in all) as arrays.

    ``lane_lengths``: each lane's length when known (histories flat, with offsets); otherwise every lane
    gets room for ``capacity`` symbols.  ``collide`` forces every hash into 4 slots (tests of exact keys).
    """

    def __init__(self, config: MixerConfig, lanes: int, capacity: int, alphabet: int,
                 lane_lengths: list[int] | None = None, collide: bool = False):
        if alphabet > 1 << SYMBOL_BITS:
            raise ValueError(f"alphabet {alphabet} over 2^{SYMBOL_BITS}")
        self.config = config
        self.alphabet = alphabet
        self.lanes = lanes
        self.orders = config.orders
        self.n_components = 1 + len(self.orders) + (1 if config.match else 0)
        cap = max(1, int(capacity))
        rooms = [int(n) for n in lane_lengths] if lane_lengths is not None else [cap] * lanes
        if len(rooms) != lanes:
            raise ValueError("lane_lengths: one per lane")
        n_ctx = sum(1 if k == 0 else min(cap, alphabet ** k) for k in self.orders) or 1
        n_ent = sum(min(cap, alphabet) if k == 0 else cap for k in self.orders) or 1
        n_x = cap if config.match else 1
        if max(n_ctx, n_ent, n_x) >= 1 << 30:
            raise ValueError("capacity too large for int32 ids")
        most = sum(min(COUNT_LIMIT[k], alphabet) for k in self.orders) + (1 if config.match else 0)
        nc = self.n_components
        cfg = np.array([len(self.orders), int(config.match), nc, alphabet, lanes, int(collide), most, 0], np.int64)
        lanest = np.zeros((lanes, 6), np.int64)
        lanest[:, 0] = np.concatenate([[0], np.cumsum(rooms)[:-1]]).astype(np.int64)
        lanest[:, 1] = rooms
        lanest[:, 3] = -1
        w = self.initial()
        self.state = (
            cfg,
            np.array(self.orders, np.int64),
            np.array([COUNT_LIMIT[k] for k in self.orders], np.int64),
            np.zeros(max(1, sum(rooms)), np.int32),
            lanest,
            np.zeros(3, np.int64),
            np.full(_index_size(n_ctx), -1, np.int32),
            np.zeros((n_ctx, 2), np.int64),
            np.full(n_ctx, -1, np.int32),
            np.zeros(n_ctx, np.int64),
            np.full(_index_size(n_ent), -1, np.int32),
            np.zeros((n_ent, 2), np.int64),
            np.zeros(n_ent, np.int64),
            np.full(n_ent, -1, np.int32),
            np.full(_index_size(n_x), -1, np.int32),
            np.zeros((n_x, 2), np.int64),
            np.zeros((n_x, 2), np.int64),
            np.tile(np.array(w, np.int64), (CTX_ROWS, 1)),
            np.zeros((lanes, 6), np.int64),
            np.zeros((lanes, nc), np.int64),
            np.zeros((lanes, nc), np.int64),
            np.zeros((lanes, nc), np.int64),
            np.zeros((lanes, nc), np.int64),
            np.zeros((lanes, most), np.int64),
            np.zeros((lanes, most), np.int64),
        )
        self._lanes = np.zeros(0, np.int64)

    @property
    def nbytes(self) -> int:
        """The state's memory in bytes."""
        return sum(a.nbytes for a in self.state)

    def initial(self) -> list[int]:
        """``StreamMixer._initial()``: every mixing context's starting weights."""
        rest = (WEIGHT_ONE - LM_START) // max(1, self.n_components - 1)
        w = [LM_START] + [rest] * (self.n_components - 1)
        w[0] += WEIGHT_ONE - sum(w)
        return w

    # -- the driver: StreamMixer.mix / update without the bias ------------------------------
    def mix(self, lanes: list[int], p: np.ndarray) -> np.ndarray:
        """The mixed rows [n, A] int64 of the LM's weights ``p`` [n, A] int64, one row per lane of ``lanes``."""
        self._lanes = np.asarray(lanes, np.int64)
        if self.n_components == 1 or not len(lanes):
            return p
        p = np.ascontiguousarray(p, dtype=np.int64)
        out = np.empty_like(p)
        _mix_rows(self.state, self._lanes, p, p.sum(axis=1), out)
        return out

    def update(self, symbols, p: np.ndarray) -> None:
        """Learn the symbols of the rows of the last :meth:`mix` (``p``: the same LM weights)."""
        if self.n_components == 1 or not len(symbols):
            return
        y = np.asarray(symbols, np.int64)
        px = np.asarray(p, np.int64)[np.arange(len(y)), y]
        _update_rows(self.state, self._lanes[:len(y)], y, px)

    # -- views (tests) ------------------------------------------------------------------------
    def weights_of(self, ctx: tuple[int, int, int]) -> list[int]:
        return [int(v) for v in self.state[WEIGHTS][ctx_row(ctx)]]

    def history(self, lane: int) -> list[int]:
        off, _, n = self.state[LANEST][lane, :3]
        return [int(v) for v in self.state[HIST][off:off + n]]

    def tables(self) -> dict[int, dict[tuple, tuple[int, dict[int, int]]]]:
        """Per order: context -> (total, {symbol: count}) for every context created (as StreamMixer's dicts)."""
        ckey, chead, ctotal = self.state[CKEY], self.state[CHEAD], self.state[CTOTAL]
        ekey, ecount, enext = self.state[EKEY], self.state[ECOUNT], self.state[ENEXT]
        out: dict[int, dict] = {k: {} for k in self.orders}
        for c in range(int(self.state[USED][0])):
            k1, k2 = int(ckey[c, 0]), int(ckey[c, 1])
            k = k1 & 7
            syms = [(k1 >> (3 + 19 * j)) & ((1 << 19) - 1) for j in range(min(k, 3))] + ([k2] if k == 4 else [])
            entries, e = {}, int(chead[c])
            while e >= 0:
                entries[int(ekey[e, 1])] = int(ecount[e])
                e = int(enext[e])
            out[k][tuple(syms)] = (int(ctotal[c]), entries)
        return out

    def match_index(self) -> dict[tuple, tuple[int, int]]:
        xkey, xval = self.state[XKEY], self.state[XVAL]
        m = (1 << 19) - 1
        out = {}
        for i in range(int(self.state[USED][2])):
            a, b = int(xkey[i, 0]), int(xkey[i, 1])
            key = tuple((a >> (19 * j)) & m for j in range(3)) + tuple((b >> (19 * j)) & m for j in range(3))
            out[key] = (int(xval[i, 0]), int(xval[i, 1]))
        return out
