"""The registry of merge methods.

A merge method is a pure function of tensors and numbers that returns one tensor::

    @merge_method("ties", needs_base=True, paper="https://arxiv.org/abs/2306.01708")
    def ties(base, models, *, weight, density, lambda_=1.0, normalize=True, compat="paper"):
        ...

Calling convention (every method):

- ``base``: the base model's tensor, or ``None`` for methods that do not need one.
- ``models``: the other sources' tensors, in recipe order (the base is never in this list).
- keyword-only parameters: their *names* decide what they are, through :data:`PARAMETERS`:
  per-model parameters (``weight``, ``density``, ...) arrive as a sequence with one float per
  entry of ``models``; global ones (``t``, ``lambda``, ``normalize``, ...) as one value.
  ``lambda`` is spelled ``lambda_`` in Python.
- ``generator``: a ``torch.Generator`` for methods that draw random numbers (DARE, DELLA).
- ``compat``: ``"paper"`` (default) or ``"mergekit"`` for methods whose mergekit results differ
  from the paper; only passed to methods whose signature has it.

The method's signature is the source of truth for which parameters it has: evolution builds
its search space from :attr:`MethodSpec.params`. A method whose parameter means something else
than the table's entry of that name declares its own spec (``own_params``, e.g. RAM's global
``epsilon``). ``optional_base=True``: the method takes the base when the recipe names one.

How a method runs is declared with it. Its function on whole tensors is the reference; with
``chunked="module:function"`` it may also run over flat chunks of a tensor: the function
(a :data:`shoal.merge.chunks.ChunkPlanner`) gets a :class:`~shoal.merge.chunks.ChunkJob`
and returns the passes over the chunks, or None when these settings must run whole. Chunked
results are bitwise the function's. ``shoal.merge.chunks:elementwise`` is the planner of a
method whose function, given a flat range of every input, returns that range of its result.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

from shoal.errors import RecipeError

ParamKind = Literal["float", "bool"]


@dataclass(frozen=True)
class ParamSpec:
    """What one merge parameter is: its recipe name, kind, default and evolvable range."""

    name: str  # as written in recipes (``lambda``, not ``lambda_``)
    kind: ParamKind
    per_model: bool  # one value per source model, or one for the merge
    default: float | bool
    low: float | None = None  # range used by evolution; None for bools
    high: float | None = None
    doc: str = ""
    mergekit_default: float | bool | None = None  # where mergekit's default differs (used under compat: mergekit)

    @property
    def evolvable(self) -> bool:
        return self.kind == "float" and self.low is not None and self.high is not None

    def default_for(self, compat: str) -> float | bool | None:
        """The default a recipe in mode ``compat`` gets when it leaves this parameter unset."""
        if compat == "mergekit" and self.mergekit_default is not None:
            return self.mergekit_default
        return self.default


# Every parameter any method may take. A method's signature picks from this table.
PARAMETERS: dict[str, ParamSpec] = {
    p.name: p
    for p in (
        ParamSpec("weight", "float", True, 1.0, 0.0, 1.0, "scale of this model's contribution"),
        ParamSpec("density", "float", True, 1.0, 0.0, 1.0, "fraction of the task vector kept"),
        ParamSpec("gamma", "float", True, 0.01, 0.0, 0.2, "fraction of largest entries removed (breadcrumbs)"),
        ParamSpec("epsilon", "float", True, 0.1, 0.0, 0.5, "spread of keep probabilities around density (della)",
                  mergekit_default=0.15),
        ParamSpec("t", "float", False, 0.5, 0.0, 1.0, "interpolation factor: 0 gives the base, 1 the other model"),
        ParamSpec("lambda", "float", False, 1.0, 0.0, 3.0, "global scale of the merged task vector"),
        ParamSpec("scale", "float", True, 1.0, 0.0, 2.0, "scale applied to a passed-through tensor"),
        ParamSpec("normalize", "bool", False, True, doc="divide by the sum of weights"),
        ParamSpec("rescale", "bool", False, True, doc="rescale kept entries by 1/keep-probability"),
        ParamSpec("filter_wise", "bool", False, False, doc="model stock: one ratio per row instead of per tensor"),
        # methods from mergekit (nuslerp, multislerp, karcher, sce, ramplus_tl)
        ParamSpec("nuslerp_flatten", "bool", False, True, doc="nuslerp: the tensor as one vector, not row by row"),
        ParamSpec("nuslerp_row_wise", "bool", False, False,
                  doc="nuslerp: interpolate the vectors along dim 0 (columns) instead of the last dim"),
        ParamSpec("normalize_weights", "bool", False, True, doc="multislerp: divide the weights by their sum"),
        ParamSpec("eps", "float", False, 1e-8, doc="multislerp: added to norms before dividing"),
        ParamSpec("max_iter", "float", False, 10, doc="karcher: most fixed-point iterations (a whole number)"),
        ParamSpec("tol", "float", False, 1e-5, doc="karcher: stop when the tangent step is shorter"),
        ParamSpec("select_topk", "float", False, 1.0, 0.0, 1.0,
                  doc="sce: fraction of entries kept, those whose task vectors vary most across models"),
        ParamSpec("r", "float", False, 0.1, 0.0, 1.0, doc="ramplus_tl: strength of the overlap rescaling"),
        ParamSpec("alpha", "float", False, 0.2, 0.0, 1.0, doc="ramplus_tl: cap on the shared/unique ratio"),
    )
}

# Parameters mergekit's methods declare that change nothing in shoal's: accepted without a warning.
# name -> {method: True (any value) or False (only false: a true value would change mergekit's result)}
_TASK_ARITHMETIC_FAMILY = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                           "breadcrumbs_ties", "della", "della_linear")
NO_EFFECT_PARAMETERS: dict[str, dict[str, bool]] = {
    # mergekit computes its sign-agreement masks in int8 to save memory; shoal's are booleans
    "int8_mask": {name: True for name in _TASK_ARITHMETIC_FAMILY},
    # task arithmetic sparsifies nothing, so there is nothing to rescale
    "rescale": {"task_arithmetic": True},
}

_PY_NAMES = {"lambda_": "lambda"}
_RESERVED = {"generator", "compat"}


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method."""

    name: str
    fn: Callable[..., Any]
    needs_base: bool
    min_models: int  # minimum number of non-base models
    max_models: int | None
    paper: str
    params: tuple[ParamSpec, ...]
    uses_generator: bool
    has_compat: bool
    chunked: str | None = None  # "module:function" of its chunk planner (see the module docstring)
    optional_base: bool = False  # takes the base when the recipe names one (``base`` is None otherwise)

    def uses_base(self, base_model: str | None) -> bool:
        """Whether a recipe with this ``base_model`` passes a base tensor to the method."""
        return self.needs_base or (self.optional_base and base_model is not None)

    @property
    def base_role(self) -> str:
        """``needs base_model``, ``optional base_model`` or ``no base model`` (for listings)."""
        return ("needs base_model" if self.needs_base else
                "optional base_model" if self.optional_base else "no base model")

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.splitlines()[0] if doc else ""

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise RecipeError(f"method {self.name!r} has no parameter {name!r}; it takes: "
                          + (", ".join(p.name for p in self.params) or "no parameters"))

    def __call__(self, base: Any, models: Any, **kwargs: Any) -> Any:
        return self.fn(base, models, **kwargs)

    def defaults(self) -> dict[str, Any]:
        """The function's keyword defaults (Python names)."""
        return {name: p.default for name, p in inspect.signature(self.fn).parameters.items()
                if p.kind == p.KEYWORD_ONLY and p.default is not inspect.Parameter.empty}

    def chunk_planner(self) -> Callable[..., Any] | None:
        """The declared chunk planner, imported on first use (the fast path may need numba), or None."""
        if self.chunked is None:
            return None
        import importlib

        module, _, attr = self.chunked.partition(":")
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


