"""Layer-path (data-flow space) models: a path of hops over the layers of several models.

- :mod:`shoal.flow.path`: hops ``(model, layer, scale)`` and their validation;
- :mod:`shoal.flow.genome`: the DFS genome of arXiv 2403.13187 (indicator array, scaling) <-> path;
- :mod:`shoal.flow.genes`: the gene transform every search space (PS and DFS) decodes through;
- :mod:`shoal.flow.modeling_layer_path`, :mod:`shoal.flow.configuration_layer_path`: the
  transformers runtime (``model_type: shoal_layer_path``), standalone files that every saved
  folder carries (see :mod:`shoal.flow.registration`);
- :mod:`shoal.flow.build`: assemble and save a path model from source folders;
- :mod:`shoal.flow.export`: an all-ones path as a plain checkpoint (a passthrough merge);
- :mod:`shoal.flow.registration`: :func:`register`, the Auto-class registration (no import hook);
- :mod:`shoal.flow.slices`: passthrough ``slices`` recipes as paths.

Submodules load on first use: importing this package pulls in neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Hop": "path", "LayerPath": "path", "check_path": "path", "identity_path": "path", "make_path": "path",
    "DfsLayout": "genome", "DfsSpace": "genome",
    "LayerPathConfig": "configuration_layer_path",
    "LayerPathForCausalLM": "modeling_layer_path", "LayerPathModel": "modeling_layer_path",
    "register": "registration",
    "build_path_model": "build", "prune_path_model": "build", "save_path_model": "build",
    "source_layer_counts": "build", "write_path_model": "build",
    "export_path": "export", "export_path_model": "export",
    "path_from_slices": "slices", "slices_from_path": "slices",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"shoal.flow.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'shoal.flow' has no attribute {name!r}")
