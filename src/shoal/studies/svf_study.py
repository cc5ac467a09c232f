"""The Transformer² study on a zoo world: the numbers behind the adapt report.

1. One SVF expert per skill task (REINFORCE, reference parametrization by default) and a LoRA baseline with
   the same matrices, data, batches and steps: test scores vs the base, trainable parameters. LoRA is
   trained by next-token loss on the reference answers (``lora_objective="sft"``), our reading of the
   paper's baseline (not confirmed against its appendix); the paper reports LoRA trained by RL only as an ablation, and Sakana's reference
   code has no LoRA trainer); ``lora_objective="reinforce"`` trains it with SVF's REINFORCE instead
   (greedy rollouts, gradient clip 1e-3, as for SVF).
2. A classifier expert trained to name the skill of a prompt.
3. Two-pass inference on every skill task and on the held-out task with each strategy:
   ``base``, ``prompt`` (first-token log-likelihood, one forward pass), ``prompt-generate``
   (generating the label), ``classifier``, and on the held-out task ``few-shot`` (CEM alpha);
   with pass-1 / pass-2 times.
4. Optionally z transfer: the experts applied to another base of the same shapes (a world built
   with another seed), next to experts trained on that base with the same settings.

Selection uses only ``train``/``validation`` (and ``fitness`` for the few-shot examples);
``test`` is only reported.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from shoal.adapt import _lm
from shoal.adapt.dispatch import routing_task
from shoal.adapt.expert import load_expert
from shoal.adapt.svd_cache import load_or_compute_svd
from shoal.adapt.svf import SVFAdapter
from shoal.adapt.train import train_svf
from shoal.adapt.two_pass import adapt_evaluate
from shoal.errors import ConfigError
from shoal.progress import ProgressFn, no_progress

# category labels must be words of the zoo's vocabulary, or they would all encode to <unk>
DEFAULT_LABELS = {"math_a": "many", "lang_b": "now", "sort": "sort", "count": "count"}
DEFAULT_TEMPLATE = "{prompt} question : {labels} ? answer :"


class StudySettings(BaseModel):
    """What the study trains and evaluates."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    labels: dict[str, str] = DEFAULT_LABELS  # skill task -> category label
    held_out: str = "math_b"
    template: str = DEFAULT_TEMPLATE
    objective: str = "reinforce"  # experts and the classifier expert, as in the reference
    parametrization: str = "reference"
    steps: int = 300
    batch_size: int = 32
    micro_batch_size: int = 16  # SVF: chunks whose gradients add up to the batch's (the same step, less memory)
    lr: float = 2e-3
    classifier_lr: float = 1e-2
    kl: float = 0.0
    lora_rank: int = 4
    lora_lr: float = 1e-3
    lora_objective: str = "sft"  # the paper's LoRA baseline: next-token prediction
    matrices: list[str] | None = None  # regexes of the adapted weight names (SVF and LoRA); None: the MLP
    eval_every: int = 50
    validation_limit: int = 200
    limit: int | None = 500  # test examples per task
    shots: int = 10
    cem_iterations: int = 50
    cem_population: int = 32
    seed: int = 0
    eval_batch_size: int = 64


LORA_CLIP = {"sft": 1.0, "reinforce": 1e-3}  # next-token fine-tuning's usual clip; SVF's REINFORCE clip


def lora_args(s: StudySettings) -> dict[str, Any]:
    """The training arguments of the LoRA baseline: SVF's batches, steps and validation, and its
    own objective (``s.lora_objective``); REINFORCE rollouts are greedy, as SVF's."""
    if s.lora_objective not in LORA_CLIP:
        raise ConfigError(f"unknown LoRA objective {s.lora_objective!r}; use 'sft' or 'reinforce'")
    return dict(objective=s.lora_objective, steps=s.steps, batch_size=s.batch_size, eval_every=s.eval_every,
                validation_limit=s.validation_limit, seed=s.seed, clip=LORA_CLIP[s.lora_objective], sample=False)


SETTINGS_FILE = "settings.json"
LORA_RECORD = "study-record.json"  # a finished LoRA baseline's result, beside its adapter


