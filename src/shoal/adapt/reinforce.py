"""The SVF training objectives as small pure functions of logits, token ids and rewards.

REINFORCE with a KL penalty (Transformer², arXiv 2501.06252, eq. 1):

    J(z) = E[ log pi_z(y|x) * r(y, x) ] - lambda * KL(pi_z || pi_base)

minimized as ``reinforce_loss + lambda * kl_divergence``, where log pi(y|x) is the sum of
the completion's token log-probabilities, r is +1 / -1 and the KL is the per-token KL
between the adapted and the base next-token distributions, averaged over completion tokens.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t) for t = 1..T-1. logits (B, T, V), input_ids (B, T) -> (B, T-1)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor,
                      completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probabilities of the completion tokens of each row -> (B,)."""
    mask = completion_mask[:, 1:].to(torch.float32)
    return (token_logprobs(logits, input_ids) * mask).sum(-1)


def reinforce_loss(seq_logprobs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """-mean_i(log pi(y_i|x_i) * r_i): minimizing it ascends the REINFORCE objective."""
    return -(seq_logprobs * rewards.to(seq_logprobs.dtype)).mean()


def kl_divergence(logits: torch.Tensor, ref_logits: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Mean over completion tokens of KL(p || q) = sum_v p_v (log p_v - log q_v), where p comes from
    ``logits`` (adapted) and q from ``ref_logits`` (base), both predicting the completion tokens."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    logq = torch.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)  # (B, T-1)
    mask = completion_mask[:, 1:].to(torch.float32)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Next-token loss: mean negative log-likelihood over the completion tokens."""
    mask = completion_mask[:, 1:].to(torch.float32)
    return -(token_logprobs(logits, input_ids) * mask).sum() / mask.sum().clamp(min=1.0)


def rewards_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """Map task scores in [0, 1] to rewards in [-1, 1] (1 -> +1, 0 -> -1)."""
    return 2.0 * scores.to(torch.float32) - 1.0
