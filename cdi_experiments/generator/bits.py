"""The bit-level contract of the generator, as a pure-Python reference.

Everything here is the *definition*: the vectorized backends (numpy, numba, torch) must
reproduce these functions bit for bit. All integer arithmetic is modulo 2**64.

Hash (SplitMix64 finalizer, Steele et al. 2014, https://doi.org/10.1145/2714064.2660195)::

    hash64(x): x += 0x9E3779B97F4A7C15
               x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
               x = (x ^ (x >> 27)) * 0x94D049BB133111EB
               x ^= x >> 31

Key derivation: ``state(seed, i0, ..., ik) = fold(h -> hash64(h ^ hash64(i)))`` starting at
``h = seed``; ``u01(seed, *idx) = (state >> 11) / 2**53`` in [0, 1).

Gaussian (Box-Muller, first output only)::

    u1 = max(u01(*idx, 0), 1e-12);  u2 = u01(*idx, 1)
    gaussian = sqrt(-2 ln u1) * cos(2*pi*u2)

The float part uses no library transcendental: ``ln`` and ``cos`` are evaluated below with
IEEE-754 ``+ - * /`` and ``sqrt`` only (each correctly rounded, never fused), plus exact bit
manipulation and ``floor``. Library ``log``/``cos`` differ between libm, numpy's SIMD paths,
ATen's vectorized kernels and CUDA in the last bit; these do not, so the same coordinates give
the same float64 on every machine and backend. Against libm they agree within a few ulp.

``theta = fl(fl(2*pi) * u2)`` is rounded exactly as ``2.0 * math.pi * u2`` is in the original
tool, and ``cos(theta)`` is then evaluated for that double, so values track the original even
near the zeros of the cosine.
"""

from __future__ import annotations

import math
import struct

GENERATOR_VERSION = 1
"""Bumped on any change to the bits produced. Stored with every run and checkpoint."""

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB

TWO_M53 = 2.0**-53
U1_FLOOR = 1e-12

# Selectors appended to a weight's coordinates: Box-Muller's two uniforms, and the uniform
# schemes' draw (a third, independent stream of the same coordinates).
SEL_U1, SEL_U2, SEL_UNIFORM = 0, 1, 2

# ln(m) = 2 atanh(s), s = (m - 1) / (m + 1), m in [sqrt(1/2), sqrt(2)]: |s| <= 0.1716,
# so 11 terms of 1/(2k+1) z^k (z = s^2) leave a remainder below 1e-19.
LOG_COEF = tuple(
    float.fromhex(h)
    for h in (
        "0x1.5555555555555p-2",
        "0x1.999999999999ap-3",
        "0x1.2492492492492p-3",
        "0x1.c71c71c71c71cp-4",
        "0x1.745d1745d1746p-4",
        "0x1.3b13b13b13b14p-4",
        "0x1.1111111111111p-4",
        "0x1.e1e1e1e1e1e1ep-5",
        "0x1.af286bca1af28p-5",
        "0x1.8618618618618p-5",
        "0x1.642c8590b2164p-5",
    )
)
# Taylor coefficients (-1)^n/(2n)! and (-1)^n/(2n+1)!, n = 1..9, for |x| <= pi/4 (+ slack).
COS_COEF = tuple(
    float.fromhex(h)
    for h in (
        "-0x1.0000000000000p-1",
        "0x1.5555555555555p-5",
        "-0x1.6c16c16c16c17p-10",
        "0x1.a01a01a01a01ap-16",
        "-0x1.27e4fb7789f5cp-22",
        "0x1.1eed8eff8d898p-29",
        "-0x1.93974a8c07c9dp-37",
        "0x1.ae7f3e733b81fp-45",
        "-0x1.6827863b97d97p-53",
    )
)
SIN_COEF = tuple(
    float.fromhex(h)
    for h in (
        "-0x1.5555555555555p-3",
        "0x1.1111111111111p-7",
        "-0x1.a01a01a01a01ap-13",
        "0x1.71de3a556c734p-19",
        "-0x1.ae64567f544e4p-26",
        "0x1.6124613a86d09p-33",
        "-0x1.ae7f3e733b81fp-41",
        "0x1.952c77030ad4ap-49",
        "-0x1.2f49b46814157p-57",
    )
)
SQRT2 = float.fromhex("0x1.6a09e667f3bcdp+0")
# ln 2 split so that e * LN2_HI is exact for |e| < 2**11 (fdlibm's split).
LN2_HI = float.fromhex("0x1.62e42fee00000p-1")
LN2_LO = float.fromhex("0x1.a39ef35793c76p-33")
TWO_PI = float.fromhex("0x1.921fb54442d18p+2")  # == 2.0 * math.pi
INV_PIO2 = float.fromhex("0x1.45f306dc9c883p-1")  # 2/pi
# pi/2 = PIO2_1 + PIO2_2 + PIO2_2T; the first two have 33 significant bits, so q * PIO2_k
# is exact for the quadrant numbers q <= 4 used here.
PIO2_1 = float.fromhex("0x1.921fb54400000p+0")
PIO2_2 = float.fromhex("0x1.0b4611a600000p-34")
PIO2_2T = float.fromhex("0x1.3198a2e037073p-69")

