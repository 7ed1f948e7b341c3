"""Compiled (numba) kernels for the CPU hot paths: normal and uniform draws over any n-d
coordinate grid (:func:`gaussian_grid`, :func:`uniform_grid`) and the fused
generate-compare-histogram summary of ``|w - w0|`` (:func:`delta_grid`).

Bit-identical to :mod:`cdi_experiments.generator.bits` (the tests check it on millions of
coordinates): numba compiles without fast-math, so LLVM neither fuses multiply-adds nor
reassociates, and ``sqrt`` lowers to the correctly rounded instruction. ``error_model="numpy"``
drops the Python zero-division checks (no divisor here can be zero), which is what lets LLVM
vectorize the loops; vectorized IEEE operations round exactly as scalar ones.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import types
from numba.extending import intrinsic

from cdi_experiments.generator import bits as B

_GOLDEN = np.uint64(B.GOLDEN)
_MIX1 = np.uint64(B.MIX1)
_MIX2 = np.uint64(B.MIX2)
_S30, _S27, _S31, _S11, _S52 = (np.uint64(k) for k in (30, 27, 31, 11, 52))
_HS1 = np.uint64(B.HASH_SEL_U1)
_HS2 = np.uint64(B.HASH_SEL_U2)
_HSU = np.uint64(B.HASH_SEL_UNIFORM)
_EXP_MASK = np.uint64(B.EXP_MASK)
_MANT_MASK = np.uint64(B.MANT_MASK)
_EXP_ONE = np.uint64(B.EXP_ONE)
_LC = B.LOG_COEF
_CC = B.COS_COEF
_SC = B.SIN_COEF
_TWO_M53, _U1_FLOOR, _SQRT2 = B.TWO_M53, B.U1_FLOOR, B.SQRT2
_LN2_HI, _LN2_LO = B.LN2_HI, B.LN2_LO
_TWO_PI, _INV_PIO2 = B.TWO_PI, B.INV_PIO2
_PIO2_1, _PIO2_2, _PIO2_2T = B.PIO2_1, B.PIO2_2, B.PIO2_2T


@intrinsic
def _f64_bits(typingctx, x):
    sig = types.uint64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint64))

    return sig, codegen


@intrinsic
def _bits_f64(typingctx, b):
    sig = types.float64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))

    return sig, codegen


@intrinsic
def _prefer_wide_vectors(typingctx):
    """Ask LLVM for 512-bit vectors in the enclosing function (no code is emitted).

    LLVM tunes AVX-512 CPUs to prefer 256-bit vectors; for this arithmetic-bound kernel the
    full width is ~1.3x faster. It is a code-generation hint only (the same IEEE operations
    run, lane by lane), and a no-op on CPUs without AVX-512. llvmlite only accepts known
    attribute names, hence the plain ``set.add``.
    """
    sig = types.none()

    def codegen(context, builder, signature, args):
        try:
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        except Exception:  # pragma: no cover - a different llvmlite: keep its default width
            pass
        return context.get_dummy_value()

    return sig, codegen


@nb.njit(inline="always")
def _hash64(x):
    x = x + _GOLDEN
    x = (x ^ (x >> _S30)) * _MIX1
    x = (x ^ (x >> _S27)) * _MIX2
    return x ^ (x >> _S31)


@nb.njit(inline="always")
def _sqrt_neg2log(u1f):
    """``sqrt(-2 ln max(u1f / 2**53, 1e-12))`` for a 53-bit integer held as a float64 (the
    same operations, in the same order, as ``bits.neg2log``)."""
    u1 = u1f * _TWO_M53
    u1 = u1 if u1 >= _U1_FLOOR else _U1_FLOOR
    b = _f64_bits(u1)
    e = float(np.int64((b >> _S52) & _EXP_MASK) - 1023)
    m = _bits_f64((b & _MANT_MASK) | _EXP_ONE)
    big = m > _SQRT2
    m = m * 0.5 if big else m
    e = e + 1.0 if big else e
    f = m - 1.0
    s = f / (m + 1.0)
    z = s * s
    p = _LC[10]
    p = _LC[9] + z * p
    p = _LC[8] + z * p
    p = _LC[7] + z * p
    p = _LC[6] + z * p
    p = _LC[5] + z * p
    p = _LC[4] + z * p
    p = _LC[3] + z * p
    p = _LC[2] + z * p
    p = _LC[1] + z * p
    p = _LC[0] + z * p
    t = 2.0 * s
    logm = t + t * (z * p)
    ln_u1 = e * _LN2_HI + (e * _LN2_LO + logm)
    return math.sqrt(-2.0 * ln_u1)


@nb.njit(inline="always")
def _cos_turn(u2f):
    """``cos(2 pi u2f / 2**53)`` for a 53-bit integer held as a float64 (as ``bits.cos_turn``)."""
    theta = _TWO_PI * (u2f * _TWO_M53)
    qf = np.floor(theta * _INV_PIO2 + 0.5)
    r1 = theta - qf * _PIO2_1
    t2 = qf * _PIO2_2
    x_hi = r1 - t2
    bb = x_hi - r1
    err = (r1 - (x_hi - bb)) + (-t2 - bb)
    x_lo = err - qf * _PIO2_2T
    z = x_hi * x_hi
    pc = _CC[8]
    pc = _CC[7] + z * pc
    pc = _CC[6] + z * pc
    pc = _CC[5] + z * pc
    pc = _CC[4] + z * pc
    pc = _CC[3] + z * pc
    pc = _CC[2] + z * pc
    pc = _CC[1] + z * pc
    pc = _CC[0] + z * pc
    ps = _SC[8]
    ps = _SC[7] + z * ps
    ps = _SC[6] + z * ps
    ps = _SC[5] + z * ps
    ps = _SC[4] + z * ps
    ps = _SC[3] + z * ps
    ps = _SC[2] + z * ps
    ps = _SC[1] + z * ps
    ps = _SC[0] + z * ps
    cos_x = 1.0 + (z * pc - x_hi * x_lo)
    sin_x = x_hi + (x_hi * (z * ps) + x_lo)
    # quadrant 0 or 4: cos, 1: -sin, 2: -cos, 3: sin (selects, so LLVM can vectorize)
    odd = (qf == 1.0) | (qf == 3.0)
    neg = (qf == 1.0) | (qf == 2.0)
    c = sin_x if odd else cos_x
    return -c if neg else c


@nb.njit(inline="always")
def _box_muller(k1, k2):
    return _sqrt_neg2log(float(k1)) * _cos_turn(float(k2))


@nb.njit(parallel=True, cache=True, error_model="numpy")
def gaussian_states(states, out):
    """``out[k] = gaussian(states[k])`` for already folded keys (1-D, float64)."""
    for k in nb.prange(states.shape[0]):
        h = states[k]
        k1 = _hash64(h ^ _HS1) >> _S11
        k2 = _hash64(h ^ _HS2) >> _S11
        out[k] = _box_muller(k1, k2)


# ----------------------------------------------------------------------------- n-d tiles
#
# The kernels below walk a C-ordered block flat, tile by tile, so that short rows (conv
# kernels: 3 elements) cost no per-row call, and split the work of each tile into simple
# loops (keys, then -2 ln u1 and its sqrt, then the cosine): each loop is short enough that
# the CPU overlaps many of its vectorized iterations, where one long loop body is bound by
# the latency of its Horner chains. Every element goes through the same IEEE operations as
# ``bits.gaussian``; only their scheduling changes.

TILE = 512
KIND_NORMAL, KIND_UNIFORM = 0, 1


@nb.njit(inline="always")
def _row_start(base, axis_h, offs, sizes, row, idx, pre):
    """Set ``idx`` to the leading-axes multi-index of flat ``row``; fill the prefix states
    ``pre``; return the row's folded state."""
    nd = sizes.shape[0]
    r = row
    for ax in range(nd - 2, -1, -1):
        idx[ax] = r % sizes[ax]
        r //= sizes[ax]
    h = base
    for ax in range(nd - 1):
        h = _hash64(h ^ axis_h[offs[ax] + idx[ax]])
        pre[ax] = h
    return h


