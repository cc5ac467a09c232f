"""The fused TIES loops (numba, the optional ``fast`` extra): the threshold scan and the merge of a chunk.

Every step for one entry before the next (task vector, magnitude, trim, sign election,
disjoint mean, conversion), with the arithmetic of :mod:`.primitives`. Inputs are numpy views
of the chunks: bfloat16 as its ``uint16`` bits, float32 as itself. Each loop also says
whether a source held a NaN or Inf and whether the result did, so the caller raises the
errors the torch code raises. ``nogil``: the executor's workers run them side by side.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from shoal.merge.fast.primitives import (_MINUS_INF, _PLUS_INF, _ZERO, DIGEST, _elect_step, _elected, _finish,
                                         _merge_step, _non_finite, _store, _widen)

KEEP_ALL, DROP_ALL = np.float32(-1.0), np.float32(np.inf)  # thresholds of :func:`ties_merge` that keep all, none

_LANES = 16  # float32 lanes of an AVX-512 vector


def _host_has(feature: str) -> bool:
    from llvmlite import binding

    return bool(binding.get_host_cpu_features().get(feature, False))


# numba compiles for this CPU (and its cache is per CPU): without AVX-512, LLVM would emulate
# the compressing store lane by lane, which the plain loop beats; AVX2 packs 8 lanes with a
# permutation looked up by the lanes' mask (_pack_inside)
_COMPRESS = _host_has("avx512f")
_PACK = not _COMPRESS and _host_has("avx2")
_PACK_LANES = 8
# row m: the lanes set in the 8-bit mask m, lowest first (the rest 0: stored past the count, then overwritten)
_PACK_ORDER = np.array([[lane for lane in range(_PACK_LANES) if mask >> lane & 1] +
                        [0] * (_PACK_LANES - bin(mask).count("1")) for mask in range(1 << _PACK_LANES)],
                       dtype=np.int32).reshape(-1)


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

@intrinsic
def _pack_inside(typingctx, values, start, out, size, bottom, top, order):  # type: ignore[no-untyped-def]
    """:func:`_compress_inside` for 8 lanes on AVX2: ``vpermps`` by the row of ``order`` (:data:`_PACK_ORDER`)
    that the lanes' mask picks, then all 8 stored at ``out[size:]`` (``size + 8`` must be in ``out``).
    """
    signature = types.int64(values, start, out, size, bottom, top, order)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        vector, indices = ir.VectorType(f32, _PACK_LANES), ir.VectorType(i32, _PACK_LANES)
        source = context.make_array(sig.args[0])(context, builder, args[0]).data
        target = context.make_array(sig.args[2])(context, builder, args[2]).data
        rows = context.make_array(sig.args[6])(context, builder, args[6]).data
        loaded = builder.load(builder.bitcast(builder.gep(source, [args[1]]), vector.as_pointer()), align=4)
        undefined, lane0 = ir.Constant(vector, ir.Undefined), ir.Constant(i32, 0)
        spread = ir.Constant(indices, [0] * _PACK_LANES)
        low = builder.shuffle_vector(builder.insert_element(undefined, args[4], lane0), undefined, spread)
        high = builder.shuffle_vector(builder.insert_element(undefined, args[5], lane0), undefined, spread)
        mask = builder.and_(builder.fcmp_ordered(">=", loaded, low), builder.fcmp_ordered("<=", loaded, high))
        bits = builder.bitcast(mask, ir.IntType(_PACK_LANES))
        row = builder.gep(rows, [builder.mul(builder.zext(bits, i64), ir.Constant(i64, _PACK_LANES))])
        order = builder.load(builder.bitcast(row, indices.as_pointer()), align=4)
        permute = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector, indices]),
                                                 "llvm.x86.avx2.permps")
        packed = builder.call(permute, [loaded, order])
        builder.store(packed, builder.bitcast(builder.gep(target, [args[3]]), vector.as_pointer()), align=4)
        popcount = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(bits.type, [bits.type]), f"llvm.ctpop.i{_PACK_LANES}")
        return builder.zext(builder.call(popcount, [bits]), i64)

    return signature, codegen


_RADIX_BITS = 11
_RADIX_SIZE = 1 << _RADIX_BITS


@njit(nogil=True, error_model="numpy")
def _sort_bits(values, spare):  # type: ignore[no-untyped-def]
    """``values`` sorted (a radix sort, in ``values`` or ``spare``, an array of the same length; returns which).

    Least significant digit first, 11 bits a pass, on the offsets from the smallest value: a
    narrow bracket takes one or two passes, each two reads of the values, where a comparison
    sort would take log2 of the thousands of values inside a chunk's bracket.
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
def _tie_limit(base, model, threshold, count):  # type: ignore[no-untyped-def]
    """The index just past the ``count``-th entry with |model - base| == ``threshold`` (the length if fewer)."""
    seen = 0
    for i in range(base.shape[0]):
        if abs(_widen(model[i]) - _widen(base[i])) == threshold:
            seen += 1
            if seen == count:
                return i + 1
    return base.shape[0]


