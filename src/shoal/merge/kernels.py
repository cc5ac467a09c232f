"""Fused per-chunk loops for TIES and DARE-TIES, compiled with numba (the optional ``fast`` extra).

The streamed executor's torch code runs each step of a merge (task vectors, magnitudes,
trim masks, sign election, disjoint mean, conversion) as a separate pass over a chunk, and
the boolean masks between them cost more than the arithmetic. These loops do every step
for one entry before moving to the next. They repeat the torch code's arithmetic exactly,
so the results are bitwise the same:

- in float32 (the working dtype of half-precision and float32 inputs), one operation at a
  time, in the same order over the models; no fast-math, so nothing is reassociated;
- ``torch.add(x, y, alpha=w)`` is a fused multiply-add on CPUs with FMA (torch's vector
  code is ``fmadd(y, w, x)``): :func:`~.fused.torch_fuses_alpha` asks torch once, and the loops
  fuse (``llvm.fma``) exactly when it does;
- float32 -> bfloat16 rounds to nearest even, as torch does.

Inputs are numpy views of the chunks: bfloat16 as its ``uint16`` bits, float32 as itself
(the caller widens other dtypes to float32 first, as the methods do). Each loop also says
whether a source held a NaN or Inf and whether the result did, so the caller can raise the
errors the torch path raises. ``nogil``: the executor's worker threads run them side by side.
:mod:`~.fused` calls them on torch chunks.

Only numba code lives here: numba's cache of a compiled loop is checked against this file
alone, so what the loops inline must not come from another module.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_MAX_FINITE = np.float32(np.finfo(np.float32).max)
_MINUS_INF = np.float32(-np.inf)
_PLUS_INF = np.float32(np.inf)
BF16_NAN = np.uint16(0xFFFF)  # what torch's vectorized conversion writes for a NaN

KEEP_ALL, DROP_ALL = np.float32(-1.0), np.float32(np.inf)  # thresholds of :func:`ties_merge` that keep all, none


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


_LANES = 16  # float32 lanes of an AVX-512 vector


def _host_has_avx512() -> bool:
    from llvmlite import binding

    return bool(binding.get_host_cpu_features().get("avx512f", False))


# numba compiles for this CPU (and its cache is per CPU): without AVX-512, LLVM would emulate
# the compressing store lane by lane, slower than the plain loop
_COMPRESS = _host_has_avx512()


@intrinsic
def _compress_inside(typingctx, values, start, out, size, bottom, top):  # type: ignore[no-untyped-def]
    """Store those of ``values[start:start + 16]`` in [``bottom``, ``top``] at ``out[size:]``, in order; how many.

    ``llvm.masked.compressstore``: ``vcompressps`` on AVX-512. NaN is in no bracket.
    """
    signature = types.int64(values, start, out, size, bottom, top)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        f32, i32 = ir.FloatType(), ir.IntType(32)
        vector = ir.VectorType(f32, _LANES)
        source = context.make_array(sig.args[0])(context, builder, args[0]).data
        target = context.make_array(sig.args[2])(context, builder, args[2]).data
        loaded = builder.load(builder.bitcast(builder.gep(source, [args[1]]), vector.as_pointer()), align=4)
        undefined, lane0 = ir.Constant(vector, ir.Undefined), ir.Constant(i32, 0)
        spread = ir.Constant(ir.VectorType(i32, _LANES), [0] * _LANES)
        low = builder.shuffle_vector(builder.insert_element(undefined, args[4], lane0), undefined, spread)
        high = builder.shuffle_vector(builder.insert_element(undefined, args[5], lane0), undefined, spread)
        mask = builder.and_(builder.fcmp_ordered(">=", loaded, low), builder.fcmp_ordered("<=", loaded, high))
        store = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [vector, f32.as_pointer(), mask.type]),
            f"llvm.masked.compressstore.v{_LANES}f32")
        builder.call(store, [loaded, builder.gep(target, [args[3]]), mask])
        bits = ir.IntType(_LANES)
        popcount = cgutils.get_or_insert_function(builder.module, ir.FunctionType(bits, [bits]),
                                                  f"llvm.ctpop.i{_LANES}")
        return builder.zext(builder.call(popcount, [builder.bitcast(mask, bits)]), ir.IntType(64))

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
    int64 lanes would halve the vector width of the float32 loops: the TIES merge took 1.9x
    as long); a chunk holds far fewer than 2**31 entries.
    """
    return np.int32(not abs(value) <= _MAX_FINITE)


@njit(inline="always", error_model="numpy")
def _sign(value):  # type: ignore[no-untyped-def]
    return np.float32(value > _ZERO) - np.float32(value < _ZERO)  # no branches: signs are coin flips


