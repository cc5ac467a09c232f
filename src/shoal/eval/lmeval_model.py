"""``shoal`` as an lm-evaluation-harness model (extra ``lmeval``).

lm-eval's own ``hf`` model loads a folder with transformers alone; ``--model shoal`` loads it
through shoal's one loader (:func:`shoal.eval.loading.load_model`) and hands the model to
lm-eval's Hugging Face implementation, so every reference shoal understands is evaluated by
lm-eval as is: layer-path (data-flow) models without remote code, ``zoo:`` names, finished
run folders, PEFT adapter folders, hub ids with ``@revision``::

    python -m shoal.cli.lm_eval --model shoal --model_args pretrained=RUN/model --tasks TASK
    # or, in Python:
    from shoal.eval.lmeval_adapter import register_lmeval_model
    register_lmeval_model()
    lm_eval.simple_evaluate(model="shoal", model_args="pretrained=RUN/model", tasks=[...])

This module imports lm-eval at the top: it is imported only when lm-eval asks its registry
for ``shoal`` (see :func:`shoal.eval.lmeval_adapter.register_lmeval_model`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM

from shoal.errors import CheckpointError
from shoal.eval.loading import load_model

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "auto": torch.float32}


class ShoalLM(HFLM):
    """lm-eval's Hugging Face model over a model that shoal's loader opened.

    ``pretrained`` is any shoal model reference; ``device`` (default cpu), ``dtype``
    (float32, bfloat16, float16) and ``revision`` go to the loader; every other argument
    (``batch_size``, ``max_length``, ...) is lm-eval's own."""

    def __init__(self, pretrained: str, device: str | None = "cpu", dtype: str | torch.dtype = "float32",
                 revision: str | None = None, **kwargs: Any):
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise CheckpointError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
            dtype = _DTYPES[dtype]
        device = device or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda:0 by default; its hf model falls back alike
            log.warning("device %s is not available; evaluating on cpu", device)
            device = "cpu"
        model, tokenizer = load_model(str(pretrained), device=device, dtype=dtype, revision=revision)
        kwargs.pop("tokenizer", None)  # the model's own tokenizer, as the loader prepared it
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        self.reference = str(pretrained)