def _cached_loops(digest: str):  # type: ignore[no-untyped-def]
    """The cached loops, keyed by ``digest`` (see :mod:`.primitives`)."""

    @njit(cache=True, nogil=True, error_model="numpy")
    def ties_scan(base, model, lo, hi, has_lo, has_hi, work):  # type: ignore[no-untyped-def]
        """|model - base| against a bracket: (count above ``hi``, distinct values in it, their counts, sources finite).

        What ``KthLargest.scan`` returns for the magnitudes of one chunk's task vector; a
        missing bound (``has_lo``/``has_hi`` false) leaves that side open. ``work`` is a
        (2, >= n) float32 array the caller keeps (:func:`scratch`; a fresh one each call would be page faults).
        """
        digest  # noqa: B018 (part of the cache key)
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
        elif _PACK:  # AVX2: 8 at a time, their order from a table (size <= done: the 8 stores stay inside n)
            while done + _PACK_LANES <= n:
                size += _pack_inside(magnitudes, done, inside, size, bottom, top, _PACK_ORDER)
                done += _PACK_LANES
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

    return ties_scan


ties_scan = _cached_loops(DIGEST)


_loops_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _merge_loop(digest: str, weighted_election: bool, normalize: bool,  # type: ignore[no-untyped-def]
                scale: bool, fused: bool):
    """The cached merge loop for one set of combine settings, keyed by ``digest`` (see :mod:`.primitives`).

    The settings are constants of the compiled loop (numba's cache key includes a closure's
    values): tested per entry they are branches inside the loop, which LLVM then does not
    vectorize. (No other compiled function among the closure's values: numba's cache key would
    then differ in every process.)
    """

    @njit(cache=True, nogil=True, error_model="numpy")
    def merge(base, models, out, thresholds, ties_left, weights, lambda_):  # type: ignore[no-untyped-def]
        digest  # noqa: B018 (part of the cache key)
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
        non_finite_sources = np.int32(0)
        non_finite_results = np.int32(0)
        for at in range(cuts.shape[0] - 1):
            start, stop = cuts[at], cuts[at + 1]
            for k in range(count):
                above[k] = np.nextafter(thresholds[k], _MINUS_INF) if start < limits[k] else thresholds[k]
            # unsigned: no negative-index wraparound, the loop vectorizes
            for i in range(np.uint64(start), np.uint64(stop)):
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
                value = _finish(numerator, denominator, b, normalize, scale, lambda_)
                non_finite_results = np.int32(non_finite_results + _store(out, i, value))
        return non_finite_sources == 0, non_finite_results == 0

    return merge


def ties_merge(base, models, out, thresholds, ties_left, weights,  # type: ignore[no-untyped-def]
               weighted_election, normalize, scale, lambda_, fused):
    """TIES for one chunk into ``out``: (sources finite, result finite).

    ``models`` is a tuple of the models' chunks. Model k's task vector keeps the entries
    with magnitude above ``thresholds[k]`` and, of those equal to it, the first
    ``ties_left[k]`` in flat order (all of them when negative). A threshold of -1 keeps
    all entries, +Inf none. The trailing arguments are those of
    :func:`~.fused.combine_settings`.

    The task vectors are computed twice per entry (for the election, then for the mean)
    rather than kept in an array: they stay in registers, with no store and load between.
    """
    with _loops_lock:  # the workers' first calls: one compiles (or loads) the loop, the other waits
        loop = _merge_loop(DIGEST, bool(weighted_election), bool(normalize), bool(scale), bool(fused))
    return loop(base, models, out, thresholds, ties_left, weights, lambda_)
