"""Fixtures for the Transformer² tests: a word-level tokenizer, tiny models and toy tasks."""

from __future__ import annotations

from pathlib import Path

import pytest
from adapt_toys import ToyTask, build_word_tokenizer, load


@pytest.fixture(scope="session")
def word_tokenizer():
    return build_word_tokenizer()


@pytest.fixture(scope="session")
def toy_tasks() -> dict[str, ToyTask]:
    return {"ay": ToyTask("ay", "ay", "a"), "bee": ToyTask("bee", "bee", "b"),
            "cee": ToyTask("cee", "cee", "a"), "first": ToyTask("first", "cee", "first")}


@pytest.fixture()
def llama(tiny_model_dir):
    return load(tiny_model_dir("adapt-llama", "llama", seed=1))


@pytest.fixture()
def svd_dir(tmp_path: Path) -> Path:
    return tmp_path / "svd"


@pytest.fixture(scope="session")
def trained(tiny_model_dir, word_tokenizer, toy_tasks, tmp_path_factory):
    """Experts ``ay`` (always answers a) and ``bee`` (always b), and a classifier expert that
    tells their prompts apart, all trained by next-token loss (direct z) on the seed-1 tiny Llama."""
    from shoal.adapt import routing_task, train_svf

    root = tmp_path_factory.mktemp("adapt-experts")
    model = load(tiny_model_dir("adapt-llama", "llama", seed=1))
    # direct z learns these toy skills in a few steps (the reference parametrization is slower here)
    common = dict(objective="sft", parametrization="direct", lr=0.3, batch_size=16, cache_dir=root / "svd")
    paths = {}
    for name in ("ay", "bee"):
        result = train_svf(model, word_tokenizer, toy_tasks[name], out=root / f"{name}.safetensors", steps=20,
                           eval_every=20, **common)
        assert result.best_score == 1.0, name  # the toy skills are easy: the fixture is only useful if learnt
        paths[name] = result.path
    routing = routing_task([("ay", toy_tasks["ay"]), ("bee", toy_tasks["bee"])], template="{prompt}")
    paths["classifier"] = train_svf(model, word_tokenizer, routing, out=root / "classifier.safetensors", steps=40,
                                    eval_every=40, label="router", **{**common, "lr": 0.5}).path
    return {"model": model, "paths": paths, "svd": root / "svd", "template": "{prompt}"}