@nb.njit(inline="always")
def _row_next(base, axis_h, offs, sizes, idx, pre):
    """Step ``idx`` to the next row (odometer) and return its state, refolding only the axes
    that changed."""
    nd = sizes.shape[0]
    ax = nd - 2
    while ax >= 0:
        idx[ax] += 1
        if idx[ax] < sizes[ax]:
            break
        idx[ax] = 0
        ax -= 1
    if ax < 0:  # past the last row (only after a block's last element): any state will do
        ax = 0
    h = pre[ax - 1] if ax > 0 else base
    for k in range(ax, nd - 1):
        h = _hash64(h ^ axis_h[offs[k] + idx[k]])
        pre[k] = h
    return h


@nb.njit(inline="always")
def _tile_states(axis_h, col0, m, cnt, rs, col, states, base, offs, sizes, idx, pre):
    """Element states of the next ``cnt`` elements; returns the updated (row state, column)."""
    t = 0
    while t < cnt:
        run = min(m - col, cnt - t)
        # through views indexed by range variables: provably in bounds and non-negative, so
        # LLVM emits plain vector loads/stores rather than gathers/scatters
        dst = states[t : t + run]
        src = axis_h[col0 + col : col0 + col + run]
        for j in range(run):
            dst[j] = rs ^ src[j]
        t += run
        col += run
        if col == m:
            col = 0
            rs = _row_next(base, axis_h, offs, sizes, idx, pre)
    return rs, col


