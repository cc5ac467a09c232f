"""Train an SVF expert: z vectors for the adapted matrices, by REINFORCE (+ KL) or next-token loss.

The defaults are those of Sakana's reference code (SakanaAI/self-adaptive-llms,
``cfgs/config.yaml``, ``cfgs/optimization/reinforce.yaml``, ``policy/base.py``):

- ``parametrization="reference"``: a logit p per singular value, initialised to
  ``init_value`` (0.1) plus 0.01 * N(0, 1) noise, z = sigmoid(p), and W' rescaled by
  sum(S) / sum(S * z) (:mod:`shoal.adapt.svf`). ``"direct"`` trains z itself from 1.
- REINFORCE on greedy completions of the adapted model, reward +1 / -1, no baseline, plus
  ``kl`` (default 0) times KL(base || adapted) summed over the completion
  (:func:`shoal.adapt.reinforce.reference_row_losses`).
- a batch of 256 examples drawn without replacement (at most the train split), processed in
  chunks of ``micro_batch_size`` whose gradients accumulate, so the step equals one step on
  the whole batch; Adam (no weight decay), lr 2e-3, gradient norm clipped to 1e-3.

Each step's batch depends only on ``seed`` and the step number, so a resumed run sees the
same batches. Every ``eval_every`` steps the expert is scored on the ``validation`` split;
the best z so far (z = 1, the base, included) is what the expert file holds. The training
state (parameters, optimizer state, step, best) is saved next to the expert file as
``<out>.train-state.pt`` at each validation, and a run with ``resume=True`` continues from it
(:mod:`shoal.adapt.train_state`: written atomically, checked before it is used).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import nn

from shoal.adapt import _lm
from shoal.adapt.expert import make_meta, save_expert
from shoal.adapt.reinforce import (reference_row_losses, rewards_from_scores, sequence_kl, sequence_logprobs,
                                   sft_loss, shape_rewards)
from shoal.adapt.svd_cache import SVDFactors, load_or_compute_svd
from shoal.adapt.svf import Parametrization, SVFAdapter, check_parametrization
from shoal.adapt.train_state import load_state, restore_optimizer, save_state, state_path
from shoal.errors import ConfigError
from shoal.eval.task import Example, Task
from shoal.progress import ProgressFn, no_progress

Objective = Literal["reinforce", "sft"]
INIT_NOISE = 0.01  # std of the Gaussian noise on the initial logits (reference: policy/base.py)


@dataclass(frozen=True)
class TrainRecord:
    """One validation point of a training run."""

    step: int
    loss: float  # mean training loss since the previous record
    validation: float


@dataclass(frozen=True)
class TrainResult:
    path: Path
    best_step: int
    best_score: float
    base_score: float
    steps: int
    num_parameters: int
    seconds_per_step: float  # training steps only, measured in this process
    history: tuple[TrainRecord, ...]


def _batch_indices(n: int, batch_size: int, seed: int, step: int) -> tuple[list[int], torch.Generator]:
    """``min(batch_size, n)`` distinct indices (the reference draws without replacement)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randperm(n, generator=generator)[: min(batch_size, n)].tolist(), generator


