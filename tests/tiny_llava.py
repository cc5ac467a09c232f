"""Tiny LLaVA checkpoints for the VLM merge, evolve and loading tests, built locally.

``build_llm`` saves a tiny Llama with a word-level tokenizer whose vocabulary holds an
``<image>`` word; ``build_llava`` saves a ``LlavaForConditionalGeneration`` whose language
model is such a Llama's weights (plus noise: a VLM fine-tuned from the LLM base), behind a
random CLIP vision tower and projector, with a processor (``LlavaProcessor``: CLIP image
processor + the tokenizer). The image token reuses the ``<image>`` id of the LLM's
vocabulary, so the VLM's embeddings have the LLM's shape; ``extra_image_token=True`` adds one
row instead (the other convention, which a merge with the LLM must refuse or align).

Imported by tests as ``from tiny_llava import ...`` (``tests/`` is on ``sys.path`` through its
conftest), never by shoal.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"] + [f"w{i}" for i in range(27)]
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 8
PATCH_SIZE = 4


def text_config(vocab_size: int = len(WORDS)) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def save_tokenizer(out: Path, words: list[str] = WORDS) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out)


def _perturb(model: torch.nn.Module, seed: int, noise: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)


def build_llm(out: Path, seed: int = 0, *, base: Path | None = None, noise: float = 0.02) -> Path:
    """A tiny Llama with its tokenizer; with ``base``, the base's weights plus noise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if base is not None:
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        _perturb(model, seed, noise)
    else:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**text_config()))
    model.save_pretrained(out)
    save_tokenizer(out)
    return out


def build_llava(out: Path, language_model: Path, seed: int = 0, *, noise: float = 0.02,
                extra_image_token: bool = False) -> Path:
    """A tiny LLaVA whose language model is ``language_model``'s weights plus noise."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaForCausalLM, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    words = WORDS + (["<img>"] if extra_image_token else [])
    image_token = "<img>" if extra_image_token else IMAGE_TOKEN
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    config = LlavaConfig(vision_config=vision, text_config=text_config(len(words)),
                         image_token_id=words.index(image_token), image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    llm = LlamaForCausalLM.from_pretrained(language_model, dtype=torch.float32)
    if extra_image_token:
        llm.resize_token_embeddings(len(words), mean_resizing=False)
    model.model.language_model.load_state_dict(llm.model.state_dict())
    model.lm_head.load_state_dict(llm.lm_head.state_dict())
    _perturb(model.model.language_model, seed + 1, noise)
    model.save_pretrained(out)
    save_tokenizer(out, words)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                               vision_feature_select_strategy="default", image_token=image_token,
                               num_additional_image_tokens=1)
    processor.save_pretrained(out)
    return out
