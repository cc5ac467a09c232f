"""Parameter-space (PS) search spaces: genes <-> merge recipes.

The evolvable parameters come from the merge method's signature (its per-model and global
float parameters with a range). The config picks the granularity: one gene per model, per
layer group (embeddings and the head are groups of their own), and optionally per module kind
(attention / MLP / norm).

Every gene lives in [0, 1], where the paper's CMA-ES settings apply directly (start 0.5,
sigma 1/6). It maps to its parameter range through a smooth, monotone transform,
``low + (high - low) * (1 - cos(pi x)) / 2``, which reaches both ends of the range with zero
slope instead of clamping.

Decoding a genome gives an ordinary recipe: per-model parameters as ``filter``/``value``
lists whose filters are tensor-name prefixes of the reference model, so ``shoal merge``
builds exactly the candidate the search evaluated. Models given with a ``prefix_map`` keep it
in the recipe; then the reference is a VLM whose vision tower and projector (role ``vision``)
are copied and get no genes, and the layer genes address its language model's layers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from shoal.checkpoint import describe_tensor
from shoal.errors import ConfigError
from shoal.evolve.config import EvolveConfig
from shoal.flow.genes import from_range, to_range
from shoal.merge.recipe import FilterValue, ModelEntry, Recipe
from shoal.merge.registry import MethodSpec, get_method

GLOBAL = "*"  # the "model" of a gene for a whole-merge parameter such as lambda

_ROLE_TO_MODULE = {"attention": "attention", "mlp": "mlp", "norm": "norm"}


@dataclass(frozen=True)
class Cell:
    """A set of tensors that share one value of each parameter: a layer group x module kind."""

    group: str  # "embed", "layers 0-1", "head", or "all"
    module: str | None  # "attention", "mlp", "norm", "rest", or None
    filters: tuple[str, ...]  # tensor-name prefixes, most specific first


@dataclass(frozen=True)
class Gene:
    key: str  # the Optuna parameter name
    model: str  # a source model, or GLOBAL
    param: str
    cell: Cell
    low: float
    high: float


@dataclass(frozen=True)
class SearchSpace:
    """The genes of a run and how they become a recipe."""

    config: EvolveConfig
    method: MethodSpec
    cells: tuple[Cell, ...]
    genes: tuple[Gene, ...]
    models: tuple[str, ...]  # models whose parameters evolve (not held at zero)

    @property
    def size(self) -> int:
        return len(self.genes)

    def default_genome(self) -> dict[str, float]:
        """Every gene at the middle of its range (the paper's start point)."""
        return {g.key: 0.5 for g in self.genes}

    def values(self, genome: Mapping[str, float]) -> dict[str, float]:
        """Parameter values of every gene (in parameter units)."""
        missing = [g.key for g in self.genes if g.key not in genome]
        if missing:
            raise ConfigError(f"genome lacks genes {missing[:5]}{'...' if len(missing) > 5 else ''}")
        return {g.key: to_range(genome[g.key], g.low, g.high) for g in self.genes}

    def decode(self, genome: Mapping[str, float]) -> Recipe:
        """The merge recipe of a genome."""
        values = self.values(genome)
        per_model: dict[str, dict[str, list[FilterValue]]] = defaultdict(lambda: defaultdict(list))
        for gene in self.genes:
            for prefix in gene.cell.filters:
                per_model[gene.model][gene.param].append(FilterValue(filter=prefix, value=values[gene.key]))
        entries = []
        cfg = self.config
        for model in cfg.models:
            params: dict[str, object] = {}
            if model in cfg.hold_at_zero:
                params["weight"] = 0.0
            else:
                params.update({p: list(v) for p, v in per_model.get(model, {}).items()})
            entries.append(ModelEntry(model=model, parameters=params,  # type: ignore[arg-type]
                                      prefix_map=cfg.prefix_maps.get(model, {})))
        global_params: dict[str, object] = dict(cfg.fixed)
        global_params.update({p: list(v) for p, v in per_model.get(GLOBAL, {}).items()})
        base_map = cfg.prefix_maps.get(cfg.base_model, {}) if cfg.base_model else {}
        return Recipe(merge_method=self.method.name, base_model=cfg.base_model, models=entries,
                      parameters=global_params, seed=cfg.seed, base_prefix_map=base_map)  # type: ignore[arg-type]

    def encode(self, recipe: Recipe) -> dict[str, float]:
        """The genome a decoded recipe came from (inverse of :meth:`decode`)."""
        by_model = {m.model: m.parameters for m in recipe.models or []}
        genome: dict[str, float] = {}
        for gene in self.genes:
            source = recipe.parameters if gene.model == GLOBAL else by_model.get(gene.model, {})
            entries = source.get(gene.param)
            if not isinstance(entries, list):
                raise ConfigError(f"recipe has no filter list for {gene.param!r} of {gene.model}")
            value = next((e.value for e in entries if isinstance(e, FilterValue)
                          and e.filter == gene.cell.filters[0]), None)
            if not isinstance(value, (int, float)):
                raise ConfigError(f"recipe has no value for gene {gene.key}")
            genome[gene.key] = from_range(float(value), gene.low, gene.high)
        return genome


def _layer_prefix(names: Sequence[str]) -> str:
    """The longest common dotted prefix of ``names`` (ending in '.')."""
    if len(names) == 1:
        return names[0]
    first, last = min(names), max(names)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    common = first[:i]
    return common[: common.rfind(".") + 1]


def build_cells(tensor_names: Iterable[str], architecture: str | None, *,
                layer_group_size: int | None, modules: Sequence[str]) -> tuple[Cell, ...]:
    """Partition the reference model's tensors into cells with tensor-name prefix filters."""
    names = list(tensor_names)
    infos = [describe_tensor(n, architecture) for n in names]
    if layer_group_size is None:
        return (Cell("all", None, ("",)),)
    before, after = [], []
    layers: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for name, info in zip(names, infos):
        if info.layer is None:
            # safetensors files list tensors alphabetically, so the role, not the order, says
            # whether a tensor comes before the decoder stack (embeddings) or after it
            (before if info.role == "embed" else after).append(name)
        else:
            module = _ROLE_TO_MODULE.get(info.role, "rest") if modules else "rest"
            if module not in modules:
                module = "rest"
            layers[info.layer].append((name, module))
    cells: list[Cell] = []
    if before:
        cells.append(Cell("embed", None, tuple(before)))
    ordered = sorted(layers)
    for start in range(0, len(ordered), layer_group_size):
        group_layers = ordered[start:start + layer_group_size]
        label = f"layers {group_layers[0]}-{group_layers[-1]}" if len(group_layers) > 1 \
            else f"layer {group_layers[0]}"
        for module in [*modules, "rest"]:
            filters = []
            for layer in group_layers:
                members = [n for n, m in layers[layer] if m == module]
                if not members:
                    continue
                if module == "rest":
                    filters.append(_layer_prefix([n for n, _ in layers[layer]]))
                else:
                    filters.append(_layer_prefix(members))
            if filters:
                cells.append(Cell(label, module if modules else None, tuple(filters)))
    if after:
        cells.append(Cell("head", None, tuple(after)))
    return tuple(cells)


def build_space(config: EvolveConfig, tensor_names: Sequence[str], architecture: str | None) -> SearchSpace:
    """The search space of ``config`` over a reference model with these tensor names."""
    method = get_method(config.method)
    evolvable = [p for p in method.params if p.evolvable and p.name not in config.fixed]
    wanted = config.space.parameters
    if wanted is not None:
        known = {p.name for p in method.params}
        unknown = [p for p in wanted if p not in known]
        if unknown:
            raise ConfigError(f"space.parameters: method {method.name!r} has no parameter(s) {unknown} "
                              f"(it takes: {', '.join(sorted(known))})")
        evolvable = [p for p in method.params if p.name in wanted]
    else:
        evolvable = [p for p in evolvable if p.per_model]
    for name in config.space.ranges:
        if name not in {p.name for p in evolvable}:
            raise ConfigError(f"space.ranges: {name!r} is not an evolved parameter")
    if config.prefix_maps:
        # a VLM merged with mapped LLMs: its vision tower and projector are copied, so no genes
        tensor_names = [n for n in tensor_names if describe_tensor(n, architecture).role != "vision"]
    cells = build_cells(tensor_names, architecture, layer_group_size=config.space.layer_group_size,
                        modules=config.space.modules)
    models = tuple(m for m in config.models if m not in config.hold_at_zero
                   and not (method.uses_base(config.base_model) and m == config.base_model))
    genes: list[Gene] = []
    for param in evolvable:
        low, high = config.space.ranges.get(param.name, (param.low, param.high))
        owners = [(i, m) for i, m in enumerate(models)] if param.per_model else [(0, GLOBAL)]
        for index, model in owners:
            for c, cell in enumerate(cells):
                tag = "g" if model == GLOBAL else f"m{index}"
                genes.append(Gene(key=f"{tag}.c{c}.{param.name}", model=model, param=param.name,
                                  cell=cell, low=float(low), high=float(high)))  # type: ignore[arg-type]
    if not genes:
        raise ConfigError(f"nothing to evolve: method {method.name!r} with parameters "
                          f"{[p.name for p in evolvable]} and models {list(models)}")
    return SearchSpace(config=config, method=method, cells=cells, genes=tuple(genes), models=models)
