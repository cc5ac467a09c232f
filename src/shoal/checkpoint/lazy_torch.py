"""``torch``, imported when first used: ``from shoal.checkpoint.lazy_torch import torch``.

Modules whose functions compute with tensors but that the torch-free merge path imports (the
method registry, the planner, the reader) take torch this way: importing them costs nothing,
and the first attribute read (``torch.zeros``, ``torch.Tensor``) imports torch, once, for
good. Module-level code of such a module must not touch ``torch`` (annotations are strings
under ``from __future__ import annotations``).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any


class _LazyModule:
    __slots__ = ("_name", "_module")

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}{'' if self._module is None else ' (imported)'}>"


if TYPE_CHECKING:
    import torch as torch
else:
    torch = _LazyModule("torch")

__all__ = ["torch"]
