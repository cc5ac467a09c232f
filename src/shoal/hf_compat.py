"""The KV cache's name in transformers: ``cache`` from 5.24 on, ``past_key_values`` before.

transformers 5.24 renamed the argument of models, decoder layers and mask builders and the
field of model outputs; models still accept the old name (with a warning, until 5.40), but a
decoder layer called directly ignores it. shoal passes the cache under the name the callee
declares and reads it from an output under either name.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable


@functools.lru_cache(maxsize=1)
def cache_field() -> str:
    """The field of transformers' model outputs that holds the cache in the installed version."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


@functools.lru_cache(maxsize=None)
def _cache_keyword(fn: Callable[..., Any]) -> str:
    parameters = inspect.signature(fn).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return cache_field()  # only **kwargs (a wrapper such as PEFT's): the installed transformers' name


def cache_keyword(fn: Callable[..., Any]) -> str:
    """The name ``fn`` declares for the cache (``cache`` or ``past_key_values``); where it declares
    neither, the name of the installed transformers."""
    return _cache_keyword(getattr(fn, "__func__", fn))


def cache_of(output: Any) -> Any:
    """The KV cache a model output carries, under either name (None without one)."""
    for name in ("cache", "past_key_values"):
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    return None
