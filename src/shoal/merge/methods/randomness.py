"""Counter-based random draws for DARE and DELLA: each entry's draw depends only on where it is.

The seed contract (``compat: paper``, the default): the draw for entry ``i`` (flat, row-major)
of model ``k``'s task vector in tensor ``name`` is word ``i mod 4`` of

    Philox4x32-10(counter = (i div 4 mod 2^32, i div 4 div 2^32, k, 0), key = (key mod 2^32, key div 2^32))

with ``key = tensor_seed(seed, name)`` (:func:`shoal.merge.plan.tensor_seed`). An entry with
keep probability ``p`` is kept when its 32-bit draw ``x`` satisfies ``x < p * 2^32``. Nothing
depends on the order entries are computed in, so a tensor merged in chunks, on any number of
threads, on the CPU or on a GPU, draws the same masks. Philox is Salmon et al. 2011,
"Parallel random numbers: as easy as 1, 2, 3" (https://doi.org/10.1145/2063384.2063405).

``compat: mergekit`` keeps mergekit's draws: one ``torch.Generator`` per tensor, model by
model, entry by entry (see :func:`shoal.merge.methods._inputs.uniform_like`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from shoal.checkpoint.lazy_torch import torch

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key increments (golden ratio, sqrt(3) - 1)
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of ``a * b`` for int64 tensors holding uint32 values, exactly.

    ``b`` is split into 16-bit halves so that no int64 product overflows (torch has no
    unsigned 64-bit arithmetic on every device).
    """
    low_part = a * (b & 0xFFFF)  # < 2^48
    high_part = a * (b >> 16)  # < 2^48
    low = (((high_part & 0xFFFF) << 16) + low_part) & _MASK32
    high = (high_part + (low_part >> 16)) >> 16
    return high, low


def philox4x32(counters: list[torch.Tensor], key: int) -> list[torch.Tensor]:
    """Philox4x32-10 of four int64 tensors of uint32 counter words under a 64-bit key: four words."""
    c0, c1, c2, c3 = counters
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    for round_ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if round_ < PHILOX_ROUNDS - 1:
            k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return [c0, c1, c2, c3]


@dataclass(frozen=True)
class EntryRandom:
    """The draws of one tensor's entries: keyed by ``key`` (seed and tensor), counted by position.

    ``start`` is the flat index, in the whole tensor, of the first entry of the piece a method
    is given (0 for the whole tensor): a chunk's draws are those of the same entries of the
    whole tensor.
    """

    key: int
    start: int = 0

    def at(self, start: int) -> "EntryRandom":
        """The draws of the piece that begins ``start`` entries into this one."""
        return replace(self, start=self.start + start)

    def bits(self, model: int, count: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """The 32-bit draws of entries ``start .. start + count`` of model ``model``, as int64."""
        if count == 0:
            return torch.empty(0, dtype=torch.int64, device=device)
        first_block, last_block = self.start // 4, (self.start + count - 1) // 4
        blocks = torch.arange(first_block, last_block + 1, dtype=torch.int64, device=device)
        counters = [blocks & _MASK32, blocks >> 32, torch.full_like(blocks, model), torch.zeros_like(blocks)]
        words = torch.stack(philox4x32(counters, self.key), dim=1).reshape(-1)  # entry 4b + j is word j of block b
        offset = self.start - 4 * first_block
        return words[offset:offset + count]

    def keep(self, model: int, shape: torch.Size | tuple[int, ...], probability: float | torch.Tensor,
             device: str | torch.device = "cpu") -> torch.Tensor:
        """Boolean keep mask of ``shape``: entry kept when its draw is below ``probability * 2^32``.

        ``probability`` is one float or a float32 tensor of ``shape`` (DELLA's per-entry
        probabilities); the comparison is exact in float64 on every device.
        """
        count = 1
        for dim in shape:
            count *= dim
        draws = self.bits(model, count, device).reshape(shape)
        if isinstance(probability, torch.Tensor):
            return draws.to(torch.float64) < probability.to(device=device, dtype=torch.float64) * 2.0**32
        return draws < keep_threshold(probability)


def keep_threshold(probability: float) -> int:
    """The draws below this integer are kept: ``ceil(probability * 2^32)`` (exact in float64)."""
    import math

    return max(0, min(1 << 32, math.ceil(probability * 2.0**32)))
