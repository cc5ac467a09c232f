"""Make transformers' Auto classes know the layer-path architecture, without slowing ``import shoal``.

``import shoal`` must stay cheap (no torch, no transformers), yet after it
``AutoModelForCausalLM.from_pretrained(folder)`` must load a layer-path folder. So registration
happens when transformers' Auto modules are imported: a finder on ``sys.meta_path`` watches for
``transformers.models.auto.configuration_auto`` and ``...modeling_auto`` and registers the
config and the model class right after each has run. When they were already imported before
shoal, registration happens at once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any, Callable, Sequence

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"

_done: set[str] = set()


def register_config() -> None:
    """Register the config with ``AutoConfig`` (idempotent)."""
    if CONFIG_AUTO in _done:
        return
    _done.add(CONFIG_AUTO)
    from shoal.flow.configuration import MODEL_TYPE, LayerPathConfig

    _module(CONFIG_AUTO).AutoConfig.register(MODEL_TYPE, LayerPathConfig, exist_ok=True)


def register_model() -> None:
    """Register the model with ``AutoModelForCausalLM`` (idempotent)."""
    if MODELING_AUTO in _done:
        return
    register_config()
    _done.add(MODELING_AUTO)
    from shoal.flow.configuration import LayerPathConfig
    from shoal.flow.modeling import LayerPathForCausalLM

    _module(MODELING_AUTO).AutoModelForCausalLM.register(LayerPathConfig, LayerPathForCausalLM,
                                                          exist_ok=True)


def _module(name: str) -> ModuleType:
    # the module whose import triggered the hook is complete, though its package may still be loading
    return sys.modules[name] if name in sys.modules else importlib.import_module(name)


_HOOKS: dict[str, Callable[[], None]] = {CONFIG_AUTO: register_config, MODELING_AUTO: register_model}


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then the registration hook."""

    def __init__(self, loader: Any, hook: Callable[[], None]):
        self.loader = loader
        self.hook = hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.hook()


class _AutoFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        hook = _HOOKS.get(fullname)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, hook)
                return spec
        return None


_FINDER = _AutoFinder()


def install() -> None:
    """Register now if transformers' Auto modules are loaded; otherwise when they get loaded."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    if CONFIG_AUTO in sys.modules:
        register_config()
    if MODELING_AUTO in sys.modules:
        register_model()
