"""The YAML config of ``shoal moe``: mergekit-moe's format.

    base_model: path/or/hub-id          # attention, norms, embeddings and head come from here
    gate_mode: hidden                   # hidden | hidden_avg | cheap_embed | random | uniform_random
    dtype: bfloat16                     # optional; default: the base model's
    experts_per_token: 2
    experts:
      - source_model: path/to/expert-a  # its MLPs become expert 0 of every layer
        positive_prompts: ["..."]
        negative_prompts: ["..."]       # optional
        noise_scale: 0.01               # optional: Gaussian noise added to the expert's MLP
        residual_scale: 0.5             # optional: its down projection scaled
    shared_experts:                     # Qwen2-MoE output only: exactly one
      - source_model: path/to/shared
        positive_prompts: ["..."]
    architecture: mixtral               # optional: mixtral | qwen (default: Mixtral when it fits)

Unknown keys are an error naming them. ``seed`` (shoal's) makes ``random`` gates and expert
noise reproducible.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shoal.errors import RecipeError

LOG = logging.getLogger(__name__)

GateMode = Literal["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random"]
PROMPTED_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")
# keys mergekit-moe accepts and ignores that published configs carry; each runs with a warning
IGNORED_KEYS = {"tokenizer_source": "the base model's tokenizer is copied"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpertSpec(_Strict):
    """One dense model whose MLPs become one expert of every layer."""

    source_model: str
    positive_prompts: tuple[str, ...] | None = None
    negative_prompts: tuple[str, ...] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None

    def prompts_key(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(self.positive_prompts or ()), tuple(self.negative_prompts or ())


class MoeConfig(_Strict):
    """A mixture-of-experts build: base model, routed experts, optional shared experts, gates."""

    base_model: str
    experts: tuple[ExpertSpec, ...] = Field(min_length=1)
    gate_mode: GateMode = "hidden"
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    experts_per_token: int = 2
    shared_experts: tuple[ExpertSpec, ...] | None = None
    architecture: str | None = None
    seed: int | None = None

    def source_models(self) -> list[str]:
        """Every model named, base first, each once."""
        names = [self.base_model, *(e.source_model for e in self.experts),
                 *(e.source_model for e in self.shared_experts or ())]
        return list(dict.fromkeys(names))

    def gated_experts(self) -> list[ExpertSpec]:
        """The experts that get router rows: the routed ones, then shared ones with prompts
        (or every shared one when the gates are random)."""
        gated = list(self.experts)
        shared = list(self.shared_experts or ())
        if shared and (self.gate_mode not in PROMPTED_MODES or any(e.positive_prompts for e in shared)):
            gated.extend(shared)
        return gated

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def check_moe_config(config: MoeConfig, *, where: str = "moe config", allow_all_same: bool = False) -> None:
    """The checks mergekit-moe makes before building, as :class:`RecipeError` naming the key.

    ``allow_all_same`` lets every expert be the same model (mergekit's
    ``--i-understand-this-is-not-useful-without-training``): useful only as a start for training.
    """
    if config.experts_per_token < 1:
        raise RecipeError(f"{where}: experts_per_token: must be at least 1, got {config.experts_per_token}")
    if len(config.experts) < config.experts_per_token:
        raise RecipeError(f"{where}: experts_per_token is {config.experts_per_token} but there are only "
                          f"{len(config.experts)} experts")
    for kind, experts in (("experts", config.experts), ("shared_experts", config.shared_experts or ())):
        for index, expert in enumerate(experts):
            if expert.noise_scale is not None and expert.noise_scale < 0:
                raise RecipeError(f"{where}: {kind}.{index}.noise_scale: must not be negative, "
                                  f"got {expert.noise_scale}")
    if config.gate_mode in PROMPTED_MODES:
        for index, expert in enumerate(config.experts):
            if not expert.positive_prompts:
                raise RecipeError(f"{where}: experts.{index}.positive_prompts: gate_mode {config.gate_mode} "
                                  "needs prompts for every expert (or use gate_mode: random)")
        shared = config.shared_experts or ()
        if shared and len({bool(e.positive_prompts) for e in shared}) > 1:
            raise RecipeError(f"{where}: shared_experts: give positive_prompts to every shared expert or to none")
        if len(config.experts) > 1 and len({e.prompts_key() for e in config.experts}) == 1:
            raise RecipeError(f"{where}: experts: every expert has the same prompts, so the router cannot tell "
                              "them apart; give each expert prompts for what it should handle")
    if not allow_all_same and len({e.source_model for e in config.experts}) == 1:
        raise RecipeError(f"{where}: experts: every expert is {config.experts[0].source_model}; the MoE would "
                          "cost more and compute the same as that model (allow it only to train the result: "
                          "pass allow_all_same=True)")


def _format_validation_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = f"unknown key {str(first['loc'][-1])!r}"
    more = len(err.errors()) - 1
    return f"{where}: {loc}: {message}" + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def parse_moe_config(data: Any, *, where: str = "moe config") -> MoeConfig:
    """Validate a config given as plain data (what ``yaml.safe_load`` returns)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a MoE config is a mapping of keys, got {type(data).__name__}")
    data = dict(data)
    for key, reason in IGNORED_KEYS.items():
        if key in data:
            LOG.warning("%s: %s has no effect on a MoE build (%s)", where, key, reason)
            data.pop(key)
    try:
        return MoeConfig.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation_error(err, where)) from None


def load_moe_config(path: str | Path) -> tuple[MoeConfig, str]:
    """Read and validate a YAML MoE config; also return its text (saved beside the model)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read MoE config {path}: {getattr(err, 'strerror', None) or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}: invalid YAML{at}: {getattr(err, 'problem', None) or err}") from None
    return parse_moe_config(data, where=str(path)), text
