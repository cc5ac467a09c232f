"""The fused DARE loops (numba, the optional ``fast`` extra): the counter-based keep masks and the merge.

:func:`philox_keep` draws the masks of :mod:`shoal.merge.methods.randomness` (the same
Philox4x32-10 words as its torch code, so the same masks on every device and in any
chunking); :func:`dare_merge` is DARE-TIES for one chunk with the arithmetic of
:mod:`.primitives`. ``nogil``: the executor's workers run them side by side.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
from numba import njit

from shoal.merge.fast.primitives import (_ZERO, DIGEST, _elect_step, _elected, _finish, _merge_step, _non_finite,
                                         _store, _widen)

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


@njit(inline="always", error_model="numpy")
def _philox(c0, c1, c2, c3, k0, k1):  # type: ignore[no-untyped-def]
    """Philox4x32-10 of one counter (uint64 holding uint32 words): its four output words."""
    for round_ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = ((p1 >> _SHIFT32) ^ c1 ^ k0, p1 & _LOW32, (p0 >> _SHIFT32) ^ c3 ^ k1, p0 & _LOW32)
        if round_ < 9:
            k0 = (k0 + _W0) & _LOW32
            k1 = (k1 + _W1) & _LOW32
    return c0, c1, c2, c3


def _cached_loops(digest: str):  # type: ignore[no-untyped-def]
    """The cached loops, keyed by ``digest`` (see :mod:`.primitives`)."""

    @njit(cache=True, nogil=True, error_model="numpy")
    def philox_keep(key, model, start, threshold, out):  # type: ignore[no-untyped-def]
        """``out[j] = 1`` where entry ``start + j`` of model ``model`` draws below ``threshold``, else 0."""
        digest  # noqa: B018 (part of the cache key)
        n = out.shape[0]
        k0 = np.uint64(key) & _LOW32
        k1 = (np.uint64(key) >> _SHIFT32) & _LOW32
        limit = np.uint64(threshold)
        c2 = np.uint64(model)
        first = (start + 3) // 4  # the blocks wholly inside the piece: a plain loop, which vectorizes
        last = max(first, (start + n) // 4)
        offset = np.uint64(first * 4 - start)  # unsigned: no negative-index wraparound, the loop vectorizes
        for j in range(np.uint64(last - first)):
            ublock = np.uint64(first) + j
            w0, w1, w2, w3 = _philox(ublock & _LOW32, ublock >> _SHIFT32, c2, np.uint64(0), k0, k1)
            at = offset + j * np.uint64(4)
            out[at] = w0 < limit
            out[at + np.uint64(1)] = w1 < limit
            out[at + np.uint64(2)] = w2 < limit
            out[at + np.uint64(3)] = w3 < limit
        head_end = min(first * 4, start + n)  # the entries of the blocks cut by the piece's ends
        for entry in list(range(start, head_end)) + list(range(max(last * 4, head_end), start + n)):
            ublock = np.uint64(entry // 4)
            words = _philox(ublock & _LOW32, ublock >> _SHIFT32, c2, np.uint64(0), k0, k1)
            out[entry - start] = words[entry % 4] < limit

    return philox_keep


philox_keep = _cached_loops(DIGEST)


_loops_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _merge_loop(digest: str, weighted_election: bool, normalize: bool,  # type: ignore[no-untyped-def]
                scale: bool, fused: bool):
    """The cached merge loop for one set of combine settings (constants of the loop, as in :mod:`.ties_loops`)."""

    @njit(cache=True, nogil=True, error_model="numpy")
    def merge(base, models, out, keep, divisors, weights, lambda_):  # type: ignore[no-untyped-def]
        digest  # noqa: B018 (part of the cache key)
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
            value = _finish(numerator, denominator, b, normalize, scale, lambda_)
            non_finite_results = np.int32(non_finite_results + _store(out, i, value))
        return non_finite_sources == 0, non_finite_results == 0

    return merge


def dare_merge(base, models, out, keep, divisors, weights,  # type: ignore[no-untyped-def]
               weighted_election, normalize, scale, lambda_, fused):
    """DARE-TIES for one chunk into ``out``: (sources finite, result finite).

    Model k's task vector is masked by ``keep[k]`` (a tuple of byte arrays, nonzero = keep)
    and divided by ``divisors[k]`` (its density when rescaling, else 1). A model kept whole
    has a mask of ones; one dropped whole, of zeros (its task vector becomes +-0.0 instead of
    torch's +0.0: no sum below can tell them apart). The trailing arguments are those of
    :func:`~.fused.combine_settings`.
    """
    with _loops_lock:  # the workers' first calls: one compiles (or loads) the loop, the other waits
        loop = _merge_loop(DIGEST, bool(weighted_election), bool(normalize), bool(scale), bool(fused))
    return loop(base, models, out, keep, divisors, weights, lambda_)
