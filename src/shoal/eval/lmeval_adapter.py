"""Run an lm-evaluation-harness task as a shoal task (optional extra ``lmeval``).

``get_task("lmeval:<name>")`` finds a task in lm-eval's registry or in the local task folders
named by ``$SHOAL_LMEVAL_INCLUDE_PATH`` (lm-eval's ``--include_path``); ``lmeval:<path>.yaml``
loads a task defined in a local YAML file (its ``task:`` key names it, and the other YAML
files of its folder are available to it, e.g. as ``include:`` bases).

The other way round, :func:`register_lmeval_model` makes ``shoal`` a model of lm-eval's
registry (:mod:`shoal.eval.lmeval_model`), so lm-eval evaluates any model reference shoal
loads (layer-path models, ``zoo:`` names, run folders, PEFT adapters).

- ``generate_until`` tasks become generate tasks: the prompt is lm-eval's context (description
  and few-shot examples included), the budget its ``max_gen_toks`` and the stop strings its
  ``until``; an answer is passed through the task's first filter pipeline and scored with the
  task's first metric when that metric is averaged over documents (exact match, accuracy,
  ...), else by exact match of the filtered answer with the target.
- ``multiple_choice`` tasks become choice tasks scored by accuracy (lm-eval's ``acc``): the
  continuations are the target delimiter plus each choice.

Splits: ``test`` is the task's evaluation split (its test documents, else its validation
documents); ``validation`` is its validation split when it also has a separate test split;
``train`` and ``fitness`` are its training documents (lm-eval tasks have no fitness split of
their own, and search must not see the evaluation split).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Sequence

from shoal.errors import TaskError
from shoal.eval.scoring import normalize_words
from shoal.eval.task import Example

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for generate_until
INCLUDE_PATH_ENV = "SHOAL_LMEVAL_INCLUDE_PATH"


@dataclass(frozen=True)
class LmEvalExample(Example):
    """An example that remembers its lm-eval document and every acceptable answer."""

    doc: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    answers: tuple[str, ...] = ()


def include_paths(include_path: str | Path | Sequence[str | Path] | None = None) -> list[str]:
    """The local task folders lm-eval searches besides its own tasks: ``include_path`` (one
    folder or several), else the folders in the environment variable
    :data:`INCLUDE_PATH_ENV` (separated by ``os.pathsep``). A folder that does not exist is
    refused, naming it."""
    if include_path is None:
        raw = os.environ.get(INCLUDE_PATH_ENV, "")
        folders = [part for part in raw.split(os.pathsep) if part.strip()]
        where = f" (from {INCLUDE_PATH_ENV})"
    else:
        folders = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
        where = ""
    for folder in folders:
        if not Path(folder).is_dir():
            raise TaskError(f"{folder}: no such lm-eval task folder{where}")
    return [str(Path(folder)) for folder in folders]


def lmeval_task(spec: str, *, num_fewshot: int | None = None, fewshot_seed: int = 1234,
                include_path: str | Path | Sequence[str | Path] | None = None) -> "LmEvalTask":
    """The lm-eval task ``spec`` (a registered task name or a path to a task YAML file).

    A name is looked up in lm-eval's own tasks and in the local task folders of
    ``include_path`` (default: the folders named by ``$SHOAL_LMEVAL_INCLUDE_PATH``), through
    lm-eval's ``TaskManager(include_path=...)``. ``num_fewshot`` overrides the task's own
    setting (0 when it has none).
    """
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise TaskError(f"task lmeval:{spec} needs lm-eval: pip install 'shoal[lmeval]'") from err
    path = Path(spec)
    if spec.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise TaskError(f"{spec}: no such lm-eval task file")
        name = _yaml_task_name(path)
        manager = TaskManager(include_path=str(path.parent), include_defaults=False)
    else:
        name = spec
        folders = include_paths(include_path)
        manager = TaskManager(include_path=folders, include_defaults=False) if folders else None
        if manager is None or name not in manager.all_tasks:  # lm-eval's own ~10k task files last
            manager = TaskManager(include_path=folders or None)
    if name not in manager.all_tasks:
        close = [t for t in manager.all_tasks if name.lower() in t.lower()][:10]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise TaskError(f"unknown lm-eval task {name!r}{hint}")
    try:
        if hasattr(manager, "load"):  # newer lm-eval: flat dicts of tasks and groups
            loaded = manager.load([name])["tasks"]
        else:
            from lm_eval.tasks import get_task_dict

            loaded = get_task_dict([name], manager)
    except Exception as err:  # lm-eval raises many kinds (dataset download, config)
        raise TaskError(f"lm-eval task {name!r} cannot be loaded: {err}") from err
    task = _single_task(name, loaded)
    if num_fewshot is None:
        num_fewshot = task.get_config("num_fewshot") or 0
    if num_fewshot and hasattr(task, "set_fewshot_seed"):
        task.set_fewshot_seed(seed=fewshot_seed)
    return LmEvalTask(f"lmeval:{name}", task, num_fewshot)


def _yaml_task_name(path: Path) -> str:
    import yaml

    # Task YAML may carry lm-eval's own tags (!function); only the `task` key is needed here.
    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except (OSError, yaml.YAMLError) as err:
        raise TaskError(f"{path}: cannot read the task YAML ({err})") from err
    if not isinstance(config, dict):
        raise TaskError(f"{path}: the YAML has no 'task' name")
    name = config.get("group") if isinstance(config.get("task"), list) else config.get("task")
    if not isinstance(name, str):
        raise TaskError(f"{path}: the YAML has no 'task' name")
    return name


def _single_task(name: str, loaded: Mapping[Any, Any]) -> Any:
    """The one task in lm-eval's (possibly nested) task dict; groups are refused."""
    tasks = []

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for value in node.values():
                walk(value)
        elif node is not None and not isinstance(node, tuple):
            tasks.append(node)

    walk(loaded)
    if len(tasks) != 1:
        names = ", ".join(str(t.config.task) for t in tasks[:10])
        raise TaskError(f"lm-eval task {name!r} is a group of {len(tasks)} tasks; "
                        f"evaluate one of them: {names}")
    return tasks[0]


