"""Teach transformers' Auto classes the layer-path architecture, without an import hook.

A saved layer-path folder is self-contained: config.json's ``auto_map`` names
``configuration_layer_path.py`` and ``modeling_layer_path.py``, which ``save_pretrained``
writes into the folder, so ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` loads it anywhere. Loading it *without* remote code needs
``AutoConfig`` and ``AutoModelForCausalLM`` to know ``model_type: shoal_layer_path``, which is
what :func:`register` does (idempotent). It runs

- at ``import shoal`` when the process has already imported transformers' model machinery
  (its Auto model classes or ``modeling_utils``);
- whenever shoal itself builds, saves or loads a path model (the :mod:`shoal.flow` entry
  points that touch the runtime call it);
- when a program calls ``shoal.flow.register()``.

The trade-off: registering imports the runtime, which needs transformers' ``modeling_utils``
and torch (seconds), and ``import shoal`` must stay cheap for the CLI (tens of milliseconds,
no torch). So ``import shoal`` registers only where a process has shown it loads models
through transformers (the cost is then only shifted: its first ``from_pretrained`` would pay
it), and not after a bare ``import transformers`` (a program that only tokenizes). The order
this leaves out is ``import shoal`` before transformers' Auto classes, then a direct
``AutoModelForCausalLM.from_pretrained(folder)``: such a program calls ``shoal.flow.register()``
once, or passes ``trust_remote_code=True``. A ``sys.meta_path`` finder that registers when
transformers is imported covered that order too, but it intercepted every import of the
process for a library that may never load a path model.
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


# Modules whose presence shows the process loads models through transformers.
MODEL_MACHINERY = ("transformers.modeling_utils", "transformers.models.auto.modeling_auto")


def register_if_transformers_loaded() -> None:
    """:func:`register` if transformers' model machinery is already imported (what ``import shoal`` runs)."""
    if any(name in sys.modules for name in MODEL_MACHINERY):
        register()
