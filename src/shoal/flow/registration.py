"""Teach transformers' Auto classes the layer-path architecture, without an import hook.

A saved layer-path folder is self-contained: config.json's ``auto_map`` names
``configuration_layer_path.py`` and ``modeling_layer_path.py``, which ``save_pretrained``
writes into the folder, so ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` loads it anywhere. Loading it *without* remote code needs
``AutoConfig`` and ``AutoModelForCausalLM`` to know ``model_type: shoal_layer_path``, which is
what :func:`register` does (idempotent). It runs

- at ``import shoal`` when transformers is already imported;
- whenever shoal itself builds, saves or loads a path model (every :mod:`shoal.flow` entry
  point that touches the runtime calls it);
- when a program calls ``shoal.flow.register()``.

The trade-off: registering needs transformers' Auto modules, which import torch (seconds), and
``import shoal`` must stay cheap for the CLI, so ``import shoal`` registers only where that
cost is already paid. The one order this does not cover is ``import shoal`` first and then a
direct ``AutoModelForCausalLM.from_pretrained(folder)``: such a program calls
``shoal.flow.register()`` once, or passes ``trust_remote_code=True``. The alternative, a
``sys.meta_path`` finder that registers when transformers is imported, covered that order too,
but changed every import of the process for a library that may never load a path model.
"""

from __future__ import annotations

import sys

_registered = False


def register() -> None:
    """Register the layer-path config and model with ``AutoConfig`` / ``AutoModelForCausalLM``."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from shoal.flow.configuration_layer_path import MODEL_TYPE, LayerPathConfig
    from shoal.flow.modeling_layer_path import LayerPathForCausalLM

    AutoConfig.register(MODEL_TYPE, LayerPathConfig, exist_ok=True)
    AutoModelForCausalLM.register(LayerPathConfig, LayerPathForCausalLM, exist_ok=True)
    _registered = True


def register_if_transformers_loaded() -> None:
    """:func:`register` if the process has imported transformers already (what ``import shoal`` runs)."""
    if "transformers" in sys.modules:
        register()