@dataclass(frozen=True)
class LmEvalTask:
    """A :class:`~shoal.eval.task.Task` backed by an lm-eval ``ConfigurableTask``."""

    name: str
    task: Any = field(repr=False)
    num_fewshot: int = 0

    def __post_init__(self) -> None:
        output_type = self.task.OUTPUT_TYPE
        if output_type not in ("generate_until", "multiple_choice"):
            raise TaskError(f"{self.name}: lm-eval output type {output_type!r} is not supported; "
                            "shoal runs generate_until and multiple_choice tasks")
        if getattr(self.task, "multiple_input", False):
            raise TaskError(f"{self.name}: tasks with one context per choice (multiple_input) "
                            "are not supported")

    @property
    def kind(self) -> Literal["generate", "choice"]:
        return "generate" if self.task.OUTPUT_TYPE == "generate_until" else "choice"

    @property
    def _generation_kwargs(self) -> dict[str, Any]:
        return dict(self.task.config.generation_kwargs or {})

    @property
    def max_new_tokens(self) -> int:
        return int(self._generation_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))

    @property
    def stop_strings(self) -> tuple[str, ...]:
        until = self._generation_kwargs.get("until") or ()
        return (until,) if isinstance(until, str) else tuple(until)

    @cached_property
    def _documents(self) -> dict[str, Any]:
        task = self.task
        has_test, has_validation = task.has_test_docs(), task.has_validation_docs()
        getters: dict[str, Any] = {}
        if has_test:
            getters["test"] = task.test_docs
        elif has_validation:
            getters["test"] = task.validation_docs
        if has_test and has_validation:
            getters["validation"] = task.validation_docs
        if task.has_training_docs():
            getters["train"] = getters["fitness"] = task.training_docs
        return getters

    @cached_property
    def _cache(self) -> dict[str, tuple[LmEvalExample, ...]]:
        return {}

    def examples(self, split: str) -> Sequence[Example]:
        if split not in self._documents:
            known = ", ".join(self._documents) or "none"
            raise TaskError(f"task {self.name!r} has no split {split!r}; splits: {known}")
        if split not in self._cache:
            self._cache[split] = tuple(self._example(doc) for doc in self._documents[split]())
        return self._cache[split]

    def _example(self, doc: Mapping[str, Any]) -> LmEvalExample:
        task = self.task
        prompt = task.fewshot_context(doc, self.num_fewshot)
        if not isinstance(prompt, str):
            raise TaskError(f"{self.name}: chat-style (message list) prompts are not supported")
        target = task.doc_to_target(doc)
        if self.kind == "choice":
            delimiter = task.config.target_delimiter
            options = [str(c) for c in task.doc_to_choice(doc)]
            golds = target if isinstance(target, list) else [target]
            indices = [options.index(g) if isinstance(g, str) else int(g) for g in golds]
            if any(not 0 <= i < len(options) for i in indices):
                raise TaskError(f"{self.name}: gold answer {target!r} is not one of the "
                                f"{len(options)} choices of document {dict(doc)}")
            choices = tuple(f"{delimiter}{c}" for c in options)
            answers = tuple(choices[i] for i in indices)
            return LmEvalExample(prompt, answers[0], choices=choices, doc=doc, answers=answers)
        if task.config.doc_to_choice is not None:
            target = task.doc_to_choice(doc)[target]
        answers = tuple(str(t) for t in target) if isinstance(target, list) else (str(target),)
        return LmEvalExample(prompt, answers[0], doc=doc, answers=answers)

    def score(self, output: str, example: Example) -> float:
        answers = getattr(example, "answers", ()) or (example.target,)
        if self.kind == "choice":
            return float(output in answers)
        filtered = self._filtered(output, example)
        doc = getattr(example, "doc", None)
        if self._metric is not None and doc is not None:
            value = self.task.process_results(doc, [filtered]).get(self._metric)
            if isinstance(value, (int, float)):
                return float(value)
        return float(any(normalize_words(str(filtered)) == normalize_words(a) for a in answers))

    def _filtered(self, output: str, example: Example) -> Any:
        """``output`` after the task's first filter pipeline (regex extraction, take_first...)."""
        ensembles = getattr(self.task, "_filters", None) or []
        if not ensembles:
            return output
        from lm_eval.api.instance import Instance

        instance = Instance(request_type="generate_until", doc=getattr(example, "doc", None) or {},
                            arguments=(example.prompt, self._generation_kwargs), idx=0)
        instance.resps = [output]
        ensembles[0].apply([instance])
        return instance.filtered_resps[ensembles[0].name]

    @cached_property
    def _metric(self) -> str | None:
        """The task's first metric when it is a per-document mean, else None."""
        from lm_eval.api.metrics import mean

        aggregations = self.task.aggregation()
        for metric in self.task._metric_fn_list:
            return metric if aggregations.get(metric) is mean else None
        return None


LMEVAL_MODEL_NAME = "shoal"


def register_lmeval_model() -> None:
    """Make ``shoal`` a model of lm-eval's registry (``--model shoal --model_args
    pretrained=REF``); the class, :class:`shoal.eval.lmeval_model.ShoalLM`, is imported only
    when lm-eval asks for it. Registering twice is harmless."""
    try:
        import lm_eval.models  # noqa: F401  (lm-eval's own models first: it fills an empty registry only)
        from lm_eval.api.registry import model_registry
    except ImportError as err:
        raise TaskError("the lm-eval model needs lm-eval: pip install 'shoal[lmeval]'") from err
    if LMEVAL_MODEL_NAME not in model_registry:
        model_registry.register(LMEVAL_MODEL_NAME, target="shoal.eval.lmeval_model:ShoalLM")
