"""Tiny, deterministic Hugging Face checkpoints that the mergekit goldens were made from.

Both the golden generator (``benchmarks/mergekit_goldens/make_goldens.py``, run in mergekit's
own virtual environment) and the golden tests (``tests/merge/test_mergekit_goldens.py``) build
them with :func:`build_checkpoint`; the tests check that every tensor hashes as recorded in
``tests/goldens/mergekit/checkpoints.json`` before comparing anything.

Tensor names and shapes come from transformers' own model class (instantiated on the meta
device, so no weights are initialised); the values come from ``numpy.random.RandomState``,
whose streams numpy keeps frozen across versions, seeded per tensor by ``(seed, crc32(name))``.
A fine-tune is its base plus Gaussian noise; a ``bf16`` variant is the fp32 values rounded to
bfloat16 (round to nearest even, as ``torch.Tensor.to`` does).

Only numpy, torch, safetensors, tokenizers and transformers are needed: nothing from shoal or
mergekit, so the same code runs in either environment.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FAMILY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", hidden_size=16, intermediate_size=16, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=False, rms_norm_eps=1e-5),
    "mistral": dict(model_type="mistral", hidden_size=16, intermediate_size=16, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    tie_word_embeddings=False, sliding_window=None, rms_norm_eps=1e-5),
    "qwen2": dict(model_type="qwen2", hidden_size=16, intermediate_size=16, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=True, rms_norm_eps=1e-6),
    # a vision-language model (mergekit 0.1.5 knows its modules: text_decoder, vision_tower,
    # multi_modal_projector); the values are drawn for its names as saved on disk
    "mistral3": dict(model_type="mistral3", image_token_index=31, spatial_merge_size=1,
                     text_config=dict(model_type="mistral", hidden_size=16, intermediate_size=16,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=4, max_position_embeddings=64, tie_word_embeddings=False,
                                      sliding_window=None, rms_norm_eps=1e-5),
                     vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=16,
                                        num_hidden_layers=2, num_attention_heads=2, head_dim=8,
                                        image_size=16, patch_size=8)),
}
# transformers 5 names a VLM's modules in memory otherwise than its files do
_SAVED_NAMES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                ("model.vision_tower.", "vision_tower."),
                ("model.multi_modal_projector.", "multi_modal_projector."))

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# vocabulary "a": 32 tokens; vocabulary "b": the first 24 of "a" and 12 of its own (36 tokens)
VOCABS: dict[str, list[str]] = {
    "a": SPECIAL_TOKENS + [f"w{i}" for i in range(28)],
    "b": SPECIAL_TOKENS + [f"w{i}" for i in range(20)] + [f"x{i}" for i in range(12)],
}


@dataclass(frozen=True)
class CheckpointSpec:
    """One tiny checkpoint: a random base (``base is None``) or a fine-tune of ``base``."""

    family: str
    seed: int
    base: str | None = None
    noise: float = 0.02
    dtype: str = "bfloat16"
    vocab: str = "a"


# name -> spec. Fine-tunes name their base; a base is built before the models that name it.
CHECKPOINTS: dict[str, CheckpointSpec] = {
    "llama_base": CheckpointSpec("llama", 1),
    "llama_a": CheckpointSpec("llama", 2, base="llama_base"),
    "llama_b": CheckpointSpec("llama", 3, base="llama_base"),
    "llama_c": CheckpointSpec("llama", 4, base="llama_base"),
    "llama_base_fp32": CheckpointSpec("llama", 1, dtype="float32"),
    "llama_a_fp32": CheckpointSpec("llama", 2, base="llama_base", dtype="float32"),
    "llama_b_fp32": CheckpointSpec("llama", 3, base="llama_base", dtype="float32"),
    "llama_vocab_b": CheckpointSpec("llama", 5, base="llama_base", vocab="b"),
    "mistral_base": CheckpointSpec("mistral", 11),
    "mistral_a": CheckpointSpec("mistral", 12, base="mistral_base"),
    "mistral_b": CheckpointSpec("mistral", 13, base="mistral_base"),
    "qwen2_base": CheckpointSpec("qwen2", 21),
    "qwen2_a": CheckpointSpec("qwen2", 22, base="qwen2_base"),
    "qwen2_b": CheckpointSpec("qwen2", 23, base="qwen2_base"),
    "mistral3_base": CheckpointSpec("mistral3", 31),
    "mistral3_a": CheckpointSpec("mistral3", 32, base="mistral3_base"),
    "mistral3_b": CheckpointSpec("mistral3", 33, base="mistral3_base"),
}


def _draw(seed: int, name: str, shape: tuple[int, ...], salt: int) -> np.ndarray:
    rng = np.random.RandomState([seed, zlib.crc32(name.encode()), salt])
    return rng.standard_normal(size=shape)


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def _names_and_shapes(family: str, vocab_size: int) -> tuple[object, dict[str, tuple[int, ...]]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(FAMILY_CONFIGS[family])
    model_type = kwargs.pop("model_type")
    if "text_config" in kwargs:
        return _vlm_names_and_shapes(model_type, kwargs, vocab_size)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return config, dict(sorted(shapes.items()))


def _saved_name(name: str) -> str:
    for memory, saved in _SAVED_NAMES:
        if name.startswith(memory):
            return saved + name[len(memory):]
    return name


def _vlm_names_and_shapes(model_type: str, kwargs: dict, vocab_size: int) -> tuple[object, dict[str, tuple[int, ...]]]:
    from transformers import AutoConfig, AutoModelForImageTextToText

    text = dict(kwargs.pop("text_config"))
    vision = dict(kwargs.pop("vision_config"))
    text_config = AutoConfig.for_model(text.pop("model_type"), vocab_size=vocab_size, pad_token_id=0,
                                       bos_token_id=1, eos_token_id=2, **text)
    vision_config = AutoConfig.for_model(vision.pop("model_type"), **vision)
    config = AutoConfig.for_model(model_type, text_config=text_config.to_dict(),
                                  vision_config=vision_config.to_dict(), **kwargs)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    shapes = {_saved_name(name): tuple(t.shape) for name, t in model.state_dict().items()}
    return config, dict(sorted(shapes.items()))


def float_values(name: str) -> dict[str, np.ndarray]:
    """The float64 values of checkpoint ``name`` (before rounding to its dtype)."""
    spec = CHECKPOINTS[name]
    vocab = VOCABS[spec.vocab]
    _, shapes = _names_and_shapes(spec.family, len(vocab))
    if spec.base is None:
        out = {}
        for tensor, shape in shapes.items():
            draw = _draw(spec.seed, tensor, shape, 0)
            out[tensor] = 1.0 + 0.1 * draw if _is_norm(tensor) else 0.1 * draw
        return out
    base = float_values(spec.base)
    base_vocab = VOCABS[CHECKPOINTS[spec.base].vocab]
    out = {}
    for tensor, shape in shapes.items():
        value = _draw(spec.seed, tensor, shape, 1) * spec.noise
        if tensor in ("model.embed_tokens.weight", "lm_head.weight") and vocab != base_vocab:
            # rows of tokens the base has: the base's row (by token) plus noise; new tokens: fresh rows
            rows = np.array([base[tensor][base_vocab.index(tok)] if tok in base_vocab
                             else 0.1 * _draw(spec.seed, f"{tensor}/{tok}", shape[1:], 2)
                             for tok in vocab])
            out[tensor] = rows + value
        else:
            out[tensor] = base[tensor] + value
    return out


def write_tokenizer(out: Path, vocab: list[str]) -> None:
    """A word-level tokenizer over ``vocab`` (whitespace split), saved the transformers way."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out)


