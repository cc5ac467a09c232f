"""Few-shot adaptation: z' = sum_k alpha_k z_k with alpha found by CEM on a few labelled examples.

As Sakana's reference code does it (``scripts/eval_few_shot.sh``: ``policy/wcomb.yaml`` with
``per_layer=true``, ``norm_coeffs=false``; ``cfgs/optimization/cem.yaml``; ``num_iters=50``):

- one alpha per expert and adapted matrix (the reference's ``per_layer`` is per parameter
  tensor), starting at 1/K, not normalised to sum to 1;
- CEM (:func:`shoal.adapt.cem.cem`) with population 32, 6 elites, 50 iterations, alpha
  clamped into [0, 1], the best point re-evaluated each iteration;
- fitness: the task score on the shots of the model with z' (greedy answers); ties between
  equal scores are broken by the mean, over the shots answered correctly, of the per-token
  log-likelihood of the model's own answer (0 when none is correct).

The mixture is of the z vectors; an adapter with the ``reference`` parametrization rescales
each mixed matrix to the base's sum of singular values when it recomposes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from shoal.adapt import _lm
from shoal.adapt.cem import CEMResult, cem
from shoal.adapt.expert import Expert
from shoal.adapt.reinforce import token_logprobs
from shoal.adapt.svf import SVFAdapter, mix_experts
from shoal.errors import ConfigError
from shoal.eval.evaluate import predict
from shoal.eval.task import Example, Task
from shoal.progress import ProgressFn, no_progress


@dataclass(frozen=True)
class FewShotMixture:
    alpha: torch.Tensor  # (K,) or (K, M)
    z: dict[str, torch.Tensor]
    shots_score: float  # mean task score on the shots with z
    base_score: float  # mean task score on the shots with the base weights
    search: CEMResult


@torch.no_grad()
def own_answer_loglik(model: torch.nn.Module, tokenizer: object, prompts: Sequence[str],
                      answers: Sequence[str]) -> float:
    """Mean over the answers of their mean per-token log-likelihood after their prompt (answers that
    encode to no tokens are skipped; 0.0 when none is left), as the reference's tie-break."""
    pad = _lm.pad_id(tokenizer)
    rows = [(_lm.encode(tokenizer, p, special=True), _lm.encode(tokenizer, a, special=False))
            for p, a in zip(prompts, answers)]
    rows = [(p, a) for p, a in rows if a]
    if not rows:
        return 0.0
    packed = _lm.pack([p for p, _ in rows], [a for _, a in rows], pad, _lm.model_device(model))
    logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits
    mask = packed.completion_mask[:, 1:].to(torch.float32)
    per_row = (token_logprobs(logits, packed.input_ids) * mask).sum(-1) / mask.sum(-1)
    return float(per_row.mean())


def few_shot_mixture(adapter: SVFAdapter, tokenizer: object, experts: Sequence[Expert], task: Task,
                     shots: Sequence[Example], *, per_matrix: bool = True, iterations: int = 50,
                     population: int = 32, elite_ratio: float = 0.2, bounds: tuple[float, float] = (0.0, 1.0),
                     tie_break: bool = True, seed: int = 0, batch_size: int = 16,
                     progress: ProgressFn = no_progress) -> FewShotMixture:
    """alpha maximizing the task score on ``shots`` of z' = sum_k alpha_k z_k (see the module
    docstring). ``per_matrix=False`` searches one alpha per expert; ``tie_break=False`` ranks
    by the score alone."""
    if not experts:
        raise ConfigError("few-shot adaptation needs at least one expert")
    if not shots:
        raise ConfigError(f"few-shot adaptation needs labelled examples of task {task.name}")
    names = sorted(experts[0].z)
    for e in experts:
        if sorted(e.z) != names:
            raise ConfigError(f"experts {experts[0].name} and {e.name} adapt different matrices")
        if e.meta.parametrization != adapter.parametrization:
            raise ConfigError(f"expert {e.name} uses the {e.meta.parametrization} parametrization, the adapter "
                              f"{adapter.parametrization}")
    zs = [{n: v.to(adapter.device) for n, v in e.z.items()} for e in experts]
    shape = (len(experts), len(names)) if per_matrix else (len(experts),)
    prompts = [ex.prompt for ex in shots]

    def evaluate(z: dict[str, torch.Tensor] | None) -> tuple[float, float]:
        with adapter.applied(z):
            outputs = predict(adapter.model, tokenizer, task, shots, batch_size=batch_size)
            correct = [task.score(out, ex) > 0 for out, ex in zip(outputs, shots)]
            score = sum(float(task.score(out, ex)) for out, ex in zip(outputs, shots)) / len(shots)
            loglik = 0.0
            if tie_break and any(correct):
                loglik = own_answer_loglik(adapter.model, tokenizer, [p for p, c in zip(prompts, correct) if c],
                                           [o for o, c in zip(outputs, correct) if c])
        return score, loglik

    def objective(alpha: torch.Tensor) -> tuple[float, float]:
        return evaluate(mix_experts(zs, alpha.float().reshape(shape).to(adapter.device)))

    dim = int(torch.tensor(shape).prod())
    result = cem(objective, dim, population=population, elite_ratio=elite_ratio, iterations=iterations,
                 init_mean=1.0 / len(experts), bounds=bounds, seed=seed, progress=progress)
    alpha = result.best.reshape(shape)
    z = {n: v.cpu() for n, v in mix_experts(zs, alpha.to(adapter.device)).items()}
    return FewShotMixture(alpha, z, result.best_value, evaluate(None)[0], result)