GROUP_MAX = 64
"""A block whose last two axes hold at most this many elements (a conv kernel's 3x3) is
walked group by group (:func:`_tile_states_grouped`) rather than row by row."""


WORK = TILE + GROUP_MAX + 2
"""Length of the rows of a walk's work array (see :func:`_walk_start`)."""
_W_STATES, _W_ROW_OF, _W_COL_H, _W_GRP_OF, _W_SUB_H, _W_GRP_H, _W_ROW_H, _W_PRE = range(8)


@nb.njit(inline="always")
def _walk_buffers(nd):
    """A walk's work array (8 rows of :data:`WORK` uint64) and its odometer index."""
    return np.empty((8, WORK), np.uint64), np.zeros(max(nd - 1, 1), np.int64)


@nb.njit(inline="always")
def _tile_states_grouped(
    cnt,
    gh,
    s,
    states,
    grp_h,
    row_h,
    row_of,
    col_h,
    grp_of,
    sub_h,
    base,
    axis_h,
    offs,
    sizes,
    idx,
    pre,
):
    """:func:`_tile_states` for blocks whose last two axes are small (conv kernels).

    ``gh`` is the state of the current group (every axis but the last two folded) and ``s``
    the next element's offset in it. The states of the tile's groups come first (one
    odometer step each), then those of its rows and of its elements, each in one loop over
    index patterns that LLVM vectorizes, instead of a short loop and an odometer step per
    row of 3. Returns the updated ``(gh, s)``."""
    nd = sizes.shape[0]
    offs_g = offs[: nd - 1]
    sizes_g = sizes[: nd - 1]
    m = sizes[nd - 1]
    size = m * sizes[nd - 2]
    end = s + cnt
    ng = (end - 1) // size + 1
    grp_h[0] = gh
    for k in range(1, ng):
        grp_h[k] = _row_next(base, axis_h, offs_g, sizes_g, idx, pre)
    for r in range(s // m, (end - 1) // m + 1):
        row_h[r] = _hash64(grp_h[grp_of[r]] ^ sub_h[r])
    ro = row_of[s:end]
    ch = col_h[s:end]
    for t in range(cnt):
        states[t] = row_h[ro[t]] ^ ch[t]
    gi = end // size
    if gi == ng:
        return _row_next(base, axis_h, offs_g, sizes_g, idx, pre), 0
    return grp_h[gi], end - gi * size


@nb.njit(inline="always")
def _walk_start(e, base, axis_h, offs, sizes, work, idx):
    """Start a walk of the block at flat element ``e``: ``(grouped, state, offset)``.

    Grouped (the last two axes hold at most ``GROUP_MAX`` elements): ``state`` is the
    group's state and ``offset`` the element's offset in it, and ``work`` gets the index
    patterns of the grouped walk: for the ``j``-th element after a group's start its row and
    its column's hash, for the ``r``-th row its group and the hash of its coordinate on the
    second-to-last axis. Otherwise ``state`` and ``offset`` are the row's state and the
    column."""
    nd = sizes.shape[0]
    grouped = nd >= 3 and sizes[nd - 1] * sizes[nd - 2] <= GROUP_MAX
    m = sizes[nd - 1]
    size = m
    if grouped:
        m2 = sizes[nd - 2]
        size = m * m2
        for j in range(TILE + size):
            r = j // m
            work[_W_ROW_OF, j] = r
            work[_W_COL_H, j] = axis_h[offs[nd - 1] + j - r * m]
        for r in range((TILE + size) // m + 2):
            g = r // m2
            work[_W_GRP_OF, r] = g
            work[_W_SUB_H, r] = axis_h[offs[nd - 2] + r - g * m2]
    at = e // size
    ax = nd - 1 if grouped else nd
    state = _row_start(base, axis_h, offs[:ax], sizes[:ax], at, idx, work[_W_PRE])
    return grouped, state, e - at * size


@nb.njit(inline="always")
def _walk_tile(grouped, work, idx, cnt, state, at, base, axis_h, offs, sizes):
    """The states of the next ``cnt`` elements into ``work[_W_STATES]``; returns the new
    ``(state, offset)``."""
    states = work[_W_STATES]
    pre = work[_W_PRE]
    if grouped:
        return _tile_states_grouped(
            cnt,
            state,
            at,
            states,
            work[_W_GRP_H],
            work[_W_ROW_H],
            work[_W_ROW_OF],
            work[_W_COL_H],
            work[_W_GRP_OF],
            work[_W_SUB_H],
            base,
            axis_h,
            offs,
            sizes,
            idx,
            pre,
        )
    nd = sizes.shape[0]
    return _tile_states(
        axis_h, offs[nd - 1], sizes[nd - 1], cnt, state, at, states, base, offs, sizes, idx, pre
    )


@nb.njit(inline="always")
def _tile_values(kind, cnt, states, a, b, p0, p1):
    """float64 values of a tile from its states into ``a``: ``p0 * gaussian`` (normal; ``p1``
    unused) or ``p0 + p1 * u01`` (uniform)."""
    if kind == KIND_NORMAL:
        for t in range(cnt):
            h = _hash64(states[t])
            a[t] = float(_hash64(h ^ _HS1) >> _S11)
            b[t] = float(_hash64(h ^ _HS2) >> _S11)
        for t in range(cnt):
            a[t] = _sqrt_neg2log(a[t])
        for t in range(cnt):
            a[t] = (a[t] * _cos_turn(b[t])) * p0
    else:
        for t in range(cnt):
            k = _hash64(_hash64(states[t]) ^ _HSU) >> _S11
            a[t] = p0 + p1 * (float(k) * _TWO_M53)


@nb.njit(inline="always")
def _part_start(e, base, axis_h, offs, sizes):
    """A parallel part's value buffers and its walk from flat element ``e`` (see
    :func:`_walk_start`)."""
    a = np.empty(TILE, np.float64)
    b = np.empty(TILE, np.float64)
    work, idx = _walk_buffers(sizes.shape[0])
    grouped, rs, col = _walk_start(e, base, axis_h, offs, sizes, work, idx)
    return a, b, work, idx, grouped, rs, col


@nb.njit(inline="always")
def _draw_tile(kind, p0, p1, cnt, a, b, grouped, work, idx, rs, col, base, axis_h, offs, sizes):
    """The float64 values of the next ``cnt`` elements of a walk into ``a``; returns the
    walk's new ``(state, offset)``."""
    rs, col = _walk_tile(grouped, work, idx, cnt, rs, col, base, axis_h, offs, sizes)
    _tile_values(kind, cnt, work[_W_STATES], a, b, p0, p1)
    return rs, col


@nb.njit(inline="always")
def _draw_parts(kind, base, axis_h, offs, sizes, p0, p1, out, n_parts):
    n = out.shape[0]
    part = (n + n_parts - 1) // n_parts
    for p in nb.prange(n_parts):
        _prefer_wide_vectors()
        e = p * part
        e1 = min(n, e + part)
        if e >= e1:
            continue
        a, b, work, idx, grouped, rs, col = _part_start(e, base, axis_h, offs, sizes)
        while e < e1:
            cnt = min(TILE, e1 - e)
            rs, col = _draw_tile(
                kind, p0, p1, cnt, a, b, grouped, work, idx, rs, col, base, axis_h, offs, sizes
            )
            dst = out[e : e + cnt]
            for t in range(cnt):
                dst[t] = a[t]
            e += cnt


@nb.njit(parallel=True, cache=True, error_model="numpy")
def gaussian_grid(base, axis_h, offs, sizes, scale, out, n_parts):
    """``scale * gaussian`` over a C-ordered coordinate grid, into the flat ``out``.

    ``base`` is ``fold(seed, layer_id)``; ``axis_h[offs[k] + i]`` is ``hash64`` of the grid's
    i-th coordinate on axis k and ``sizes[k]`` that axis' length. ``out`` is float32 or
    float64 (the cast rounds to nearest); the work is split into ``n_parts`` parallel items.
    """
    _draw_parts(KIND_NORMAL, base, axis_h, offs, sizes, scale, 0.0, out, n_parts)


@nb.njit(parallel=True, cache=True, error_model="numpy")
def uniform_grid(base, axis_h, offs, sizes, low, width, out, n_parts):
    """``low + width * u01`` (the uniform schemes' draw) over a grid, as :func:`gaussian_grid`."""
    _draw_parts(KIND_UNIFORM, base, axis_h, offs, sizes, low, width, out, n_parts)


@nb.njit(parallel=True, cache=True, error_model="numpy")
def delta_grid(
    kind,
    base,
    axis_h,
    offs,
    sizes,
    p0,
    p1,
    w,
    w0_like,
    thresholds,
    edges,
    ne,
    bin_of_exp,
    steps,
    n_parts,
):
    """Summarize ``|w - w0|`` over a flat C-ordered block without materializing ``w0``.

    ``w0`` is drawn as in :func:`gaussian_grid` / :func:`uniform_grid` and rounded to
    ``w0_like``'s dtype (``w``'s); the delta is taken in float64. Returns per-part
    ``(counts, sums, changed, hist)``: counts ``[nan, zeros]``, sums ``[sum, max]`` of the non-NaN deltas, ``changed[k]`` the number of
    ``not (delta <= thresholds[k])``, and ``hist`` np.histogram's counts of the deltas > 0
    over the first ``ne`` entries of ``edges`` (last bin closed), which are followed by
    ``steps`` entries of +inf. ``bin_of_exp[e]`` is the bin holding the smallest positive
    double of biased exponent ``e`` (-1 below the first edge), and ``steps`` the most edges
    one binary exponent's range holds: each delta's bin is found in exactly ``steps``
    branch-free steps up from there, so it stays exact for any increasing edges (the +inf
    padding keeps the steps in bounds; deltas at or above the last edge, and NaN, are
    counted apart).
    """
    n = w.shape[0]
    nt = thresholds.shape[0]
    last = edges[ne - 1]
    part = (n + n_parts - 1) // n_parts
    counts = np.zeros((n_parts, 2), np.int64)
    sums = np.zeros((n_parts, 2), np.float64)
    changed = np.zeros((n_parts, max(nt, 1)), np.int64)
    hist = np.zeros((n_parts, ne - 1), np.int64)
    for p in nb.prange(n_parts):
        _prefer_wide_vectors()
        e = p * part
        e1 = min(n, e + part)
        if e >= e1:
            continue
        a, b, work, idx, grouped, rs, col = _part_start(e, base, axis_h, offs, sizes)
        w0 = np.empty(TILE, w0_like.dtype)
        acc = np.zeros(8, np.float64)
        slot = np.empty(TILE, np.int64)
        # local[:, j + 1]: bin j; local[:, 0]: not binned. Four copies, so that runs of one
        # bin do not chain their increments through memory
        local = np.zeros((4, ne), np.int64)
        mx = 0.0
        nan = 0
        zeros = 0
        at_last = 0
        while e < e1:
            cnt = min(TILE, e1 - e)
            rs, col = _draw_tile(
                kind, p0, p1, cnt, a, b, grouped, work, idx, rs, col, base, axis_h, offs, sizes
            )
            for t in range(cnt):
                w0[t] = a[t]  # round to the weights' dtype
            wt = w[e : e + cnt]
            for t in range(cnt):
                a[t] = abs(np.float64(wt[t]) - np.float64(w0[t]))
            for k in range(nt):
                thr = thresholds[k]
                c = 0
                for t in range(cnt):
                    c += not (a[t] <= thr)
                changed[p, k] += c
            k = 0  # the deltas to bin, packed (no branch): > 0 and below the last edge
            for t in range(cnt):
                d = a[t]
                b[k] = d
                k += (d < last) & (d != 0.0)
            for t in range(k):  # their bins, in a fixed number of steps (no branch)
                d = b[t]
                j = bin_of_exp[_f64_bits(d) >> _S52]
                for _ in range(steps):
                    j += d >= edges[j + 1]
                slot[t] = j
            for t in range(cnt):  # NaN, zeros, at the last edge, sum and max (vectorized)
                d = a[t]
                nan += d != d
                zeros += d == 0.0
                at_last += d == last
                acc[t & 7] += d if d == d else 0.0
                mx = d if d > mx else mx
            for t in range(k):
                local[t & 3, slot[t] + 1] += 1
            e += cnt
        for r in range(4):
            hist[p, :] += local[r, 1:]
        hist[p, ne - 2] += at_last  # the last bin is closed
        counts[p, 0] = nan
        counts[p, 1] = zeros
        s = 0.0
        for k in range(8):
            s += acc[k]
        sums[p, 0] = s
        sums[p, 1] = mx
    return counts, sums, changed, hist


@nb.njit(cache=True, error_model="numpy")
def hash_all(x, out):
    """``out[k] = hash64(x[k])`` (uint64)."""
    for k in range(x.shape[0]):
        out[k] = _hash64(x[k])
