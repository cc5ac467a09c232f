"""Evaluation: tasks and splits, scoring, batched generation, log-likelihood, lm-eval adapter."""

from shoal.eval.evaluate import EvalResult, evaluate, predict, select_examples
from shoal.eval.generation import generate_greedy
from shoal.eval.loading import load_model, load_network, load_processor, prepare_tokenizer
from shoal.eval.loglik import loglik
from shoal.eval.registry import get_task, known_task_names
from shoal.eval.task import SPLITS, Example, Task

__all__ = [
    "EvalResult", "Example", "SPLITS", "Task", "evaluate", "generate_greedy",
    "get_task", "known_task_names", "load_model", "load_network", "load_processor", "loglik", "predict", "prepare_tokenizer",
    "select_examples",
]