EXP_MASK = 0x7FF
MANT_MASK = (1 << 52) - 1
EXP_ONE = 1023 << 52

HASH_SEL_U1 = None  # filled below (hash64 of the selectors, used by every backend)
HASH_SEL_U2 = None
HASH_SEL_UNIFORM = None


def hash64(x: int) -> int:
    """SplitMix64 finalizer of a 64-bit unsigned integer."""
    x = (x + GOLDEN) & MASK64
    x = ((x ^ (x >> 30)) * MIX1) & MASK64
    x = ((x ^ (x >> 27)) * MIX2) & MASK64
    return x ^ (x >> 31)


HASH_SEL_U1 = hash64(SEL_U1)
HASH_SEL_U2 = hash64(SEL_U2)
HASH_SEL_UNIFORM = hash64(SEL_UNIFORM)


def fold(h: int, *indices: int) -> int:
    """Fold coordinates into a key: ``h <- hash64(h ^ hash64(i))`` for each index."""
    for i in indices:
        h = hash64(h ^ hash64(i))
    return h


def _f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _bits_f64(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", b))[0]


def neg2log(k1: int) -> float:
    """``-2 ln(max(k1 / 2**53, 1e-12))`` for a 53-bit integer ``k1``, libm-free."""
    u1 = k1 * TWO_M53
    if u1 < U1_FLOOR:
        u1 = U1_FLOOR
    b = _f64_bits(u1)
    e = float(((b >> 52) & EXP_MASK) - 1023)
    m = _bits_f64((b & MANT_MASK) | EXP_ONE)  # u1 = m * 2**e, m in [1, 2)
    if m > SQRT2:
        m = m * 0.5
        e = e + 1.0
    f = m - 1.0  # exact (Sterbenz)
    s = f / (m + 1.0)
    z = s * s
    p = LOG_COEF[10]
    for c in LOG_COEF[9::-1]:
        p = c + z * p
    t = 2.0 * s
    logm = t + t * (z * p)
    ln_u1 = e * LN2_HI + (e * LN2_LO + logm)
    return -2.0 * ln_u1


def cos_turn(k2: int) -> float:
    """``cos(fl(2*pi * k2 / 2**53))`` for a 53-bit integer ``k2``, libm-free."""
    theta = TWO_PI * (k2 * TWO_M53)
    q = math.floor(theta * INV_PIO2 + 0.5)  # quadrant 0..4
    qf = float(q)
    r1 = theta - qf * PIO2_1  # exact
    t = qf * PIO2_2  # exact
    # TwoSum (Knuth): x_hi + x_lo == r1 - t exactly.
    x_hi = r1 - t
    bb = x_hi - r1
    err = (r1 - (x_hi - bb)) + (-t - bb)
    x_lo = err - qf * PIO2_2T
    z = x_hi * x_hi
    pc = COS_COEF[8]
    for c in COS_COEF[7::-1]:
        pc = c + z * pc
    ps = SIN_COEF[8]
    for c in SIN_COEF[7::-1]:
        ps = c + z * ps
    cos_x = 1.0 + (z * pc - x_hi * x_lo)
    sin_x = x_hi + (x_hi * (z * ps) + x_lo)
    quadrant = q & 3
    if quadrant == 0:
        return cos_x
    if quadrant == 1:
        return -sin_x
    if quadrant == 2:
        return -cos_x
    return sin_x


def box_muller(k1: int, k2: int) -> float:
    """Standard normal from two 53-bit integers (the float part of the contract)."""
    return math.sqrt(neg2log(k1)) * cos_turn(k2)


def u01(seed: int, *indices: int) -> float:
    """Uniform in [0, 1) addressed by ``indices`` (reference scalar path)."""
    return (fold(seed, *indices) >> 11) * TWO_M53


def gaussian(seed: int, *indices: int) -> float:
    """Standard normal addressed by ``indices`` (reference scalar path)."""
    h = fold(seed, *indices)
    k1 = hash64(h ^ HASH_SEL_U1) >> 11
    k2 = hash64(h ^ HASH_SEL_U2) >> 11
    return box_muller(k1, k2)


def gaussian_libm(seed: int, *indices: int) -> float:
    """The original tool's formula with the platform's libm (for accuracy comparisons only)."""
    u1 = max(u01(seed, *indices, SEL_U1), U1_FLOOR)
    u2 = u01(seed, *indices, SEL_U2)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
