"""Pass 1 of two-pass inference: which expert should answer each prompt.

Strategies (Transformer², arXiv 2501.06252, section 3.2):

- ``prompt``: the model itself reads a classification prompt listing the expert categories
  and "other" (base weights); the category is read off by log-likelihood of the labels
  (``first-token``: one forward pass, the labels' first tokens must differ; ``loglik``: the
  whole label, one pass per label) or by generating the label (``generate``).
- ``classifier``: the same, with an SVF expert trained (by REINFORCE, as the reference
  trains it, on :func:`routing_task`) to answer with the category label.
- ``few-shot``: no per-prompt choice; z' = sum_k alpha_k z_k with alpha found by CEM on a few
  labelled examples of the new task (:func:`shoal.adapt.few_shot.few_shot_mixture`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import nn

from shoal.adapt import _lm
from shoal.adapt.expert import Expert
from shoal.adapt.few_shot import FewShotMixture, few_shot_mixture  # noqa: F401 (re-exported)
from shoal.adapt.reinforce import sequence_logprobs
from shoal.adapt.svf import SVFAdapter
from shoal.errors import ConfigError, TaskError
from shoal.eval.generation import generate_greedy
from shoal.eval.loglik import loglik
from shoal.eval.scoring import normalize_words
from shoal.eval.task import SPLITS, Example, Task

OTHER = "other"
DEFAULT_TEMPLATE = "Classify the request into one of: {labels}.\nRequest: {prompt}\nCategory:"
LabelMode = Literal["first-token", "loglik", "generate"]


def routing_prompt(prompt: str, labels: Sequence[str], template: str = DEFAULT_TEMPLATE) -> str:
    """The pass-1 prompt: ``template`` with ``{prompt}`` and ``{labels}`` (comma-separated) filled in."""
    return template.format(prompt=prompt, labels=", ".join(labels))


def label_token_ids(tokenizer: object, labels: Sequence[str]) -> list[list[int]]:
    """Token ids of ``" " + label`` for each label; ConfigError when two labels encode the same
    (e.g. both unknown to a word-level vocabulary) or a label encodes to nothing."""
    ids = [_lm.encode(tokenizer, " " + label, special=False) for label in labels]
    for label, row in zip(labels, ids):
        if not row:
            raise ConfigError(f"category label {label!r} encodes to no tokens")
    seen: dict[tuple[int, ...], str] = {}
    for label, row in zip(labels, ids):
        if tuple(row) in seen:
            raise ConfigError(f"category labels {seen[tuple(row)]!r} and {label!r} encode to the same "
                              f"tokens {row}; choose labels the tokenizer tells apart")
        seen[tuple(row)] = label
    return ids


@torch.no_grad()
def label_scores(model: nn.Module, tokenizer: object, contexts: Sequence[str], labels: Sequence[str], *,
                 mode: Literal["first-token", "loglik"] = "first-token", batch_size: int = 16) -> torch.Tensor:
    """(N, L) log-likelihood of each label after each context.

    ``first-token``: log p(first token of the label | context), all labels from one forward pass
    per batch of contexts. ``loglik``: log p(whole label | context), by :func:`shoal.eval.loglik`."""
    ids = label_token_ids(tokenizer, labels)
    device = _lm.model_device(model)
    pad = _lm.pad_id(tokenizer)
    if mode == "first-token":
        firsts = [row[0] for row in ids]
        if len(set(firsts)) < len(firsts):
            raise ConfigError(f"labels {list(labels)} share a first token; use mode 'loglik' or 'generate'")
        rows = []
        for start in range(0, len(contexts), batch_size):
            prompts = [_lm.encode(tokenizer, c, special=True) for c in contexts[start: start + batch_size]]
            packed = _lm.pack(prompts, [[] for _ in prompts], pad, device)
            logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits
            last = packed.attention_mask.sum(-1) - 1  # right padding: the last real token
            logp = torch.log_softmax(logits[torch.arange(len(prompts), device=device), last].float(), dim=-1)
            rows.append(logp[:, firsts].cpu())
        return torch.cat(rows)
    if mode != "loglik":
        raise ConfigError(f"unknown label scoring mode {mode!r}")
    values = loglik(model, tokenizer, [c for c in contexts for _ in labels],
                    [" " + label for _ in contexts for label in labels], batch_size=batch_size)
    return torch.tensor(values, dtype=torch.float32).view(len(contexts), len(labels))


def _match_label(output: str, labels: Sequence[str]) -> int | None:
    words = normalize_words(output).split()
    if not words:
        return None
    for j, label in enumerate(labels):
        wanted = normalize_words(label).split()
        if words[: len(wanted)] == wanted:
            return j
    return None


def classify(model: nn.Module, tokenizer: object, prompts: Sequence[str], labels: Sequence[str], *,
             mode: LabelMode = "first-token", template: str = DEFAULT_TEMPLATE,
             batch_size: int = 16) -> list[str]:
    """The category of each prompt, one of ``labels`` or :data:`OTHER`."""
    categories = list(labels) + ([OTHER] if OTHER not in labels else [])
    contexts = [routing_prompt(p, categories, template) for p in prompts]
    if mode == "generate":
        budget = max(len(row) for row in label_token_ids(tokenizer, categories))
        outputs = generate_greedy(model, tokenizer, contexts, max_new_tokens=budget, batch_size=batch_size)
        picked = [_match_label(out, categories) for out in outputs]
        return [categories[j] if j is not None else OTHER for j in picked]
    scores = label_scores(model, tokenizer, contexts, categories, mode=mode, batch_size=batch_size)
    return [categories[j] for j in scores.argmax(-1).tolist()]


def dispatch_prompt(adapter: SVFAdapter, tokenizer: object, prompts: Sequence[str], experts: Sequence[Expert], *,
                    mode: LabelMode = "first-token", template: str = DEFAULT_TEMPLATE,
                    batch_size: int = 16) -> list[int | None]:
    """Index of the expert for each prompt (None: base weights), chosen by the base model."""
    with adapter.applied(None):
        cats = classify(adapter.model, tokenizer, prompts, [e.name for e in experts], mode=mode,
                        template=template, batch_size=batch_size)
    return _to_indices(cats, experts)


def dispatch_classifier(adapter: SVFAdapter, tokenizer: object, prompts: Sequence[str],
                        experts: Sequence[Expert], classifier: Expert, *, mode: LabelMode = "first-token",
                        template: str = DEFAULT_TEMPLATE, batch_size: int = 16) -> list[int | None]:
    """Index of the expert for each prompt (None: base weights), chosen by the classifier expert."""
    with adapter.applied(classifier.z):
        cats = classify(adapter.model, tokenizer, prompts, [e.name for e in experts], mode=mode,
                        template=template, batch_size=batch_size)
    return _to_indices(cats, experts)


def _to_indices(categories: Sequence[str], experts: Sequence[Expert]) -> list[int | None]:
    index = {e.name: k for k, e in enumerate(experts)}
    return [index.get(c) for c in categories]


@dataclass(frozen=True)
class RoutingTask:
    """Implements :class:`~shoal.eval.task.Task`: a task's prompt -> its category label.

    Built from the expert tasks (and optionally tasks that should map to "other"); each split
    interleaves the same number of examples from every source task. Train a classifier expert
    on it with ``train_svf`` (REINFORCE by default, as the reference does; ``objective="sft"``
    is the next-token ablation).
    """

    sources: tuple[tuple[str, Task], ...]  # (label, task)
    template: str = DEFAULT_TEMPLATE
    per_task: int | None = None
    name: str = "routing"
    kind: Literal["generate", "choice"] = "generate"
    categories: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        labels = [label for label, _ in self.sources]
        object.__setattr__(self, "categories", tuple(dict.fromkeys(labels + [OTHER])))

    @property
    def max_new_tokens(self) -> int:
        # labels are words; a subword tokenizer may need a few tokens per word
        return 4 * max(len(label.split()) for label in self.categories)

    def examples(self, split: str) -> Sequence[Example]:
        if split not in SPLITS:
            raise TaskError(f"task {self.name!r} has no split {split!r}")
        per_source = [list(task.examples(split)) for _, task in self.sources]
        count = min(len(rows) for rows in per_source)
        if self.per_task is not None:
            count = min(count, self.per_task)
        out = []
        for i in range(count):
            for (label, _), rows in zip(self.sources, per_source):
                out.append(Example(routing_prompt(rows[i].prompt, self.categories, self.template), label,
                                   completion=" " + label))
        return out

    def score(self, output: str, example: Example) -> float:
        j = _match_label(output, self.categories)
        return float(j is not None and self.categories[j] == example.target)


def routing_task(experts_tasks: Sequence[tuple[str, Task]], *, other_tasks: Sequence[Task] = (),
                 template: str = DEFAULT_TEMPLATE, per_task: int | None = None) -> RoutingTask:
    """The classification task for a classifier expert: (label, task) pairs, plus tasks whose
    prompts should be classified as "other"."""
    sources = tuple(experts_tasks) + tuple((OTHER, t) for t in other_tasks)
    return RoutingTask(sources, template, per_task)
