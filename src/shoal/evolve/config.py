"""Configuration of an evolution run (YAML), validated.

Example::

    base_model: zoo:small/base
    models: [zoo:small/lang, zoo:small/math]
    method: dare_ties
    space:
      layer_group_size: 1           # per layer group of 1 layer; null: one value per model
      modules: [attention, mlp]     # optional: separate genes per module kind
      parameters: [weight, density] # default: every evolvable per-model parameter
      ranges: {weight: [0.0, 1.5]}
    fixed: {lambda: 1.0}
    fitness: {task: math_b, split: fitness, limit: 500}
    validation: {task: math_b, split: validation, limit: 500, top_k: 5}
    report: {tasks: [math_b, math_a, lang_b], split: test}
    search: {sampler: cmaes, trials: 200, seed: 0}
    # coarse-to-fine: 40 of the 200 trials over one gene per model and parameter (TPE), then
    # the per-layer CMA-ES from the best of them (step 0.2); null (default): one CMA-ES stage
    #   search: {sampler: cmaes, trials: 200, seed: 0, warm_start: {trials: 40, sampler: tpe, sigma0: 0.2}}
    # portfolio: shared genes (the uniform merges), per-source genes, then CMA-ES restarts
    #   search: {sampler: cmaes, trials: 120, portfolio: {shared_trials: 25, per_source_trials: 15,
    #            restarts: [{start: middle, trials: 45}, {start: best, sigma0: 0.2}]}}
    # a dfs run, model A's own layers first: 60 trials over them (the own-layers control's search),
    # then CMA-ES over every gene from the best of them
    #   search: {sampler: cmaes, trials: 120, own_layers_first: {trials: 60}}
    threads: 1                      # torch threads of each evaluator process
    task_seed: null                 # default: the seed of the models' zoo world (zoo:small@1/...)

A model (or the base) may be given as ``{model: REF, prefix_map: {...}}`` to merge a
vision-language model's language model with plain LLMs (EvoVLM-JP)::

    base_model: {model: llm/base, prefix_map: {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}}
    models:
      - vlm/llava                   # no map: the candidates are LLaVA models like this one
      - {model: llm/lang_b, prefix_map: {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}}
    hold_at_zero: []                # [llm/lang_b]: the VLM-only per-layer control

The maps are kept as ``prefix_maps`` (model -> map), the form a saved config has.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shoal.errors import ConfigError
from shoal.merge.recipe import _format_validation_error

ModuleKind = Literal["attention", "mlp", "norm"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SpaceConfig(_Strict):
    """Which genes exist: per model, per layer group, per module kind."""

    layer_group_size: int | None = None
    modules: list[ModuleKind] = Field(default_factory=list)
    parameters: list[str] | None = None
    ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _positive(self) -> "SpaceConfig":
        if self.layer_group_size is not None and self.layer_group_size < 1:
            raise ValueError("layer_group_size must be >= 1 (or null for one gene per model)")
        for name, (low, high) in self.ranges.items():
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"range of {name!r} must be finite, got [{low}, {high}]")
            if not low < high:
                raise ValueError(f"range of {name!r} must satisfy low < high, got [{low}, {high}]")
        return self


class EvalSpec(_Strict):
    """What a candidate is scored on: one task, or several (the score is their mean)."""

    task: str | list[str]
    split: Literal["train", "fitness", "validation", "test"]
    limit: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _some_task(self) -> "EvalSpec":
        if not self.tasks or any(not name.strip() for name in self.tasks):
            raise ValueError("task must name at least one task, and no name may be empty")
        return self

    @property
    def tasks(self) -> list[str]:
        return [self.task] if isinstance(self.task, str) else list(self.task)


class ValidationSpec(EvalSpec):
    split: Literal["train", "fitness", "validation", "test"] = "validation"
    top_k: int = Field(default=5, ge=1)


class ReportSpec(_Strict):
    tasks: list[str] = Field(default_factory=list)
    split: Literal["validation", "test"] = "test"
    limit: int | None = Field(default=None, ge=1)


class WarmStartSpec(_Strict):
    """The first stage of a coarse-to-fine search (:mod:`shoal.evolve.stages`): ``trials`` of the
    budget go to one gene per model and parameter (a uniform merge per source, so a source can
    go to weight 0), and the per-layer CMA-ES starts at the best of them with step ``sigma0``."""

    trials: int = Field(ge=1)  # part of search.trials, not added to it
    sampler: Literal["cmaes", "random", "tpe"] = "tpe"
    sigma0: float = Field(default=0.2, gt=0)  # of the per-layer CMA-ES around the warm start, gene units
    # a source whose warm-start weight is at most this (parameter units) keeps its warm-start
    # values in stage 2: its genes are not searched (None: every gene is searched)
    drop_below: float | None = Field(default=None, ge=0)


class RestartSpec(_Strict):
    """One CMA-ES restart of ``search.portfolio``: where its mean starts, its step and its trials."""

    start: Literal["best", "middle"]  # best: the best trial of every stage before it; middle: 0.5 everywhere
    trials: int | None = Field(default=None, ge=1)  # None: what the other stages leave (one start at most)
    sigma0: float | None = Field(default=None, gt=0)  # gene units; None: 1/6, the single stage's step


class PortfolioSpec(_Strict):
    """Stages and CMA-ES restarts sharing one budget (:mod:`shoal.evolve.portfolio`): a search over
    the genes every model and layer share (the uniform merges), one over a gene per model and
    parameter, then CMA-ES restarts over every gene, each from its own start point."""

    shared_trials: int = Field(default=0, ge=0)  # one gene per parameter, shared by every model and layer
    per_source_trials: int = Field(default=0, ge=0)  # one gene per model and parameter
    sampler: Literal["cmaes", "random", "tpe"] = "tpe"  # of the shared and per-source stages
    restarts: list[RestartSpec] = Field(min_length=1)

    def budgets(self, total: int) -> list[int]:
        """Trials of each restart out of ``total`` (the open one takes what is left)."""
        given = self.shared_trials + self.per_source_trials + sum(r.trials or 0 for r in self.restarts)
        return [r.trials if r.trials is not None else total - given for r in self.restarts]


class OwnLayersFirstSpec(_Strict):
    """A data-flow search in two stages (:mod:`shoal.evolve.dfs_stages`): ``trials`` of the budget
    over the first model's own layers (every other model's slots off: the own-layers control's
    space and search), then CMA-ES over every gene from the best of them, step ``sigma0``."""

    trials: int | None = Field(default=None, ge=1)  # part of search.trials; None: half of it
    sigma0: float | None = Field(default=None, gt=0)  # stage 2's step, gene units; None: search.sigma0 or 1/6

    def stage_trials(self, total: int) -> int:
        """Stage 1's share of ``total`` trials."""
        return self.trials if self.trials is not None else total // 2