@njit(cache=True, nogil=True, error_model="numpy")
def ties_scan(base, model, lo, hi, has_lo, has_hi, work):  # type: ignore[no-untyped-def]
    """|model - base| against a bracket: (count above ``hi``, distinct values in it, their counts, sources finite).

    What ``KthLargest.scan`` returns for the magnitudes of one chunk's task vector; a
    missing bound (``has_lo``/``has_hi`` false) leaves that side open. ``work`` is a
    (2, >= n) float32 array the caller keeps (:func:`scratch`; a fresh one each call would be page faults).
    """
    n = base.shape[0]
    magnitudes, inside = work[0, :n], work[1, :n]
    above = np.int32(0)
    non_finite = np.int32(0)
    top = hi if has_hi else _PLUS_INF
    for i in range(n):  # branch-free counts: this loop vectorizes
        b = _widen(base[i])
        m = _widen(model[i])
        non_finite = np.int32(non_finite + _non_finite(b) + _non_finite(m))
        magnitudes[i] = abs(m - b)
        above = np.int32(above + np.int32(magnitudes[i] > top))
    bottom = lo if has_lo else _MINUS_INF
    size = 0
    done = 0
    if _COMPRESS:  # AVX-512: the values inside the bracket of 16 at a time, stored side by side in one instruction
        while done + _LANES <= n:
            size += _compress_inside(magnitudes, done, inside, size, bottom, top)
            done += _LANES
    for i in range(done, n):  # every value is stored, the next one overwrites those outside: no branch to mispredict
        inside[size] = magnitudes[i]
        size += np.int64((magnitudes[i] >= bottom) & (magnitudes[i] <= top))
    # magnitudes are >= +0.0, where the order of float32 bit patterns is the order of the values
    ordered = _sort_bits(inside[:size].view(np.uint32), magnitudes[:size].view(np.uint32)).view(np.float32)
    distinct = np.empty(size, np.float32)
    counts = np.empty(size, np.int64)
    runs = 0
    for i in range(size):
        if runs > 0 and ordered[i] == distinct[runs - 1]:
            counts[runs - 1] += 1
        else:
            distinct[runs] = ordered[i]
            counts[runs] = 1
            runs += 1
    return above, distinct[:runs].copy(), counts[:runs].copy(), non_finite == 0


_RADIX_BITS = 11
_RADIX_SIZE = 1 << _RADIX_BITS


@njit(nogil=True, error_model="numpy")
def _sort_bits(values, spare):  # type: ignore[no-untyped-def]
    """``values`` sorted (a radix sort, in ``values`` or ``spare``, an array of the same length; returns which).

    Least significant digit first, 11 bits a pass, on the offsets from the smallest value: a
    narrow bracket takes one or two passes, each two reads of the values (tens of times
    faster than a comparison sort of the thousands of values inside a chunk's bracket).
    """
    size = values.shape[0]
    if size < 64:
        values[:] = np.sort(values)
        return values
    low, high = values[0], values[0]
    for i in range(size):
        low = min(low, values[i])
        high = max(high, values[i])
    counts = np.empty(_RADIX_SIZE, np.int64)
    source, target = values, spare
    shift = np.uint32(0)
    while shift < np.uint32(32) and ((high - low) >> shift) != np.uint32(0):
        counts[:] = 0
        for i in range(size):
            counts[((source[i] - low) >> shift) & np.uint32(_RADIX_SIZE - 1)] += 1
        total = 0
        for digit in range(_RADIX_SIZE):
            total, counts[digit] = total + counts[digit], total
        for i in range(size):
            digit = ((source[i] - low) >> shift) & np.uint32(_RADIX_SIZE - 1)
            target[counts[digit]] = source[i]
            counts[digit] += 1
        source, target = target, source
        shift += np.uint32(_RADIX_BITS)
    return source


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


@njit(inline="always", error_model="numpy")
def _tie_limit(base, model, threshold, count):  # type: ignore[no-untyped-def]
    """The index just past the ``count``-th entry with |model - base| == ``threshold`` (the length if fewer)."""
    seen = 0
    for i in range(base.shape[0]):
        if abs(_widen(model[i]) - _widen(base[i])) == threshold:
            seen += 1
            if seen == count:
                return i + 1
    return base.shape[0]


