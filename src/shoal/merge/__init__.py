"""Merging: methods (pure tensor functions), recipes, planning and one executor.

Submodules are imported on first use, so importing the method registry does not pull in
checkpoint I/O.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ExecutorOptions": "execute", "MergeResult": "execute", "compute_op": "execute", "execute_plan": "execute",
    "merge": "execute", "write_tensor_ops": "execute",
    "MergePlan": "plan", "SourceRef": "plan", "TensorOp": "plan", "plan_merge": "plan",
    "Recipe": "recipe", "load_recipe": "recipe", "parse_recipe": "recipe",
    "MethodSpec": "registry", "ParamSpec": "registry", "all_methods": "registry",
    "get_method": "registry", "merge_method": "registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"shoal.merge.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'shoal.merge' has no attribute {name!r}")