def initial_parameters(factors: SVDFactors, parametrization: Parametrization, *, init_value: float = 0.1,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """The trainable vectors at step 0: logits ``init_value + 0.01 * N(0, 1)`` (reference) or ones (direct)."""
    if parametrization == "direct":
        return {n: torch.ones_like(factors.S[n]) for n in factors.names}
    generator = torch.Generator().manual_seed(seed)
    return {n: init_value + INIT_NOISE * torch.randn(factors.rank(n), generator=generator) for n in factors.names}


def to_z(params: dict[str, torch.Tensor], parametrization: Parametrization) -> dict[str, torch.Tensor]:
    """The z vectors an expert file holds: sigmoid of the logits (reference) or the vectors themselves."""
    if parametrization == "direct":
        return dict(params)
    return {n: torch.sigmoid(v) for n, v in params.items()}


@torch.no_grad()
def rollouts(adapter: SVFAdapter, tokenizer: object, task: Task, batch: Sequence[Example],
             z: dict[str, torch.Tensor], *, sample: bool, generator: torch.Generator,
             chunk: int) -> tuple[list[list[int]], torch.Tensor]:
    """Completions (token ids) of the adapted model for ``batch``, and their task scores (B,)."""
    completions: list[list[int]] = []
    scores: list[float] = []
    with adapter.applied({n: v.detach() for n, v in z.items()}):
        for start in range(0, len(batch), chunk):
            rows = batch[start: start + chunk]
            outputs, ids = _lm.generate(adapter.model, tokenizer, [ex.prompt for ex in rows],
                                        max_new_tokens=task.max_new_tokens, batch_size=len(rows), sample=sample,
                                        generator=generator)
            completions.extend(ids)
            scores.extend(float(task.score(out, ex)) for out, ex in zip(outputs, rows))
    return completions, torch.tensor(scores)


def reinforce_rows(adapter: SVFAdapter, tokenizer: object, batch: Sequence[Example], completions: list[list[int]],
                   rewards: torch.Tensor, z: dict[str, torch.Tensor], *, kl: float) -> torch.Tensor:
    """Differentiable :func:`reference_row_losses` of given completions and rewards -> (B,)."""
    pad = _lm.pad_id(tokenizer)
    prompts = [_lm.encode(tokenizer, ex.prompt, special=True) for ex in batch]
    packed = _lm.pack(prompts, [c if c else [pad] for c in completions], pad, adapter.device)
    logits = adapter.forward(z, input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits
    logp = sequence_logprobs(logits, packed.input_ids, packed.completion_mask)
    seq_kl = None
    if kl > 0:
        with torch.no_grad():
            ref = adapter.model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits
        seq_kl = sequence_kl(logits, ref, packed.completion_mask)
    return reference_row_losses(logp, rewards.to(logp.device), kl, seq_kl)


def svf_step_loss(adapter: SVFAdapter, tokenizer: object, task: Task, batch: Sequence[Example],
                  z: dict[str, torch.Tensor], *, objective: Objective, kl: float, sample: bool,
                  generator: torch.Generator, reward_norm: bool = False) -> torch.Tensor:
    """The differentiable loss of one batch (the model's weights must be the base weights).

    REINFORCE: (1/len(batch)) * sum of :func:`reference_row_losses` over completions generated
    by the adapted model (greedy, or sampled with ``sample``). SFT: the mean next-token loss."""
    if objective == "sft":
        pad = _lm.pad_id(tokenizer)
        prompts = [_lm.encode(tokenizer, ex.prompt, special=True) for ex in batch]
        completions = [_lm.encode(tokenizer, ex.reference, special=False) for ex in batch]
        packed = _lm.pack(prompts, completions, pad, adapter.device)
        logits = adapter.forward(z, input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits
        return sft_loss(logits, packed.input_ids, packed.completion_mask)
    completions, scores = rollouts(adapter, tokenizer, task, batch, z, sample=sample, generator=generator,
                                   chunk=len(batch))
    rewards = shape_rewards(rewards_from_scores(scores), normalize=reward_norm)
    return reinforce_rows(adapter, tokenizer, batch, completions, rewards, z, kl=kl).sum() / len(batch)


def validation_score(adapter: SVFAdapter, tokenizer: object, task: Task, examples: Sequence[Example],
                     z: dict[str, torch.Tensor] | None, *, batch_size: int) -> float:
    with adapter.applied(z):
        scores = _lm.score_examples(adapter.model, tokenizer, task, examples, batch_size=batch_size)
    return sum(scores) / max(1, len(scores))


def train_svf(model: nn.Module, tokenizer: object, task: Task, *, out: Path, objective: Objective = "reinforce",
              parametrization: Parametrization = "reference", kl: float = 0.0, lr: float = 2e-3, steps: int = 300,
              batch_size: int = 256, micro_batch_size: int = 16, clip: float = 1e-3, eval_every: int = 10,
              validation_limit: int | None = 200, resume: bool = True, seed: int = 0, sample: bool = False,
              init_value: float = 0.1, reward_norm: bool = False, label: str | None = None,
              factors: SVDFactors | None = None,
              patterns: Sequence[str] | None = None, cache_dir: Path | None = None,
              progress: ProgressFn = no_progress) -> TrainResult:
    """Train an SVF expert for ``task`` on ``model`` (see the module docstring); writes ``out``.

    ``objective="reinforce"``: reward +1/-1 from ``task.score`` on greedy completions of the
    adapted model (sampled at temperature 1 with ``sample=True``), plus ``kl`` times
    KL(base || adapted) summed over the completion. ``objective="sft"``: next-token loss on
    each example's reference completion (an ablation; the paper trains SVF by REINFORCE).
    ``init_value`` is the initial logit of the reference parametrization. ``reward_norm``
    standardises the rewards over each batch (the reference's ``rw_norm`` option, off there by
    default): a baseline, without which a model that is almost always wrong only gets -1s.
    """
    if objective not in ("reinforce", "sft"):
        raise ConfigError(f"unknown SVF objective {objective!r}; use 'reinforce' or 'sft'")
    check_parametrization(parametrization)
    if steps < 1 or batch_size < 1 or micro_batch_size < 1 or eval_every < 1 or lr <= 0 or kl < 0 or clip <= 0:
        raise ConfigError("steps, batch_size, micro_batch_size and eval_every must be >= 1, lr and clip > 0 "
                          "and kl >= 0")
    out = Path(out)
    train = list(task.examples("train"))
    val = list(task.examples("validation"))[:validation_limit]
    if not train or not val:
        raise ConfigError(f"task {task.name} needs non-empty train and validation splits for SVF training")
    factors = factors or load_or_compute_svd(model, patterns=patterns, cache_dir=cache_dir, progress=progress)
    adapter = SVFAdapter(model, factors, parametrization=parametrization)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.requires_grad_(False)
    model.eval()  # no dropout: the loss must be a function of z only
    settings = _Settings(objective, parametrization, kl, lr, steps, batch_size, micro_batch_size, clip, eval_every,
                         resume, seed, sample, init_value, label, reward_norm)
    try:
        return _run(adapter, tokenizer, task, train, val, out=out, s=settings, progress=progress)
    finally:
        adapter.restore()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)


@dataclass(frozen=True)
class _Settings:
    objective: Objective
    parametrization: Parametrization
    kl: float
    lr: float
    steps: int
    batch_size: int
    micro_batch_size: int
    clip: float
    eval_every: int
    resume: bool
    seed: int
    sample: bool
    init_value: float
    label: str | None
    reward_norm: bool = False


def _accumulate(adapter: SVFAdapter, tokenizer: object, task: Task, batch: list[Example],
                params: dict[str, torch.Tensor], s: _Settings, generator: torch.Generator) -> float:
    """Backward of the batch loss chunk by chunk (gradients add up in ``params``); returns the loss.

    REINFORCE: every completion is generated first (the weights do not change within a step),
    so rewards can be normalised over the whole batch; then each chunk adds sum(rows) / B."""
    total = 0.0
    chunks = range(0, len(batch), s.micro_batch_size)
    if s.objective == "reinforce":
        with torch.no_grad():
            z = to_z(params, s.parametrization)
        completions, scores = rollouts(adapter, tokenizer, task, batch, z, sample=s.sample, generator=generator,
                                       chunk=s.micro_batch_size)
        rewards = shape_rewards(rewards_from_scores(scores), normalize=s.reward_norm)
        for start in chunks:
            end = start + s.micro_batch_size
            rows = reinforce_rows(adapter, tokenizer, batch[start:end], completions[start:end], rewards[start:end],
                                  to_z(params, s.parametrization), kl=s.kl)
            loss = rows.sum() / len(batch)
            loss.backward()
            total += float(loss.detach())
        return total
    for start in chunks:
        chunk = batch[start: start + s.micro_batch_size]
        loss = svf_step_loss(adapter, tokenizer, task, chunk, to_z(params, s.parametrization), objective=s.objective,
                             kl=s.kl, sample=s.sample, generator=generator) * (len(chunk) / len(batch))
        loss.backward()
        total += float(loss.detach())
    return total


def _run(adapter: SVFAdapter, tokenizer: object, task: Task, train: list[Example], val: list[Example], *,
         out: Path, s: _Settings, progress: ProgressFn) -> TrainResult:
    factors = adapter.factors
    device = adapter.device
    params = {n: v.to(device).requires_grad_() for n, v in
              initial_parameters(factors, s.parametrization, init_value=s.init_value, seed=s.seed).items()}
    optimizer = torch.optim.Adam(list(params.values()), lr=s.lr)  # no decay: it would pull z (or p) to 0
    eval_batch = s.micro_batch_size
    start, history = 0, []
    ckpt = state_path(out)
    if s.resume and ckpt.exists():
        state = load_state(ckpt, fingerprint=factors.fingerprint, objective=s.objective,
                           parametrization=s.parametrization, task=task.name,
                           ranks={n: factors.rank(n) for n in factors.names})
        with torch.no_grad():
            for n in factors.names:
                params[n].copy_(state["params"][n])
        restore_optimizer(ckpt, optimizer, state["optimizer"])
        start = int(state["step"])
        best_z = {n: v.to(device) for n, v in state["best_z"].items()}
        best_score, best_step, base_score = state["best_score"], int(state["best_step"]), state["base_score"]
        history = [TrainRecord(**r) for r in state["history"]]
    else:
        base_score = validation_score(adapter, tokenizer, task, val, None, batch_size=eval_batch)
        best_z, best_score, best_step = factors.ones(), base_score, 0

    def save(step: int) -> None:
        meta = make_meta(factors, task=task.name, label=s.label, objective=s.objective,
                         parametrization=s.parametrization, steps=step, kl=s.kl, lr=s.lr,
                         scores={"validation": best_score, "base_validation": base_score,
                                 "best_step": float(best_step)})
        save_expert(out, best_z, meta)
        with torch.no_grad():
            z_now = {n: v.detach().cpu() for n, v in to_z(params, s.parametrization).items()}
        save_state(ckpt, {"fingerprint": factors.fingerprint, "objective": s.objective,
                          "parametrization": s.parametrization, "task": task.name, "step": step,
                          "params": {n: v.detach().cpu() for n, v in params.items()}, "z": z_now,
                          "optimizer": optimizer.state_dict(),
                          "best_z": {n: v.detach().cpu() for n, v in best_z.items()}, "best_score": best_score,
                          "best_step": best_step, "base_score": base_score,
                          "history": [r.__dict__ for r in history]})

    losses: list[float] = []
    elapsed, timed = 0.0, 0
    for step in range(start, s.steps):
        began = time.perf_counter()
        indices, generator = _batch_indices(len(train), s.batch_size, s.seed, step)
        optimizer.zero_grad(set_to_none=True)
        loss = _accumulate(adapter, tokenizer, task, [train[i] for i in indices], params, s, generator)
        torch.nn.utils.clip_grad_norm_(list(params.values()), s.clip)
        optimizer.step()
        diverged = next((n for n, v in params.items() if not bool(torch.isfinite(v).all())), None)
        if diverged is not None:  # NaN would spread to every later step; the last saved state is intact
            raise ConfigError(f"training diverged at step {step + 1}: the vector of {diverged} holds NaN or "
                              f"infinite values (lr {s.lr:g}, clip {s.clip:g}); use a smaller lr or clip")
        elapsed += time.perf_counter() - began
        timed += 1
        losses.append(loss)
        progress("train", step + 1, s.steps)
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            with torch.no_grad():
                current = {n: v.detach().clone() for n, v in to_z(params, s.parametrization).items()}
            score = validation_score(adapter, tokenizer, task, val, current, batch_size=eval_batch)
            history.append(TrainRecord(step + 1, sum(losses) / len(losses), score))
            losses = []
            if score > best_score:
                best_z, best_score, best_step = current, score, step + 1
            save(step + 1)
    if not out.exists() or not ckpt.exists():  # e.g. resumed a finished run whose expert was deleted
        save(max(start, s.steps))
    return TrainResult(out, best_step, best_score, base_score, s.steps, factors.num_values,
                       elapsed / max(1, timed), tuple(history))