@njit(cache=True, nogil=True, error_model="numpy")
def ties_merge(base, models, out, thresholds, ties_left, weights,  # type: ignore[no-untyped-def]
               weighted_election, normalize, scale, lambda_, fused):
    """TIES for one chunk into ``out``: (sources finite, result finite).

    ``models`` is a tuple of the models' chunks. Model k's task vector keeps the entries
    with magnitude above ``thresholds[k]`` and, of those equal to it, the first
    ``ties_left[k]`` in flat order (all of them when negative). A threshold of -1 keeps
    all entries, +Inf none.

    The task vectors are computed twice per entry (for the election, then for the mean)
    rather than kept in an array: in registers, that is cheaper than a store and a load.
    """
    count, n = len(models), base.shape[0]  # count is part of the tuple's type: the loops over k unroll
    # Ties are kept before index limits[k] and dropped after: the chunk is cut at these indices,
    # and within a piece "above or tied" is "above the next float down", one comparison.
    limits = np.zeros(count, np.int64)
    for k in range(count):
        if ties_left[k] < 0:  # all of them: no need to find the last
            limits[k] = n
        elif ties_left[k] > 0:
            limits[k] = _tie_limit(base, models[k], thresholds[k], ties_left[k])
    cuts = np.unique(np.concatenate((np.array([0, n], np.int64), limits)))
    above = np.empty(count, np.float32)
    non_finite_sources = 0
    non_finite_results = 0
    for piece in range(cuts.shape[0] - 1):
        start, stop = cuts[piece], cuts[piece + 1]
        for k in range(count):
            above[k] = np.nextafter(thresholds[k], _MINUS_INF) if start < limits[k] else thresholds[k]
        sources, results = _ties_piece(base, models, out, np.uint64(start), np.uint64(stop), above, weights,
                                       weighted_election, normalize, scale, lambda_, fused)
        non_finite_sources += sources
        non_finite_results += results
    return non_finite_sources == 0, non_finite_results == 0


@njit(nogil=True, error_model="numpy")
def _ties_piece(base, models, out, start, stop, above, weights,  # type: ignore[no-untyped-def]
                weighted_election, normalize, scale, lambda_, fused):
    """:func:`ties_merge` on entries [start, stop) (unsigned: no negative-index wraparound, the loop vectorizes)."""
    count = len(models)
    non_finite_sources = np.int32(0)
    non_finite_results = np.int32(0)
    for i in range(start, stop):
        b = _widen(base[i])
        non_finite_sources = np.int32(non_finite_sources + _non_finite(b))
        total = _ZERO
        for k in range(count):
            non_finite_sources = np.int32(non_finite_sources + _non_finite(_widen(models[k][i])))
            delta = _widen(models[k][i]) - b
            delta = delta * np.float32(abs(delta) > above[k])  # a dropped -x becomes -0.0, as in torch
            total = _elect_step(total, delta, k, weights[k], weighted_election, fused)
        elected = _elected(total, weighted_election)
        numerator, denominator = _ZERO, _ZERO
        for k in range(count):
            delta = _widen(models[k][i]) - b
            delta = delta * np.float32(abs(delta) > above[k])
            numerator, denominator = _merge_step(numerator, denominator, delta, elected, weights[k], fused)
        non_finite_results = np.int32(non_finite_results + _store(out, i, _finish(numerator, denominator, b, normalize, scale, lambda_)))
    return non_finite_sources, non_finite_results


@njit(cache=True, nogil=True, error_model="numpy")
def dare_merge(base, models, out, keep, divisors, weights,  # type: ignore[no-untyped-def]
               weighted_election, normalize, scale, lambda_, fused):
    """DARE-TIES for one chunk into ``out``: (sources finite, result finite).

    Model k's task vector is masked by ``keep[k]`` (a tuple of byte arrays, nonzero = keep)
    and divided by ``divisors[k]`` (its density when rescaling, else 1). A model kept whole
    has a mask of ones; one dropped whole, of zeros (its task vector becomes +-0.0 instead of
    torch's +0.0: no sum below can tell them apart).
    """
    count, n = len(models), base.shape[0]
    non_finite_sources = np.int32(0)
    non_finite_results = np.int32(0)
    for i in range(n):
        b = _widen(base[i])
        non_finite_sources = np.int32(non_finite_sources + _non_finite(b))
        total = _ZERO
        for k in range(count):
            non_finite_sources = np.int32(non_finite_sources + _non_finite(_widen(models[k][i])))
            delta = (_widen(models[k][i]) - b) * np.float32(keep[k][i] != 0) / divisors[k]  # x * 1 / 1 is x
            total = _elect_step(total, delta, k, weights[k], weighted_election, fused)
        elected = _elected(total, weighted_election)
        numerator, denominator = _ZERO, _ZERO
        for k in range(count):
            delta = (_widen(models[k][i]) - b) * np.float32(keep[k][i] != 0) / divisors[k]
            numerator, denominator = _merge_step(numerator, denominator, delta, elected, weights[k], fused)
        non_finite_results = np.int32(non_finite_results + _store(out, i, _finish(numerator, denominator, b, normalize, scale, lambda_)))
    return non_finite_sources == 0, non_finite_results == 0
