"""Merge recipes: mergekit's documented YAML format, validated, plus a few shoal keys.

Accepted as in mergekit: ``models`` (each ``model`` with ``parameters``) or ``slices`` (each with
``sources`` of ``model`` + ``layer_range`` and optional ``parameters``), ``merge_method``,
``base_model`` (also per slice), ``parameters`` (scalars, gradient lists interpolated over
layers, or lists of ``filter``/``value`` entries), ``dtype`` (what the merge computes in),
``out_dtype`` (what it writes), ``tokenizer_source``, ``chat_template`` (a built-in name such as
``chatml``, ``auto``, or a Jinja template).

``modules`` (mergekit's multi-module recipes: per module of a vision-language model,
``text_decoder`` / ``vision_tower`` / ``multi_modal_projector``, or ``default`` for a
single-module model, its own ``models`` or ``slices`` and ``parameters``).

shoal keys: ``seed`` (random methods), ``compat`` (``paper`` or ``mergekit``: which definition
of methods whose mergekit results differ from their papers), per-model ``prefix_map`` (rename a
model's tensors, e.g. to merge the language model inside a vision-language checkpoint).

Unknown keys are errors that name the key.
"""

from __future__ import annotations

from pathlib import Path
import math
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError,
                      field_validator, model_validator)

from shoal.errors import RecipeError

DTYPES = ("float32", "float16", "bfloat16")
DTypeName = Literal["float32", "float16", "bfloat16"]

Scalar = Union[bool, float]


def _number(raw: Any, what: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ValueError(f"{what} must be a number, got {_shown(raw)}")
    if not math.isfinite(raw):
        raise ValueError(f"{what} must be a finite number, got {raw}")
    return float(raw)


def _shown(raw: Any) -> str:
    if isinstance(raw, bool):
        return "true" if raw else "false"
    return repr(raw) if isinstance(raw, (str, int, float)) else f"a {type(raw).__name__}"


def _value(raw: Any, *, filters: bool) -> Any:
    """A parameter value: true/false, a number, a gradient (a non-empty list of numbers) or, where
    ``filters``, a non-empty list of ``filter``/``value`` entries. One shape, one message."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, (int, float)):
        return _number(raw, "a value")
    if not isinstance(raw, list):
        raise ValueError(f"expected a number, true/false or a list, got {_shown(raw)}")
    if not raw:
        raise ValueError("an empty list: give a number, a gradient of numbers"
                         + (" or filter entries" if filters else ""))
    if filters and all(isinstance(entry, (dict, FilterValue)) for entry in raw):
        entries = []
        for i, entry in enumerate(raw):
            if isinstance(entry, FilterValue):  # built in code (evolve's genomes), already checked
                entries.append(entry)
                continue
            try:
                entries.append(FilterValue.model_validate(entry))
            except ValidationError as err:
                first = err.errors()[0]
                key = str(first["loc"][0]) if first["loc"] else ""
                problem = (f"unknown key {key!r} (an entry has 'filter' and 'value')"
                           if first["type"] == "extra_forbidden" else f"{key}: {first['msg']}")
                raise ValueError(f"filter entry {i}: {problem}") from None
        return entries
    return [_number(v, f"gradient entry {i}") for i, v in enumerate(raw)]


class FilterValue(BaseModel):
    """One entry of a filtered parameter: applies to tensors whose name contains ``filter``.

    An entry without ``filter`` is the default for tensors no earlier entry matched.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    filter: str | None = None
    value: Annotated[Union[Scalar, list[float]], PlainValidator(lambda raw: _value(raw, filters=False)),
                     PlainSerializer(lambda value: _plain(value))]


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, FilterValue):
        return value.model_dump(mode="json", exclude_none=True)
    return value