class SearchSpec(_Strict):
    sampler: Literal["cmaes", "random", "tpe"] = "cmaes"
    trials: int = Field(default=100, ge=1)  # completed candidates: failed and killed ones are re-run
    seed: int = 0
    population: int | None = Field(default=None, ge=2)  # default: Optuna's 4 + floor(3 ln n)
    sigma0: float | None = Field(default=None, gt=0)  # in gene units; default: 1/6 of the range (the paper)
    with_margin: bool = False
    # None: one CMA-ES stage over every gene (the paper's search); else coarse-to-fine
    warm_start: WarmStartSpec | None = None
    # None: no portfolio; else shared / per-source stages and CMA-ES restarts (search.portfolio)
    portfolio: PortfolioSpec | None = None
    # None: one stage; else a dfs run searches model A's own layers first (search.own_layers_first)
    own_layers_first: OwnLayersFirstSpec | None = None

    @model_validator(mode="after")
    def _stages(self) -> "SearchSpec":
        if self.portfolio is not None:
            self._check_portfolio(self.portfolio)
        if self.own_layers_first is not None:
            self._check_own_layers_first(self.own_layers_first)
        if self.warm_start is None:
            return self
        if self.warm_start.trials >= self.trials:
            raise ValueError(f"warm_start.trials ({self.warm_start.trials}) is part of search.trials "
                             f"({self.trials}) and must be smaller, leaving trials to the per-layer stage")
        if self.sampler != "cmaes":
            raise ValueError(f"warm_start starts a CMA-ES at the best coarse point; search.sampler is "
                             f"{self.sampler!r} (use 'cmaes' or drop warm_start)")
        if self.sigma0 is not None:
            raise ValueError("search.sigma0 and warm_start are both given; the per-layer stage's step "
                             "is warm_start.sigma0")
        return self

    def _check_own_layers_first(self, olf: OwnLayersFirstSpec) -> None:
        first = olf.stage_trials(self.trials)
        if not 1 <= first < self.trials:
            raise ValueError(f"search.own_layers_first.trials ({first}) is part of search.trials ({self.trials}) "
                             "and must be at least 1 and smaller, leaving trials to the search over every gene")
        if self.sampler != "cmaes":
            raise ValueError(f"search.own_layers_first restarts CMA-ES at stage 1's best point; search.sampler "
                             f"is {self.sampler!r} (use 'cmaes' or drop own_layers_first)")
        if self.warm_start is not None or self.portfolio is not None:
            raise ValueError("search.own_layers_first is a data-flow (kind: dfs) search; search.warm_start "
                             "and search.portfolio are parameter-space ones: give one of them")

    def _check_portfolio(self, pf: PortfolioSpec) -> None:
        if self.warm_start is not None:
            raise ValueError("search.portfolio and search.warm_start are both given; the portfolio's "
                             "shared_trials and per_source_trials are its warm start")
        if self.sampler != "cmaes":
            raise ValueError(f"search.portfolio runs CMA-ES restarts; search.sampler is {self.sampler!r} "
                             "(use 'cmaes' or drop portfolio)")
        if self.sigma0 is not None:
            raise ValueError("search.sigma0 and search.portfolio are both given; each restart's step is "
                             "search.portfolio.restarts[i].sigma0")
        open_ = [i for i, r in enumerate(pf.restarts) if r.trials is None]
        if len(open_) > 1:
            raise ValueError(f"search.portfolio.restarts[{open_[1]}].trials: only one restart may take "
                             "what is left of the budget (trials: null)")
        given = pf.shared_trials + pf.per_source_trials + sum(r.trials or 0 for r in pf.restarts)
        if open_ and given >= self.trials:
            raise ValueError(f"search.portfolio.restarts[{open_[0]}].trials is null but the other stages "
                             f"take {given} of search.trials ({self.trials}), leaving it none")
        if not open_ and given != self.trials:
            raise ValueError(f"search.portfolio: shared_trials + per_source_trials + the restarts' trials "
                             f"is {given}, not search.trials ({self.trials}); the stages share the budget "
                             "exactly (or leave one restart's trials null)")


