"""Multi-stage recipes: several merges in one YAML file, later stages naming earlier outputs.

mergekit's ``mergekit-multi`` format (its docs/multimerge.md), read anew: the file holds
recipes separated by ``---``; a recipe with a ``name`` is a stage whose output is written to
``INTERMEDIATE_DIR/<name>``; at most one recipe has no ``name``, the final merge, written to
the output folder. Wherever a recipe names a model (``base_model``, ``models``, ``slices``,
``tokenizer_source``...), a stage's name stands for that stage's output. Stages run in
dependency order (each after the stages it names, otherwise in file order); a stage that names
itself, directly or through others, is an error. Every named stage runs, as in mergekit, even
one that no later stage uses.

Resuming, as mergekit does (``--lazy``, the default): a stage whose output folder already holds
a ``config.json`` and weights is not merged again. Every stage is written as ``shoal merge``
writes (staged beside its destination and moved into place when complete), so a stage that
fails leaves nothing at its path; the stages before it stay complete and a rerun skips them.
Every recipe is validated before the first stage runs.

A file of one document is a plain recipe; two unnamed documents, a duplicate name, or a ``name``
that is not a string are errors (as in mergekit; ``mergekit-yaml`` refuses any file of several
documents).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from shoal.errors import RecipeError
from shoal.merge.recipe import Recipe, parse_recipe

# keys whose string values are not model references (a stage named like a dtype stays a dtype)
_NOT_MODELS = {"merge_method", "dtype", "out_dtype", "chat_template", "compat", "filter", "kind", "token"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Stage:
    """One merge of a multi-stage recipe: its ``name`` (None: the final merge) and what it needs."""

    name: str | None
    recipe: Recipe
    needs: tuple[str, ...]  # the stages whose outputs it names, in file order

    @property
    def label(self) -> str:
        return self.name if self.name is not None else "final merge"


def read_documents(path: str | Path) -> list[Any]:
    """The YAML documents of a recipe file (empty documents left out), read as strictly as a recipe."""
    from shoal.merge.strict_yaml import load_yaml_file

    return [doc for doc in load_yaml_file(Path(path), error=RecipeError, what="recipe", documents=True)
            if doc is not None]


def _patched(value: Any, names: set[str], folder: Path, used: list[str], key: str | None = None) -> Any:
    """``value`` with every model reference that is a stage name replaced by that stage's folder."""
    if isinstance(value, dict):
        return {k: _patched(v, names, folder, used, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_patched(v, names, folder, used, key) for v in value]
    if isinstance(value, str) and key not in _NOT_MODELS and value in names:
        if value not in used:
            used.append(value)
        return str(folder / value)
    return value


def parse_stages(documents: list[Any], intermediate_dir: str | Path, *, where: str = "recipe") -> list[Stage]:
    """The stages of a multi-stage recipe, in the order they run, every recipe validated."""
    folder = Path(intermediate_dir)
    named: list[tuple[str | None, dict]] = []
    for i, doc in enumerate(documents):
        if not isinstance(doc, dict):
            raise RecipeError(f"{where}: document {i + 1}: a recipe is a mapping of keys, got {type(doc).__name__}")
        body = dict(doc)
        name = body.pop("name", None)
        if name is not None and (not isinstance(name, str) or not name or "/" in name or name in (".", "..")):
            raise RecipeError(f"{where}: document {i + 1}: name {name!r} must be a folder name (a non-empty "
                              "string without '/')")
        if any(name == other for other, _ in named):
            raise RecipeError(f"{where}: document {i + 1}: " + (f"duplicate stage name {name!r}" if name is not None
                              else "a second recipe without a name (only the final merge has none)"))
        named.append((name, body))
    names = {n for n, _ in named if n is not None}
    stages: dict[str | None, Stage] = {}
    for i, (name, body) in enumerate(named):
        used: list[str] = []
        patched = _patched(body, names, folder, used)
        recipe = parse_recipe(patched, where=f"{where}: stage {name or 'final merge'} (document {i + 1})")
        stages[name] = Stage(name=name, recipe=recipe, needs=tuple(used))
    return _ordered(stages, where)


def _ordered(stages: dict[str | None, Stage], where: str) -> list[Stage]:
    order: list[Stage] = []
    done: set[str | None] = set()
    visiting: list[str | None] = []

    def visit(name: str | None) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = " -> ".join(str(n or "final merge") for n in visiting[visiting.index(name):] + [name])
            raise RecipeError(f"{where}: stages name each other in a circle: {cycle}")
        visiting.append(name)
        for need in stages[name].needs:
            visit(need)
        visiting.pop()
        done.add(name)
        order.append(stages[name])

    for name in stages:
        visit(name)
    return order


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished model (mergekit's test: a config and a weights file)."""
    return (folder / "config.json").is_file() and any((folder / n).is_file() for n in WEIGHT_FILES)


@dataclass(frozen=True)
class StageResult:
    """What happened to one stage: merged (with the tensors written) or skipped (already there)."""

    stage: Stage
    out: Path
    skipped: bool
    tensors: int = 0
    total_bytes: int = 0


def run_stages(stages: list[Stage], *, intermediate_dir: str | Path, out: str | Path | None, lazy: bool = True,
               lazy_final: bool | None = None, overwrite: bool = False,
               on_stage: Callable[[Stage, Path], None] | None = None, **merge_options: Any) -> list[StageResult]:
    """Merge every stage in order: named ones into ``intermediate_dir``, the final one into ``out``.

    ``lazy``: a named stage whose folder is already complete is skipped; without it, it is merged
    again in place of the old one. ``lazy_final`` (default: ``lazy``): the same for the final
    merge, which is replaced only with ``overwrite`` or without laziness. ``merge_options`` go to
    :func:`shoal.merge.merge` for every stage.
    """
    from shoal.merge.execute import merge

    folder = Path(intermediate_dir)
    if any(s.name is None for s in stages) and out is None:
        raise RecipeError("the recipe has a final merge (a recipe without a name): give the output folder")
    lazy_final = lazy if lazy_final is None else lazy_final
    results: list[StageResult] = []
    for stage in stages:
        if stage.name is None:
            target, skip, replace_it = Path(out), lazy_final and not overwrite, overwrite or not lazy_final  # type: ignore[arg-type]
        else:
            target, skip, replace_it = folder / stage.name, lazy, not lazy
        if skip and is_complete(target):
            results.append(StageResult(stage, target, skipped=True))
            continue
        if on_stage is not None:
            on_stage(stage, target)
        result = merge(stage.recipe, target, overwrite=replace_it, **merge_options)
        results.append(StageResult(stage, target, skipped=False, tensors=result.tensors,
                                   total_bytes=result.total_bytes))
    return results
