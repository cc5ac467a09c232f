"""Transformer² self-adaptation (arXiv 2501.06252): SVF experts and two-pass inference.

- :func:`load_or_compute_svd` / :class:`SVFAdapter`: SVD of the chosen matrices (MLP by
  default), cached per model fingerprint; apply an expert in place, restore bitwise.
- :func:`train_svf`: train an expert by REINFORCE (+ KL, the default, as Sakana's reference
  code) or next-token loss; ``parametrization`` ``reference`` (z = sigmoid(p), sum(S) rescale,
  the default) or ``direct``.
- :func:`import_reference_expert`: read an expert saved by the reference code.
- :func:`save_expert` / :func:`load_expert`: the expert file format.
- :func:`adapt_evaluate` / :func:`adapt_generate`: two-pass inference with the ``prompt``,
  ``classifier`` or ``few-shot`` (CEM mixture) strategy.

The study behind the README's numbers and its LoRA baseline are experiments over this package:
see :mod:`shoal.studies`.
"""

from shoal.adapt.cem import CEMResult, cem
from shoal.adapt.dispatch import OTHER, RoutingTask, classify, label_scores, routing_task
from shoal.adapt.expert import Expert, ExpertError, ExpertMeta, check_expert, load_expert, make_meta, save_expert
from shoal.adapt.few_shot import FewShotMixture, few_shot_mixture
from shoal.adapt.fingerprint import DEFAULT_MATRIX_PATTERNS, model_fingerprint, select_matrices
from shoal.adapt.import_reference import import_reference_expert
from shoal.adapt.reinforce import (kl_divergence, reference_row_losses, reinforce_loss, sequence_kl, sequence_logprobs,
                                   sft_loss)
from shoal.adapt.svd_cache import SVDFactors, compute_svd, default_cache_dir, load_or_compute_svd
from shoal.adapt.svf import PARAMETRIZATIONS, SVFAdapter, mix_experts, recompose
from shoal.adapt.train import TrainRecord, TrainResult, train_svf
from shoal.adapt.two_pass import AdaptResult, TwoPassResult, adapt_evaluate, adapt_generate

__all__ = [
    "AdaptResult", "CEMResult", "DEFAULT_MATRIX_PATTERNS", "Expert", "ExpertError", "ExpertMeta",
    "FewShotMixture", "OTHER", "PARAMETRIZATIONS", "RoutingTask", "SVDFactors", "SVFAdapter",
    "TrainRecord", "TrainResult", "TwoPassResult", "adapt_evaluate", "adapt_generate", "cem",
    "check_expert", "classify", "compute_svd", "default_cache_dir", "few_shot_mixture", "import_reference_expert",
    "kl_divergence", "label_scores", "load_expert", "load_or_compute_svd", "make_meta", "mix_experts",
    "model_fingerprint", "recompose", "reference_row_losses", "reinforce_loss", "routing_task",
    "save_expert", "select_matrices", "sequence_kl", "sequence_logprobs", "sft_loss", "train_svf",
]
