"""Pass 1 of two-pass inference: which expert should answer each prompt.

Strategies (Transformer², arXiv 2501.06252, section 3.2):

- ``prompt``: the model itself reads a classification prompt listing the expert categories
  and "other" (base weights); the category is read off by log-likelihood of the answers
  (``first-token``: one forward pass; ``loglik``: the whole answer, one pass per category) or
  by generating the answer (``generate``). The answer of a category is its name when the
  tokenizer gives every name a first token of its own, else its choice number
  (:func:`category_choices`): expert names such as ``math_a`` and ``lang_b`` are both
  ``<unk>`` to a word-level vocabulary like the zoo's.
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
from shoal.adapt.svf import SVFAdapter
from shoal.errors import ConfigError, TaskError
from shoal.eval.generation import generate_greedy
from shoal.eval.loglik import loglik
from shoal.eval.scoring import normalize_words
from shoal.eval.task import SPLITS, Example, Task

OTHER = "other"
ROUTING_TASK = "routing"  # the task name a classifier expert records (see :class:`RoutingTask`)
DEFAULT_TEMPLATE = "Classify the request into one of: {labels}.\nRequest: {prompt}\nCategory:"
LabelMode = Literal["first-token", "loglik", "generate"]


def routing_prompt(prompt: str, labels: Sequence[str], template: str = DEFAULT_TEMPLATE) -> str:
    """The pass-1 prompt: ``template`` with ``{prompt}`` and ``{labels}`` (comma-separated) filled in."""
    check_template(template)
    return template.format(prompt=prompt, labels=", ".join(labels))


def check_template(template: str) -> str:
    """ConfigError unless ``template`` is a format string with ``{prompt}`` and no field but
    ``{prompt}`` and ``{labels}`` (literal braces are written ``{{`` and ``}}``)."""
    import string

    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as err:
        raise ConfigError(f"template {template!r}: {err}; write literal braces as {{{{ and }}}}") from None
    for name, spec, conversion in fields:
        if name not in ("prompt", "labels") or spec or conversion:
            raise ConfigError(f"template {template!r}: unknown field {{{name}}}; use {{prompt}} and {{labels}}")
    if "prompt" not in [name for name, _, _ in fields]:
        raise ConfigError(f"template {template!r} has no {{prompt}}: every prompt would be classified alike")
    return template


def is_classifier(expert: Expert) -> bool:
    """Whether ``expert`` was trained as a classifier expert (on a :func:`routing_task`)."""
    return expert.meta.task == ROUTING_TASK


def check_roles(experts: Sequence[Expert], classifier: Expert | None = None) -> None:
    """ConfigError unless ``classifier`` (if any) was trained as a classifier expert and none of
    ``experts`` was (the metadata's task says which, see :func:`is_classifier`)."""
    for expert in experts:
        if is_classifier(expert):
            raise ConfigError(f"expert {expert.path or expert.name} is a classifier expert (task "
                              f"{ROUTING_TASK!r}); pass it as the classifier, not as an expert")
    if classifier is not None and not is_classifier(classifier):
        raise ConfigError(f"classifier {classifier.path or classifier.name} is not a classifier expert: it was "
                          f"trained on task {classifier.meta.task!r} (objective {classifier.meta.objective}), "
                          f"not on the {ROUTING_TASK!r} task that routing_task builds")


@dataclass(frozen=True)
class Choices:
    """The categories of pass 1 in the order the prompt lists them ("other" last), and what the
    model answers for each: the names themselves, or the choice numbers 1..K."""

    categories: tuple[str, ...]
    answers: tuple[str, ...]

    @property
    def numbered(self) -> bool:
        return self.answers != self.categories

    def listing(self) -> list[str]:
        """What ``{labels}`` lists: the names, or ``"1 math_a"``-style number-name pairs."""
        if not self.numbered:
            return list(self.categories)
        return [f"{answer} {category}" for answer, category in zip(self.answers, self.categories)]

    def category_of(self, answer_index: int) -> str:
        return self.categories[answer_index]


def category_choices(tokenizer: object | None, labels: Sequence[str]) -> Choices:
    """The pass-1 choices for expert ``labels`` plus "other".

    Names are the answers when ``tokenizer`` (None: assume it can) encodes each one, with a
    leading space, to a different first token. Otherwise the categories are numbered 1..K in
    sorted order ("other" last), so that a classifier expert trained on one order of experts
    routes the same way when given them in another; ConfigError when even the numbers share
    a first token."""
    names = list(dict.fromkeys(list(labels))) + ([OTHER] if OTHER not in labels else [])
    if tokenizer is None or _distinct_first_tokens(tokenizer, names):
        return Choices(tuple(names), tuple(names))
    ordered = sorted(n for n in names if n != OTHER) + [OTHER]
    numbers = [str(k) for k in range(1, len(ordered) + 1)]
    if not _distinct_first_tokens(tokenizer, numbers):
        label_token_ids(tokenizer, names)  # names the labels that collide
        raise ConfigError(f"category labels {names} share a first token and the choice numbers "
                          f"1..{len(numbers)} do too; choose labels the tokenizer tells apart")
    return Choices(tuple(ordered), tuple(numbers))


def _distinct_first_tokens(tokenizer: object, words: Sequence[str]) -> bool:
    rows = [_lm.encode(tokenizer, " " + word, special=False) for word in words]
    return all(rows) and len({row[0] for row in rows}) == len(rows)


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
    """Index of the label ``output`` starts with (word by word), or None."""
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
    """The category of each prompt, one of ``labels`` or :data:`OTHER` (read as in
    :func:`category_choices`: by name, or by choice number when the tokenizer cannot tell the
    names apart)."""
    choices = category_choices(tokenizer, labels)
    answers = list(choices.answers)
    contexts = [routing_prompt(p, choices.listing(), template) for p in prompts]
    if mode == "generate":
        budget = max(len(row) for row in label_token_ids(tokenizer, answers))
        outputs = generate_greedy(model, tokenizer, contexts, max_new_tokens=budget, batch_size=batch_size)
        picked = [_match_label(out, answers) for out in outputs]
        return [choices.category_of(j) if j is not None else OTHER for j in picked]
    scores = label_scores(model, tokenizer, contexts, answers, mode=mode, batch_size=batch_size)
    return [choices.category_of(j) for j in scores.argmax(-1).tolist()]


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
    interleaves the same number of examples from every source task. Each example's target is
    the category's answer in ``choices`` (its name unless :func:`category_choices` numbered
    them: pass ``routing_task(..., tokenizer=...)`` so training and dispatch agree). Train a
    classifier expert on it with ``train_svf`` (REINFORCE by default, as the reference does;
    ``objective="sft"`` is the next-token ablation).
    """

    sources: tuple[tuple[str, Task], ...]  # (label, task)
    template: str = DEFAULT_TEMPLATE
    per_task: int | None = None
    name: str = ROUTING_TASK
    kind: Literal["generate", "choice"] = "generate"
    choices: Choices | None = None  # None: the labels themselves, in the order given
    categories: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        labels = [label for label, _ in self.sources if label != OTHER]
        choices = self.choices or category_choices(None, labels)
        if set(choices.categories) != set(labels) | {OTHER}:
            raise ConfigError(f"routing choices {list(choices.categories)} do not match the labels {labels}")
        object.__setattr__(self, "choices", choices)
        object.__setattr__(self, "categories", choices.categories)

    @property
    def answers(self) -> tuple[str, ...]:
        assert self.choices is not None
        return self.choices.answers

    def answer_of(self, label: str) -> str:
        return self.answers[self.categories.index(label)]

    @property
    def max_new_tokens(self) -> int:
        # labels are words; a subword tokenizer may need a few tokens per word
        return 4 * max(len(answer.split()) for answer in self.answers)

    def examples(self, split: str) -> Sequence[Example]:
        if split not in SPLITS:
            raise TaskError(f"task {self.name!r} has no split {split!r}")
        per_source = [list(task.examples(split)) for _, task in self.sources]
        count = min(len(rows) for rows in per_source)
        if self.per_task is not None:
            count = min(count, self.per_task)
        assert self.choices is not None
        listing = self.choices.listing()
        out = []
        for i in range(count):
            for (label, _), rows in zip(self.sources, per_source):
                answer = self.answer_of(label)
                out.append(Example(routing_prompt(rows[i].prompt, listing, self.template), answer,
                                   completion=" " + answer))
        return out

    def score(self, output: str, example: Example) -> float:
        j = _match_label(output, self.answers)
        return float(j is not None and self.answers[j] == example.target)


def routing_task(experts_tasks: Sequence[tuple[str, Task]], *, other_tasks: Sequence[Task] = (),
                 template: str = DEFAULT_TEMPLATE, per_task: int | None = None,
                 tokenizer: object | None = None) -> RoutingTask:
    """The classification task for a classifier expert: (label, task) pairs, plus tasks whose
    prompts should be classified as "other". With ``tokenizer``, the answers are the ones
    :func:`classify` reads with that tokenizer (names, or choice numbers)."""
    check_template(template)
    labels = [label for label, _ in experts_tasks]
    repeated = sorted({label for label in labels if labels.count(label) > 1 or label == OTHER})
    if repeated:
        raise ConfigError(f"routing labels must be distinct and not {OTHER!r}; {repeated[0]!r} is not")
    sources = tuple(experts_tasks) + tuple((OTHER, t) for t in other_tasks)
    choices = category_choices(tokenizer, [label for label, _ in experts_tasks])
    return RoutingTask(sources, template, per_task, choices=choices)