def build_checkpoint(name: str, out: Path) -> str:
    """Write checkpoint ``name`` (config, model.safetensors, tokenizer) to ``out``; its digest."""
    from safetensors.torch import save_file

    spec = CHECKPOINTS[name]
    vocab = VOCABS[spec.vocab]
    config, _ = _names_and_shapes(spec.family, len(vocab))
    dtype = getattr(torch, spec.dtype)
    tensors = {k: torch.from_numpy(v.astype(np.float32)).to(dtype).contiguous()
               for k, v in float_values(name).items()}
    out.mkdir(parents=True, exist_ok=True)
    config.dtype = spec.dtype  # written as "dtype" by transformers >= 5
    config.architectures = [type_name(spec.family)]
    config.save_pretrained(out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(out, vocab)
    return tensors_digest(tensors)


def type_name(family: str) -> str:
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "mistral3": "Mistral3ForConditionalGeneration"}[family]


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes."""
    h = hashlib.sha256(f"{str(tensor.dtype).replace('torch.', '')}{list(tensor.shape)}".encode())
    h.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """One sha256 over every tensor's name and digest, in name order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(f"{key}:{tensor_digest(tensors[key])}\n".encode())
    return h.hexdigest()


def build_all(root: Path, names: list[str] | None = None) -> dict[str, str]:
    """Build the named checkpoints (all by default) under ``root``; their digests."""
    return {name: build_checkpoint(name, root / name) for name in (names or list(CHECKPOINTS))}


if __name__ == "__main__":  # pragma: no cover - handy for looking at the models
    import sys

    print(json.dumps(build_all(Path(sys.argv[1])), indent=1))