_REGISTRY: dict[str, MethodSpec] = {}


def merge_method(
    name: str,
    *,
    needs_base: bool,
    paper: str,
    min_models: int = 1,
    max_models: int | None = None,
    chunked: str | None = None,
    optional_base: bool = False,
    own_params: tuple[ParamSpec, ...] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as merge method ``name``; duplicate names and unknown parameters fail at import.

    ``chunked``: ``"module:function"`` of the method's chunk planner (see the module docstring).
    ``optional_base``: with ``needs_base=False``, the method still takes the base when a recipe
    names one (``base`` is None otherwise). ``own_params``: parameters this method alone has, or
    has with another meaning than :data:`PARAMETERS` gives the name (RAM's global ``epsilon``);
    they take precedence over the table for this method.
    """
    if needs_base and optional_base:
        raise ValueError(f"merge method {name!r}: a base cannot be both needed and optional")
    local = {p.name: p for p in own_params}

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is registered twice")
        sig = inspect.signature(fn)
        unused = sorted(set(local) - {_PY_NAMES.get(k, k) for k in sig.parameters})
        if unused:
            raise ValueError(f"merge method {name!r}: own_params {unused} are not in its signature")
        positional = [p for p in sig.parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if [p.name for p in positional] != ["base", "models"]:
            raise ValueError(f"merge method {name!r} must take (base, models, *, ...) positionally")
        params = []
        for p in sig.parameters.values():
            if p.kind != p.KEYWORD_ONLY or p.name in _RESERVED:
                continue
            recipe_name = _PY_NAMES.get(p.name, p.name)
            if recipe_name not in PARAMETERS and recipe_name not in local:
                raise ValueError(f"merge method {name!r}: parameter {p.name!r} is not in PARAMETERS")
            spec = local.get(recipe_name) or PARAMETERS[recipe_name]
            if p.default is not inspect.Parameter.empty and not spec.per_model:
                spec = replace(spec, default=p.default)
            params.append(spec)
        _REGISTRY[name] = MethodSpec(
            name=name,
            fn=fn,
            needs_base=needs_base,
            min_models=min_models,
            max_models=max_models,
            paper=paper,
            params=tuple(params),
            uses_generator="generator" in sig.parameters,
            has_compat="compat" in sig.parameters,
            chunked=chunked,
            optional_base=optional_base,
        )
        return fn

    return decorate


def python_name(param: str) -> str:
    """The keyword a method function uses for recipe parameter ``param``."""
    return "lambda_" if param == "lambda" else param


def get_method(name: str) -> MethodSpec:
    """Look up a method by name; an unknown name is a :class:`RecipeError` listing the known ones."""
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RecipeError(
            f"unknown merge method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


def all_methods() -> list[MethodSpec]:
    """Every registered method, sorted by name."""
    _load_builtin_methods()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _load_builtin_methods() -> None:
    import shoal.merge.methods  # noqa: F401  (importing registers the built-in methods)