class DfsSpec(_Strict):
    """Data-flow space (arXiv 2403.13187, section 3.2): the indicator array over T = M * r slots
    and the scaling: the paper's M x M matrix W on transitions (the default), or one scale per slot."""

    repeats: int = Field(default=3, ge=1)
    max_hops: int | None = Field(default=None, ge=1)
    scaling: Literal["matrix", "per_slot"] = "matrix"
    scale_range: tuple[float, float] = (0.0, 2.0)

    @model_validator(mode="after")
    def _range(self) -> "DfsSpec":
        low, high = self.scale_range
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"scale_range must be finite with low < high, got [{low}, {high}]")
        return self


def _entry(raw: object, where: str) -> tuple[str, dict[str, str] | None]:
    """A model given as ``REF`` or ``{model: REF, prefix_map: {...}}``: its reference and map."""
    if isinstance(raw, str):
        return raw, None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a model is a reference or {{model: REF, prefix_map: {{...}}}}, "
                         f"got a {type(raw).__name__}")
    unknown = [k for k in raw if k not in ("model", "prefix_map")]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (a model entry has 'model' and 'prefix_map')")
    model, mapping = raw.get("model"), raw.get("prefix_map", {})
    if not isinstance(model, str) or not model:
        raise ValueError(f"{where}: 'model' must be a model reference")
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in mapping.items()):
        raise ValueError(f"{where}.prefix_map: a mapping of tensor-name prefixes to prefixes")
    return model, dict(mapping)


