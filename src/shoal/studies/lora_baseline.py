"""A LoRA baseline through PEFT (extra ``peft``), trained like an SVF expert for comparison.

Same matrices (the SVF name filter), same batches (the draw depends on ``seed`` and the step
only, as in :func:`shoal.adapt.train.train_svf`), same objectives and validation-based choice
of the best checkpoint; only the trainable part differs: B A (rank ``rank``) added to each
matrix instead of z scaling its singular values. The initial A comes from ``seed``, so a run is
reproducible whatever ran before it in the process. The model passed in is not modified (a copy
is wrapped). Not resumable: it is a baseline.

The adapter folder is a PEFT causal-LM adapter (``task_type: CAUSAL_LM``) with the tokenizer
beside it, so ``PeftModel.from_pretrained`` / ``AutoPeftModelForCausalLM`` and ``shoal eval
ADAPTER`` load it as it is.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from shoal.adapt import _lm
from shoal.adapt.fingerprint import select_matrices
from shoal.adapt.reinforce import kl_divergence, reinforce_loss, rewards_from_scores, sequence_logprobs, sft_loss
from shoal.adapt.train import Objective, TrainRecord, _batch_indices
from shoal.errors import ConfigError
from shoal.eval.task import Example, Task
from shoal.progress import ProgressFn, no_progress


@dataclass(frozen=True)
class LoRAResult:
    path: Path  # PEFT adapter folder (best checkpoint on validation)
    best_step: int
    best_score: float
    base_score: float
    steps: int
    num_parameters: int  # trainable parameters
    seconds_per_step: float
    history: tuple[TrainRecord, ...]


def _loss(peft_model: nn.Module, tokenizer: object, task: Task, batch: Sequence[Example], *, objective: Objective,
          kl: float, sample: bool, generator: torch.Generator) -> torch.Tensor:
    device = _lm.model_device(peft_model)
    pad = _lm.pad_id(tokenizer)
    prompts = [_lm.encode(tokenizer, ex.prompt, special=True) for ex in batch]
    if objective == "sft":
        packed = _lm.pack(prompts, [_lm.encode(tokenizer, ex.reference, special=False) for ex in batch], pad, device)
        logits = peft_model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits
        return sft_loss(logits, packed.input_ids, packed.completion_mask)
    outputs, completions = _lm.generate(peft_model, tokenizer, [ex.prompt for ex in batch],
                                        max_new_tokens=task.max_new_tokens, batch_size=len(batch), sample=sample,
                                        generator=generator)
    scores = torch.tensor([task.score(out, ex) for out, ex in zip(outputs, batch)])
    packed = _lm.pack(prompts, [c if c else [pad] for c in completions], pad, device)
    logits = peft_model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits
    logp = sequence_logprobs(logits, packed.input_ids, packed.completion_mask)
    loss = reinforce_loss(logp, rewards_from_scores(scores).to(device))
    if kl > 0:
        with torch.no_grad(), peft_model.disable_adapter():  # type: ignore[attr-defined]
            ref = peft_model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits
        loss = loss + kl * kl_divergence(logits, ref, packed.completion_mask)
    return loss


def _validate(model: nn.Module, tokenizer: object, task: Task, examples: Sequence[Example], batch_size: int) -> float:
    scores = _lm.score_examples(model, tokenizer, task, examples, batch_size=batch_size)
    return sum(scores) / max(1, len(scores))


def train_lora(model: nn.Module, tokenizer: object, task: Task, *, out: Path, objective: Objective = "sft",
               rank: int = 4, alpha: float | None = None, kl: float = 0.0, lr: float = 1e-3, steps: int = 300,
               batch_size: int = 16, clip: float = 1.0, eval_every: int = 50, validation_limit: int | None = 200,
               seed: int = 0, sample: bool = True, patterns: Sequence[str] | None = None,
               progress: ProgressFn = no_progress) -> LoRAResult:
    """Train LoRA (rank ``rank``, scale ``alpha / rank``, alpha defaults to ``2 * rank``) on the
    matrices SVF would adapt; writes the best PEFT adapter to the folder ``out``."""
    try:
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    except ImportError:
        raise ConfigError("the LoRA baseline needs PEFT: pip install 'shoal[peft]'") from None
    if objective not in ("reinforce", "sft"):
        raise ConfigError(f"unknown objective {objective!r}; use 'reinforce' or 'sft'")
    train = list(task.examples("train"))
    val = list(task.examples("validation"))[:validation_limit]
    if not train or not val:
        raise ConfigError(f"task {task.name} needs non-empty train and validation splits")
    modules = [name[: -len(".weight")] for name in select_matrices(model, patterns)]
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
                        target_modules=modules, bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):  # PEFT draws A from the global generator: pin it to the seed
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.eval()  # no dropout anywhere: the same conditions as SVF training
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    with peft_model.disable_adapter():
        base_score = _validate(peft_model, tokenizer, task, val, batch_size)
    best_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    best_score, best_step = base_score, 0
    history: list[TrainRecord] = []
    losses: list[float] = []
    elapsed = 0.0
    for step in range(steps):
        began = time.perf_counter()
        indices, generator = _batch_indices(len(train), batch_size, seed, step)
        loss = _loss(peft_model, tokenizer, task, [train[i] for i in indices], objective=objective, kl=kl,
                     sample=sample, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, clip)
        optimizer.step()
        elapsed += time.perf_counter() - began
        losses.append(float(loss.detach()))
        progress("train", step + 1, steps)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            score = _validate(peft_model, tokenizer, task, val, batch_size)
            history.append(TrainRecord(step + 1, sum(losses) / len(losses), score))
            losses = []
            if score > best_score:
                best_score, best_step = score, step + 1
                best_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    set_peft_model_state_dict(peft_model, best_state)
    out = Path(out)
    peft_model.save_pretrained(str(out))
    if hasattr(tokenizer, "save_pretrained"):  # PEFT users and `shoal eval ADAPTER` load it from here
        tokenizer.save_pretrained(str(out))
    return LoRAResult(out, best_step, best_score, base_score, steps, sum(p.numel() for p in trainable),
                      elapsed / steps, tuple(history))