def _claim_folder(out: Path, settings: StudySettings, resume: bool) -> None:
    """Write ``out/settings.json``; with ``resume``, an existing one must hold the same settings."""
    path = out / SETTINGS_FILE
    wanted = settings.model_dump(mode="json")
    if resume and path.exists():
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: cannot read the settings of the run to resume ({err})") from None
        if found != wanted:
            keys = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise ConfigError(f"{path}: the run to resume has other settings ({', '.join(keys)}); "
                              f"resume with the same ones or use another folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wanted, indent=1))


def _lora(model: Any, tokenizer: Any, task: Any, folder: Path, s: StudySettings, resume: bool) -> Any:
    """The LoRA baseline for ``task``: trained, or read back from ``folder`` when resuming a run
    that finished it (the record is written after the adapter, so its presence means both are whole)."""
    from shoal.studies.lora_baseline import LoRAResult, train_lora
    from shoal.adapt.train import TrainRecord

    record = folder / LORA_RECORD
    if resume and record.exists():
        data = json.loads(record.read_text())
        history = tuple(TrainRecord(**r) for r in data.pop("history"))
        return LoRAResult(path=folder, history=history, **data)
    lora = train_lora(model, tokenizer, task, out=folder, rank=s.lora_rank, lr=s.lora_lr, kl=s.kl,
                      patterns=s.matrices, **lora_args(s))  # type: ignore[arg-type]
    fields = {k: v for k, v in dataclasses.asdict(lora).items() if k not in ("path", "history")}
    record.write_text(json.dumps({**fields, "history": _history(lora.history)}))
    return lora


def _test_score(model: Any, tokenizer: Any, task: Any, limit: int | None, batch_size: int) -> float:
    examples = list(task.examples("test"))[:limit]
    scores = _lm.score_examples(model, tokenizer, task, examples, batch_size=batch_size)
    return sum(scores) / len(scores)


def _history(records: Any) -> list[dict[str, float]]:
    """Each validation point (step, mean training loss since the last one, validation score)."""
    return [{"step": r.step, "loss": r.loss, "validation": r.validation} for r in records]


def _row(result: Any) -> dict[str, Any]:
    return {"score": result.score, "n": result.n, "categories": result.categories, "pass1_s": result.pass1_seconds,
            "pass2_s": result.pass2_seconds, "overhead": result.overhead, "alpha": result.alpha}


def run_study(world: Any, out: Path, settings: StudySettings = StudySettings(), *, transfer_world: Any = None,
              resume: bool = False, progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Run the study on ``world`` (a :class:`shoal.zoo.ZooWorld`); experts and results go to ``out``.

    ``resume``: continue an interrupted run in ``out`` with the same settings (``settings.json``
    there): SVF trainings continue from their last validation, a finished LoRA baseline is read
    back instead of retrained; the evaluations are redone (they are deterministic)."""
    from shoal.eval import load_model

    lora_args(settings)  # a bad LoRA objective fails before anything is trained
    out = Path(out)
    _claim_folder(out, settings, resume)
    model, tokenizer = load_model(world.model("base"))
    svd_dir = out / "svd"
    s = settings
    factors = load_or_compute_svd(model, patterns=s.matrices, cache_dir=svd_dir)
    adapter = SVFAdapter(model, factors, parametrization=s.parametrization)  # type: ignore[arg-type]
    train_args = dict(objective=s.objective, steps=s.steps, batch_size=s.batch_size,
                      micro_batch_size=s.micro_batch_size, eval_every=s.eval_every,
                      validation_limit=s.validation_limit, seed=s.seed)
    results: dict[str, Any] = {"settings": s.model_dump(), "world": str(world.root), "experts": {}}
    paths: dict[str, Path] = {}
    for i, (task_name, label) in enumerate(s.labels.items()):
        task = world.task(task_name)
        svf = train_svf(model, tokenizer, task, out=out / f"svf-{task_name}.safetensors", lr=s.lr, kl=s.kl,
                        label=label, factors=factors, resume=resume, parametrization=s.parametrization,
                        **train_args)  # type: ignore[arg-type]
        paths[task_name] = svf.path
        lora = _lora(model, tokenizer, task, out / f"lora-{task_name}", s, resume)
        from peft import PeftModel

        lora_model = PeftModel.from_pretrained(copy.deepcopy(model), str(lora.path)).eval()
        with adapter.applied(load_expert(svf.path, factors).z):
            svf_test = _test_score(model, tokenizer, task, s.limit, s.eval_batch_size)
        results["experts"][task_name] = {
            "label": label, "base": _test_score(model, tokenizer, task, s.limit, s.eval_batch_size),
            "svf": svf_test, "lora": _test_score(lora_model, tokenizer, task, s.limit, s.eval_batch_size),
            "svf_parameters": svf.num_parameters, "lora_parameters": lora.num_parameters,
            "base_validation": svf.base_score, "svf_validation": svf.best_score, "svf_best_step": svf.best_step,
            "lora_validation": lora.best_score, "lora_best_step": lora.best_step,
            "svf_seconds_per_step": svf.seconds_per_step, "lora_seconds_per_step": lora.seconds_per_step,
            "svf_history": _history(svf.history), "lora_history": _history(lora.history)}
        del lora_model
        progress("experts", i + 1, len(s.labels))
    routing = routing_task([(label, world.task(t)) for t, label in s.labels.items()], template=s.template)
    began = time.perf_counter()
    clf = train_svf(model, tokenizer, routing, out=out / "classifier.safetensors", lr=s.classifier_lr,
                    label="router", factors=factors, resume=resume, parametrization=s.parametrization,
                    **train_args)  # type: ignore[arg-type]
    results["classifier"] = {"validation": clf.best_score, "base_validation": clf.base_score,
                             "best_step": clf.best_step, "seconds": time.perf_counter() - began}
    experts = [paths[t] for t in s.labels]
    strategies: list[tuple[str, str, dict[str, Any]]] = [
        ("base", "base", {}), ("prompt", "prompt", {"mode": "first-token"}),
        ("prompt-generate", "prompt", {"mode": "generate"}),
        ("classifier", "classifier", {"classifier": clf.path})]
    results["two_pass"] = {}
    tasks = list(s.labels) + [s.held_out]
    for i, task_name in enumerate(tasks):
        task = world.task(task_name)
        rows = {}
        extra = [("few-shot", "few-shot", {"n_shots": s.shots})] if task_name == s.held_out else []
        for name, strategy, kwargs in strategies + extra:
            result = adapt_evaluate(model, tokenizer, task, "test", experts,
                                    strategy=strategy,  # type: ignore[arg-type]
                                    limit=s.limit, template=s.template, cem_iterations=s.cem_iterations,
                                    cem_population=s.cem_population, seed=s.seed, batch_size=s.eval_batch_size,
                                    cache_dir=svd_dir, **kwargs)
            rows[name] = _row(result)
        results["two_pass"][task_name] = rows
        progress("two-pass", i + 1, len(tasks))
    if transfer_world is not None:
        results["transfer"] = _transfer(transfer_world, paths, s, out / "transfer", train_args, resume, progress)
    return results


def _transfer(world: Any, paths: dict[str, Path], s: StudySettings, out: Path, train_args: dict[str, Any],
              resume: bool, progress: ProgressFn) -> dict[str, Any]:
    """Each expert applied, unchanged, to another base of the same shapes (``transfer=True``), next
    to that base alone and to an expert trained on that base with the same settings (the ceiling)."""
    from shoal.eval import load_model

    model, tokenizer = load_model(world.model("base"))
    factors = load_or_compute_svd(model, patterns=s.matrices, cache_dir=out / "svd")
    adapter = SVFAdapter(model, factors, parametrization=s.parametrization)  # type: ignore[arg-type]
    rows = {}
    for i, (task_name, path) in enumerate(paths.items()):
        task = world.task(task_name)
        expert = load_expert(path, factors, transfer=True)
        with adapter.applied(expert.z):
            moved = _test_score(model, tokenizer, task, s.limit, s.eval_batch_size)
        own = train_svf(model, tokenizer, task, out=out / f"svf-{task_name}.safetensors", lr=s.lr, kl=s.kl,
                        label=s.labels[task_name], factors=factors, resume=resume,
                        parametrization=s.parametrization, **train_args)  # type: ignore[arg-type]
        with adapter.applied(load_expert(own.path, factors).z):
            own_test = _test_score(model, tokenizer, task, s.limit, s.eval_batch_size)
        rows[task_name] = {"base": _test_score(model, tokenizer, task, s.limit, s.eval_batch_size),
                           "svf_transferred": moved, "svf_own": own_test}
        progress("transfer", i + 1, len(paths))
    return {"world": str(world.root), "tasks": rows}
