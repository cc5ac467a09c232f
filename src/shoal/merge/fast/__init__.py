"""Optional fused kernels (numba, the ``fast`` extra) and the chunked stages of TIES, DARE and SLERP.

Nothing here changes what a merge writes: each stage is bitwise its method's whole-tensor
function (the reference), which :mod:`shoal.merge.execute` runs whenever a stage cannot.
"""

from __future__ import annotations

import functools
from types import ModuleType


@functools.lru_cache(maxsize=1)
def load_kernels() -> ModuleType | None:
    """:mod:`.fused` when the fused loops can run here (numba installed, torch's rounding known), else None."""
    import numpy as np

    from shoal.runtime import numba_first_import, settle

    with numba_first_import():
        try:
            from shoal.merge.fast import fused
        except ImportError:  # numba is the optional ``fast`` extra
            return None
        # numba sets itself up (its numpy support included) on the first call of a compiled function:
        # here, once, not in a worker
        fused.to_bf16_bits(np.zeros(1, np.float32), np.zeros(1, np.uint16))
    settle()  # numba's lasting objects join those a runtime context sets aside from collections
    # the loops repeat torch's rounding; where torch's own add-with-alpha is not consistent, they cannot
    return fused if fused.torch_fuses_alpha() is not None else None