ParamValue = Annotated[Union[Scalar, list[float], list[FilterValue]],
                       PlainValidator(lambda raw: _value(raw, filters=True)), PlainSerializer(_plain)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    """A source model in a ``models`` recipe."""

    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    prefix_map: dict[str, str] = Field(default_factory=dict)


class SliceSource(_Strict):
    """A source of one slice: layers ``layer_range[0]`` up to (excluding) ``layer_range[1]``."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    prefix_map: dict[str, str] = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0 or end <= start:
            raise ValueError(f"layer_range {list(value)} must satisfy 0 <= start < end")
        return value


class Slice(_Strict):
    """One output slice: its sources are merged layer by layer (all have the same length).

    ``base_model``: this slice's base, in place of the recipe's (it must be one of the sources).
    """

    sources: list[SliceSource]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    base_model: str | None = None

    @model_validator(mode="after")
    def _same_lengths(self) -> "Slice":
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(f"the sources of a slice must have layer ranges of equal length, got "
                             f"{[list(s.layer_range) for s in self.sources]}")
        return self


class Module(_Strict):
    """One module of a multi-module model (mergekit's ``modules:``): its own ``models`` or
    ``slices``, and ``parameters`` that apply before the recipe's."""

    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _models_or_slices(self) -> "Module":
        if (not self.models) == (not self.slices):
            raise ValueError("a module needs exactly one of 'models' or 'slices' (not empty)")
        return self


class Recipe(_Strict):
    """A validated merge recipe."""

    merge_method: str
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    modules: dict[str, Module] | None = None
    base_model: str | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: DTypeName | None = None
    out_dtype: DTypeName | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    seed: int | None = None
    compat: Literal["paper", "mergekit"] = "paper"
    base_prefix_map: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _models_or_slices(self) -> "Recipe":
        if sum(part is not None for part in (self.models, self.slices, self.modules)) != 1:
            raise ValueError("a recipe needs exactly one of 'models', 'slices' or 'modules'")
        if self.modules is not None and not self.modules:
            raise ValueError("'modules' is empty")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty")
        if self.slices is not None and not self.slices:
            raise ValueError("'slices' is empty")
        if self.tokenizer_source == "union":
            raise ValueError("tokenizer_source 'union' (building a merged vocabulary) is not "
                             "supported; use 'base' or one of the models")
        return self

    def source_models(self) -> list[str]:
        """Every model the recipe names, base first when given, without duplicates, in order."""
        names: list[str] = []
        if self.base_model is not None:
            names.append(self.base_model)
        parts = [(self.models, self.slices)] if self.modules is None else [
            (m.models, m.slices) for m in self.modules.values()]
        for models, slices in parts:
            names.extend(m.model for m in models or [])
            for s in slices or []:
                names.extend(src.model for src in s.sources)
                if s.base_model is not None:
                    names.append(s.base_model)
        return list(dict.fromkeys(names))

    @property
    def compat_given(self) -> bool:
        """Whether the recipe chose its mode (``compat``) or left it at the default."""
        return "compat" in self.model_fields_set

    def to_yaml(self, *, keep: tuple[str, ...] = ()) -> str:
        """The recipe as YAML, without keys left at their defaults except the top-level keys in ``keep``."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        for key in keep:
            data.setdefault(key, getattr(self, key))
        return yaml.safe_dump(data, sort_keys=False)


def _format_validation_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = f"unknown key {str(first['loc'][-1])!r}"
    elif first["type"] == "value_error":  # our validators' own words, without pydantic's prefix
        message = str(first.get("ctx", {}).get("error", message))
    more = len(err.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{where}: {loc}: {message}{suffix}"


def parse_recipe(data: Any, *, where: str = "recipe") -> Recipe:
    """Validate a recipe given as plain data (what ``yaml.safe_load`` returns)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a mapping of keys, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation_error(err, where)) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe: UTF-8, plain data (no tags that build Python objects), no
    key given twice, not nested absurdly deep (:mod:`shoal.merge.strict_yaml`)."""
    from shoal.merge.strict_yaml import load_yaml_file

    path = Path(path)
    data = load_yaml_file(path, error=RecipeError, what="recipe")
    return parse_recipe(data, where=str(path))