class EvolveConfig(_Strict):
    """A whole evolution run."""

    kind: Literal["ps", "dfs"] = "ps"
    dfs: DfsSpec = Field(default_factory=DfsSpec)
    base_model: str | None = None
    models: list[str]
    method: str = "dare_ties"
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    fixed: dict[str, float | bool] = Field(default_factory=dict)
    hold_at_zero: list[str] = Field(default_factory=list)
    fitness: EvalSpec
    validation: ValidationSpec | None = None
    report: ReportSpec = Field(default_factory=ReportSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    storage: str | None = None
    batch_size: int = Field(default=128, ge=1)
    device: str = "cpu"
    threads: int = Field(default=1, ge=1)  # torch threads per evaluator process (not part of the run)
    seed: int = 0  # the merge's seed (DARE's random draws)
    # the seed that fixes the task splits (zoo tasks); None: the seed of the zoo world the
    # models come from, else 0 -- a world's held-out splits are held out only from its own data
    task_seed: int | None = None
    # model -> the prefix map that shows it in the output's tensor names (from model entries)
    prefix_maps: dict[str, dict[str, str]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _model_entries(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        maps = dict(data.get("prefix_maps") or {})
        if isinstance(data.get("models"), list):
            refs = []
            for i, raw in enumerate(data["models"]):
                ref, mapping = _entry(raw, f"models[{i}]")
                refs.append(ref)
                if mapping:
                    maps[ref] = mapping
            data["models"] = refs
        if data.get("base_model") is not None:
            ref, mapping = _entry(data["base_model"], "base_model")
            data["base_model"] = ref
            if mapping:
                maps[ref] = mapping
        if maps:
            data["prefix_maps"] = maps
        return data

    @model_validator(mode="after")
    def _discipline(self) -> "EvolveConfig":
        if len(self.models) < 1:
            raise ValueError("'models' needs at least one model")
        if self.fitness.split == "test":
            raise ValueError("fitness.split is 'test': search must never see the test split "
                             "(use 'fitness')")
        if self.validation is not None and self.validation.split == "test":
            raise ValueError("validation.split is 'test': the final candidate must be picked on "
                             "'validation', test scores are only reported")
        if self.validation is not None and (self.validation.task, self.validation.split) == \
                (self.fitness.task, self.fitness.split):
            raise ValueError("validation uses the same task and split as fitness; pick the final "
                             "candidate on held-out data (split 'validation')")
        if self.kind == "dfs":
            if self.base_model is not None:
                raise ValueError("a dfs run has no base_model: the first of 'models' gives the "
                                 "embeddings, tokenizer and the fixed first and last layers")
            if len(self.models) < 2 and self.dfs.repeats < 2:
                raise ValueError("a dfs run needs two models, or one model with repeats >= 2")
        unknown = [m for m in self.hold_at_zero if m not in self.models]
        if unknown:
            raise ValueError(f"hold_at_zero names {unknown}, which are not in 'models'")
        stray = [m for m in self.prefix_maps if m not in self.models and m != self.base_model]
        if stray:
            raise ValueError(f"prefix_maps names {stray}, which are neither 'models' nor the base_model")
        if self.base_model in self.prefix_maps and all(m in self.prefix_maps for m in self.models):
            raise ValueError("base_model has a prefix_map, so one model needs none: the candidates "
                             "take its tensor names, config and processor (the VLM)")
        if self.search.warm_start is not None and (self.kind != "ps" or self.space.layer_group_size is None):
            raise ValueError("search.warm_start: the coarse stage searches one gene per model and "
                             "parameter before the per-layer genes, so it needs kind 'ps' and a "
                             "space.layer_group_size (this space has nothing finer to warm-start)")
        if self.search.portfolio is not None and (self.kind != "ps" or self.space.layer_group_size is None):
            raise ValueError("search.portfolio: its stages search shared and per-model genes before the "
                             "per-layer ones, so it needs kind 'ps' and a space.layer_group_size")
        if self.search.own_layers_first is not None and (self.kind != "dfs" or len(self.models) < 2):
            raise ValueError("search.own_layers_first: stage 1 searches the first model's own layers with "
                             "every other model's slots off, so it needs kind 'dfs' and at least two models")
        if self.prefix_maps and self.kind == "dfs":
            raise ValueError("prefix_map: a dfs run stacks whole decoder layers of like models; "
                             "prefix maps apply to parameter-space (ps) runs")
        return self


def parse_evolve_config(data: object, *, where: str = "config") -> EvolveConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: an evolve config is a mapping of keys")
    try:
        return EvolveConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, where)) from None


def load_evolve_config(path: str | Path) -> EvolveConfig:
    """Read an evolve config as recipes are read: UTF-8, bounded nesting, no duplicate keys, no
    tags that build objects; every problem is one :class:`ConfigError` naming the file."""
    from shoal.merge.strict_yaml import load_yaml_file

    path = Path(path)
    data = load_yaml_file(path, error=ConfigError, what="config")
    return parse_evolve_config(data, where=str(path))
