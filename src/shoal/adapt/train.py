"""Train an SVF expert: z vectors for the adapted matrices, by REINFORCE (+ KL) or next-token loss.

z starts at 1 (the base model). Each step draws a batch of ``train`` examples (the draw
depends only on ``seed`` and the step number, so a resumed run sees the same batches), builds
W' = U diag(S*z) Vh differentiably and takes an AdamW step with gradient clipping. Every
``eval_every`` steps the expert is scored on the ``validation`` split; the best z so far
(z = 1, the base, included) is what the expert file holds. The training state (z, optimizer
state, step, best) is saved next to the expert file as ``<out>.train-state.pt`` at each
validation, and a run with ``resume=True`` continues from it.
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
from shoal.adapt.reinforce import (kl_divergence, reinforce_loss, rewards_from_scores, sequence_logprobs,
                                   sft_loss)
from shoal.adapt.svd_cache import SVDFactors, load_or_compute_svd
from shoal.adapt.svf import SVFAdapter
from shoal.errors import ConfigError
from shoal.eval.task import Example, Task
from shoal.progress import ProgressFn, no_progress

Objective = Literal["reinforce", "sft"]


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


def state_path(out: Path) -> Path:
    """Where the resumable training state of the expert ``out`` lives."""
    return out.with_name(out.name + ".train-state.pt")


def _batch_indices(n: int, batch_size: int, seed: int, step: int) -> tuple[list[int], torch.Generator]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(n, (batch_size,), generator=generator).tolist(), generator


def svf_step_loss(adapter: SVFAdapter, tokenizer: object, task: Task, batch: Sequence[Example],
                  z: dict[str, torch.Tensor], *, objective: Objective, kl: float, sample: bool,
                  generator: torch.Generator) -> torch.Tensor:
    """The differentiable loss of one batch (the model's weights must be the base weights)."""
    model = adapter.model
    pad = _lm.pad_id(tokenizer)
    prompts = [_lm.encode(tokenizer, ex.prompt, special=True) for ex in batch]
    if objective == "sft":
        completions = [_lm.encode(tokenizer, ex.reference, special=False) for ex in batch]
        packed = _lm.pack(prompts, completions, pad, adapter.device)
        logits = adapter.forward(z, input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits
        return sft_loss(logits, packed.input_ids, packed.completion_mask)
    detached = {n: v.detach() for n, v in z.items()}
    with adapter.applied(detached):
        outputs, completions = _lm.generate(model, tokenizer, [ex.prompt for ex in batch],
                                            max_new_tokens=task.max_new_tokens, batch_size=len(batch),
                                            sample=sample, generator=generator)
    scores = torch.tensor([task.score(out, ex) for out, ex in zip(outputs, batch)])
    completions = [c if c else [pad] for c in completions]
    packed = _lm.pack(prompts, completions, pad, adapter.device)
    logits = adapter.forward(z, input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits
    logp = sequence_logprobs(logits, packed.input_ids, packed.completion_mask)
    loss = reinforce_loss(logp, rewards_from_scores(scores).to(logp.device))
    if kl > 0:
        with torch.no_grad():
            ref = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits
        loss = loss + kl * kl_divergence(logits, ref, packed.completion_mask)
    return loss


def validation_score(adapter: SVFAdapter, tokenizer: object, task: Task, examples: Sequence[Example],
                     z: dict[str, torch.Tensor] | None, *, batch_size: int) -> float:
    with adapter.applied(z):
        scores = _lm.score_examples(adapter.model, tokenizer, task, examples, batch_size=batch_size)
    return sum(scores) / max(1, len(scores))


def train_svf(model: nn.Module, tokenizer: object, task: Task, *, out: Path, objective: Objective = "reinforce",
              kl: float = 0.0, lr: float = 2e-3, steps: int = 300, batch_size: int = 16, clip: float = 1.0,
              eval_every: int = 50, validation_limit: int | None = 200, resume: bool = True, seed: int = 0,
              sample: bool = True, label: str | None = None, factors: SVDFactors | None = None,
              patterns: Sequence[str] | None = None, cache_dir: Path | None = None,
              progress: ProgressFn = no_progress) -> TrainResult:
    """Train an SVF expert for ``task`` on ``model`` (see the module docstring); writes ``out``.

    ``objective="reinforce"``: reward +1/-1 from ``task.score`` on completions sampled from the
    adapted model (greedy with ``sample=False``), plus ``kl`` times the KL to the base.
    ``objective="sft"``: next-token loss on each example's reference completion.
    """
    if objective not in ("reinforce", "sft"):
        raise ConfigError(f"unknown SVF objective {objective!r}; use 'reinforce' or 'sft'")
    if steps < 1 or batch_size < 1 or eval_every < 1 or lr <= 0 or kl < 0:
        raise ConfigError("steps, batch_size and eval_every must be >= 1, lr > 0 and kl >= 0")
    out = Path(out)
    train = list(task.examples("train"))
    val = list(task.examples("validation"))[:validation_limit]
    if not train or not val:
        raise ConfigError(f"task {task.name} needs non-empty train and validation splits for SVF training")
    factors = factors or load_or_compute_svd(model, patterns=patterns, cache_dir=cache_dir, progress=progress)
    adapter = SVFAdapter(model, factors)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.requires_grad_(False)
    model.eval()  # no dropout: the loss must be a function of z only
    try:
        return _run(adapter, tokenizer, task, train, val, out=out, objective=objective, kl=kl, lr=lr, steps=steps,
                    batch_size=batch_size, clip=clip, eval_every=eval_every, resume=resume, seed=seed,
                    sample=sample, label=label, progress=progress)
    finally:
        adapter.restore()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)


def _run(adapter: SVFAdapter, tokenizer: object, task: Task, train: list[Example], val: list[Example], *,
         out: Path, objective: Objective, kl: float, lr: float, steps: int, batch_size: int, clip: float,
         eval_every: int, resume: bool, seed: int, sample: bool, label: str | None,
         progress: ProgressFn) -> TrainResult:
    factors = adapter.factors
    z = {n: torch.ones_like(adapter.S[n], requires_grad=True) for n in factors.names}
    optimizer = torch.optim.AdamW(list(z.values()), lr=lr, weight_decay=0.0)  # decay would pull z to 0, not 1
    start, history = 0, []
    ckpt = state_path(out)
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state["fingerprint"] != factors.fingerprint or state["objective"] != objective:
            raise ConfigError(f"training state {ckpt} belongs to another base or objective; "
                              f"remove it or pass resume=False (--no-resume)")
        with torch.no_grad():
            for n in factors.names:
                z[n].copy_(state["z"][n])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        best_z = {n: v.to(adapter.device) for n, v in state["best_z"].items()}
        best_score, best_step, base_score = state["best_score"], int(state["best_step"]), state["base_score"]
        history = [TrainRecord(**r) for r in state["history"]]
    else:
        base_score = validation_score(adapter, tokenizer, task, val, None, batch_size=batch_size)
        best_z, best_score, best_step = factors.ones(), base_score, 0

    def save(step: int) -> None:
        meta = make_meta(factors, task=task.name, label=label, objective=objective, steps=step, kl=kl, lr=lr,
                         scores={"validation": best_score, "base_validation": base_score,
                                 "best_step": float(best_step)})
        save_expert(out, best_z, meta)
        torch.save({"fingerprint": factors.fingerprint, "objective": objective, "step": step,
                    "z": {n: v.detach().cpu() for n, v in z.items()}, "optimizer": optimizer.state_dict(),
                    "best_z": {n: v.detach().cpu() for n, v in best_z.items()}, "best_score": best_score,
                    "best_step": best_step, "base_score": base_score,
                    "history": [r.__dict__ for r in history]}, ckpt)

    losses: list[float] = []
    elapsed, timed = 0.0, 0
    for step in range(start, steps):
        began = time.perf_counter()
        indices, generator = _batch_indices(len(train), batch_size, seed, step)
        loss = svf_step_loss(adapter, tokenizer, task, [train[i] for i in indices], z, objective=objective,
                             kl=kl, sample=sample, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(z.values()), clip)
        optimizer.step()
        elapsed += time.perf_counter() - began
        timed += 1
        losses.append(float(loss.detach()))
        progress("train", step + 1, steps)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            current = {n: v.detach().clone() for n, v in z.items()}
            score = validation_score(adapter, tokenizer, task, val, current, batch_size=batch_size)
            history.append(TrainRecord(step + 1, sum(losses) / len(losses), score))
            losses = []
            if score > best_score:
                best_z, best_score, best_step = current, score, step + 1
            save(step + 1)
    if not out.exists() or not ckpt.exists():  # e.g. resumed a finished run whose expert was deleted
        save(max(start, steps))
    return TrainResult(out, best_step, best_score, base_score, steps, factors.num_values,
                       elapsed / max(1, timed), tuple(history))
