"""What the fused loops share: float32/bfloat16 conversions, NaN/Inf counts and the TIES combine steps.

The loops (:mod:`.ties_loops`, :mod:`.dare_loops`) repeat the torch code's arithmetic exactly,
so their results are bitwise the methods' own:

- in float32 (the working dtype of half-precision and float32 inputs), one operation at a
  time, in the same order over the models; no fast-math, so nothing is reassociated;
- ``torch.add(x, y, alpha=w)`` is a fused multiply-add on CPUs with FMA (torch's vector
  code is ``fmadd(y, w, x)``): :func:`~.fused.torch_fuses_alpha` asks torch once, and the loops
  fuse (``llvm.fma``) exactly when it does;
- float32 -> bfloat16 rounds to nearest even, as torch does.

Only numba code lives here. numba checks a cached loop against the file that defines it, not
against what it inlines from here: the loops are built in a closure over :data:`DIGEST` (the
hash of this file), which numba's cache key includes, so an edit here recompiles them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_MAX_FINITE = np.float32(np.finfo(np.float32).max)
_MINUS_INF = np.float32(-np.inf)
_PLUS_INF = np.float32(np.inf)
BF16_NAN = np.uint16(0xFFFF)  # what torch's vectorized conversion writes for a NaN

@intrinsic
def _fma(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """``a * b + c`` rounded once (``llvm.fma``; a libm call where the CPU has no FMA)."""
    signature = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        f32 = ir.FloatType()
        fma = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fma, args)

    return signature, codegen


@intrinsic
def _float_from_bits(typingctx, bits):  # type: ignore[no-untyped-def]
    signature = types.float32(types.uint32)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.FloatType())

    return signature, codegen


@intrinsic
def _bits_from_float(typingctx, value):  # type: ignore[no-untyped-def]
    signature = types.uint32(types.float32)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))

    return signature, codegen



def _widen(value):  # type: ignore[no-untyped-def]
    """One stored entry as float32 (bfloat16 bits are the upper half of a float32's)."""


@overload(_widen)
def _widen_impl(value):  # type: ignore[no-untyped-def]
    if value == types.uint16:
        return lambda value: _float_from_bits(np.uint32(value) << np.uint32(16))
    if value == types.float32:
        return lambda value: value
    return None


def _store(out, i, value):  # type: ignore[no-untyped-def]
    """``out[i] = value`` in ``out``'s dtype (bfloat16 bits rounded to nearest even, or float32).

    Returns 1 if what was stored is a NaN or Inf, else 0.
    """


@overload(_store)
def _store_impl(out, i, value):  # type: ignore[no-untyped-def]
    if out.dtype == types.uint16:
        def store_bf16(out, i, value):  # type: ignore[no-untyped-def]
            bits = bf16_bits(value)
            out[i] = bits
            return np.int32((bits & np.uint16(0x7F80)) == np.uint16(0x7F80))
        return store_bf16
    if out.dtype == types.float32:
        def store_f32(out, i, value):  # type: ignore[no-untyped-def]
            out[i] = value
            return _non_finite(value)
        return store_f32
    return None


@njit(inline="always", error_model="numpy")
def bf16_bits(value):  # type: ignore[no-untyped-def]
    """float32 -> bfloat16 bits, round to nearest even (overflow gives Inf), as torch rounds."""
    if value != value:
        return BF16_NAN
    bits = _bits_from_float(value)
    bias = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    return np.uint16((bits + bias) >> np.uint32(16))


@njit(cache=True, nogil=True, error_model="numpy")
def to_bf16_bits(values, out):  # type: ignore[no-untyped-def]
    """float32 array -> bfloat16 bits (for tests of the rounding)."""
    for i in range(values.shape[0]):
        out[i] = bf16_bits(values[i])


@njit(inline="always", error_model="numpy")
def _non_finite(value):  # type: ignore[no-untyped-def]
    """1 for a NaN or Inf, else 0: counted rather than and-ed, so that loops vectorize.

    Counts are int32, kept so by truncating every sum (numba widens integer sums to int64, and
    int64 lanes would halve the vector width of the float32 loops); a chunk holds far fewer
    than 2**31 entries.
    """
    return np.int32(not abs(value) <= _MAX_FINITE)


@njit(inline="always", error_model="numpy")
def _sign(value):  # type: ignore[no-untyped-def]
    return np.float32(value > _ZERO) - np.float32(value < _ZERO)  # no branches: signs are coin flips



@njit(inline="always", error_model="numpy")
def _elect_step(total, delta, k, weight, weighted_election, fused):  # type: ignore[no-untyped-def]
    """Add model k's task vector to the sign election's sum (``elect_sign``)."""
    if weighted_election:  # mergekit: sum_k w_k delta_k from 0
        return _fma(delta, weight, total) if fused else total + delta * weight
    return delta if k == 0 else total + delta  # paper: delta_0 + delta_1 + ...


@njit(inline="always", error_model="numpy")
def _elected(total, weighted_election):  # type: ignore[no-untyped-def]
    if weighted_election:
        return _ONE if total >= _ZERO else -_ONE  # + on a tie
    return _sign(total)


@njit(inline="always", error_model="numpy")
def _merge_step(numerator, denominator, delta, elected, weight, fused):  # type: ignore[no-untyped-def]
    """Add a task vector to the disjoint mean's sums if it agrees with the elected sign (``disjoint_merge``)."""
    agree = np.float32(_sign(delta) == elected)
    kept = delta * agree
    numerator = _fma(kept, weight, numerator) if fused else numerator + kept * weight
    return numerator, denominator + weight * agree  # + w or + 0.0, as torch's add of the 0/1 mask


@njit(inline="always", error_model="numpy")
def _finish(numerator, denominator, base, normalize, scale, lambda_):  # type: ignore[no-untyped-def]
    """``base + lambda * mean``, the division as torch's: a zero divisor becomes 1."""
    if normalize:
        numerator = numerator / (denominator + np.float32(denominator == _ZERO))
    if scale:
        numerator = numerator * lambda_
    return numerator + base

