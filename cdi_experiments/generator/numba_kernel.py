"""Compiled (numba) kernel for the CPU hot path: the last coordinate's fold, both selector
hashes and the Box-Muller float part fused into one pass over the output.

Bit-identical to :mod:`cdi_experiments.generator.bits` (the tests check it on millions of
coordinates): numba compiles without fast-math, so LLVM neither fuses multiply-adds nor
reassociates, and ``sqrt`` lowers to the correctly rounded instruction.
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


@nb.njit(inline="always")
def _hash64(x):
    x = x + _GOLDEN
    x = (x ^ (x >> _S30)) * _MIX1
    x = (x ^ (x >> _S27)) * _MIX2
    return x ^ (x >> _S31)


@nb.njit(inline="always")
def _box_muller(k1, k2):
    # -2 ln u1 (same operations, same order, as bits.neg2log)
    u1 = float(k1) * _TWO_M53
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
    r = math.sqrt(-2.0 * ln_u1)
    # cos(2 pi u2) (as bits.cos_turn)
    theta = _TWO_PI * (float(k2) * _TWO_M53)
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
    c = -c if neg else c
    return r * c


@nb.njit(parallel=True, cache=True)
def gaussian_grid(row_states, col_hashes, scale, out):
    """``out[i, j] = scale * gaussian(state = hash64(row_states[i] ^ col_hashes[j]))``.

    ``row_states`` are the folded keys of every coordinate but the last; ``col_hashes`` are
    ``hash64`` of the last coordinate. ``out`` is float32 or float64 (cast rounds to nearest).
    """
    n, m = out.shape
    for i in nb.prange(n):
        r = row_states[i]
        for j in range(m):
            h = _hash64(r ^ col_hashes[j])
            k1 = _hash64(h ^ _HS1) >> _S11
            k2 = _hash64(h ^ _HS2) >> _S11
            out[i, j] = _box_muller(k1, k2) * scale


@nb.njit(parallel=True, cache=True)
def gaussian_states(states, out):
    """``out[k] = gaussian(states[k])`` for already folded keys (1-D, float64)."""
    for k in nb.prange(states.shape[0]):
        h = states[k]
        k1 = _hash64(h ^ _HS1) >> _S11
        k2 = _hash64(h ^ _HS2) >> _S11
        out[k] = _box_muller(k1, k2)
