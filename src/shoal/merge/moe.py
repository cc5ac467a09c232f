"""A mixture-of-experts model from dense models, as mergekit-moe builds one.

The base model gives every tensor outside the MLPs (embeddings, attention, norms, head); each
expert model gives its MLP to one expert slot of every layer; the router rows come from the
gate mode (:mod:`shoal.merge.moe_gates`). Two output architectures:

- ``MixtralForCausalLM`` from Llama or Mistral models (no shared expert);
- ``Qwen2MoeForCausalLM`` from Qwen2, Llama or Mistral models, with exactly one shared expert
  (its gate row comes from the shared expert's prompts), top-k weights renormalized.

Tensors are written in the Hugging Face hub layout of each architecture
(``block_sparse_moe.experts.N.w1`` / ``mlp.experts.N.gate_proj``), which every transformers
version and the usual inference engines read. They are streamed: one source tensor is in
memory at a time, besides the writer's current shard.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from shoal.checkpoint import (CheckpointReader, ShardedWriter, copy_support_files, open_checkpoint, staged_output,
                              write_model_card)
from shoal.checkpoint.writer import DEFAULT_MAX_SHARD_BYTES
from shoal.errors import MergeError, RecipeError
from shoal.merge.moe_config import PROMPTED_MODES, MoeConfig, check_moe_config, load_moe_config
from shoal.merge.moe_gates import (cheap_embed_gates, hidden_gates, load_base_for_gates, load_tokenizer,
                                   random_gates, warn_degenerate)
from shoal.progress import ProgressFn, no_progress

MOE_CONFIG_FILENAME = "shoal_moe.yaml"
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
# what each output takes: (name, model types it is built from)
ARCHITECTURES = {"mixtral": ("MixtralForCausalLM", ("llama", "mistral")),
                 "qwen": ("Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"))}


@dataclass(frozen=True)
class MoeResult:
    """What a finished MoE build wrote."""

    out: Path
    architecture: str
    experts: int
    tensors: int
    total_bytes: int
    gates: torch.Tensor  # (layers, gated experts, hidden): the router rows before the dtype cast


def _why_not(kind: str, config: MoeConfig, model_types: dict[str, str]) -> str | None:
    """Why output ``kind`` cannot be built from ``config`` (None when it can)."""
    name, accepted = ARCHITECTURES[kind]
    shared = config.shared_experts or ()
    if kind == "mixtral" and shared:
        return f"{name} has no shared experts"
    if kind == "qwen":
        if len(shared) != 1:
            return f"{name} needs exactly one shared expert (shared_experts), got {len(shared)}"
        if config.gate_mode in PROMPTED_MODES and not shared[0].positive_prompts:
            return f"{name} needs positive_prompts for the shared expert's gate with gate_mode {config.gate_mode}"
    types = set(model_types.values())
    if len(types) != 1:
        listed = ", ".join(f"{m} is {t}" for m, t in model_types.items())
        return f"{name} needs models of one architecture ({listed})"
    if types.pop() not in accepted:
        return f"{name} is built from {' or '.join(accepted)} models, not {next(iter(model_types.values()))}"
    return None


def select_architecture(config: MoeConfig, model_types: dict[str, str], *, where: str) -> str:
    """``"mixtral"`` or ``"qwen"``: the one ``architecture`` names (by prefix, as mergekit matches
    them), else Mixtral when it fits, else Qwen2-MoE."""
    kinds = list(ARCHITECTURES)
    if config.architecture:
        wanted = config.architecture.lower()
        kinds = [k for k in kinds if k.startswith(wanted) or f"{k} moe".startswith(wanted)]
        if not kinds:
            raise RecipeError(f"{where}: architecture {config.architecture!r}: shoal builds mixtral or qwen "
                              "(Qwen2-MoE) outputs")
    reasons = {kind: _why_not(kind, config, model_types) for kind in kinds}
    for kind in kinds:
        if reasons[kind] is None:
            return kind
    raise RecipeError(f"{where}: no output architecture fits: " + "; ".join(r for r in reasons.values() if r))


def _hf_config(reader: CheckpointReader, role: str):  # type: ignore[no-untyped-def]
    from transformers import AutoConfig

    if reader.config is None:
        raise MergeError(f"{role} {reader.source}: no config.json beside the weights")
    folder = reader.path if reader.path.is_dir() else reader.path.parent
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        raise MergeError(f"{role} {reader.source}: cannot read config.json: {err}") from None


_DROPPED_KEYS = ("model_type", "architectures", "_name_or_path", "transformers_version", "auto_map",
                 "pretraining_tp", "dtype", "torch_dtype")


def moe_config(kind: str, base, *, experts: int, experts_per_token: int, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    """The transformers config of the output: the base's settings plus the expert counts."""
    from transformers import MixtralConfig, Qwen2MoeConfig

    settings = {k: v for k, v in base.to_dict().items() if k not in _DROPPED_KEYS}
    if settings.get("attention_bias") and kind == "mixtral":
        raise MergeError("base_model: has attention biases (attention_bias: true), which Mixtral cannot hold")
    if settings.pop("mlp_bias", False):
        raise MergeError("base_model: has MLP biases (mlp_bias: true), which the MoE experts cannot hold")
    settings.pop("attention_bias", None)
    try:
        out = (MixtralConfig if kind == "mixtral" else Qwen2MoeConfig)(**settings)
    except (TypeError, ValueError) as err:
        raise MergeError(f"base_model: its config cannot become a {ARCHITECTURES[kind][0]} config: {err}") from None
    if kind == "mixtral":
        out.num_local_experts = experts
    else:
        out.num_experts = experts
        out.decoder_sparse_step = 1
        out.mlp_only_layers = []
        out.norm_topk_prob = True
        out.use_sliding_window = False
        out.shared_expert_intermediate_size = base.intermediate_size
        out.moe_intermediate_size = base.intermediate_size
    out.sliding_window = None
    out.num_experts_per_tok = experts_per_token
    out.architectures = [ARCHITECTURES[kind][0]]
    out.dtype = str(dtype).removeprefix("torch.")
    return out


def _output_dtype(config: MoeConfig, base: CheckpointReader) -> torch.dtype:
    if config.dtype:
        return getattr(torch, config.dtype)
    named = (base.config or {}).get("dtype") or (base.config or {}).get("torch_dtype")
    if isinstance(named, str) and isinstance(getattr(torch, named.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, named.removeprefix("torch."))
    floating = [base.dtype(n) for n in base.tensor_names() if base.dtype(n).is_floating_point]
    return floating[0] if floating else torch.float32


def _mlp_name(layer: int, projection: str) -> str:
    return f"model.layers.{layer}.mlp.{projection}.weight"


def _check_sources(base: CheckpointReader, experts: dict[str, CheckpointReader], num_layers: int) -> None:
    """Every MLP tensor the build reads exists with the base's shape; the base has no other MLP tensor."""
    wanted = {_mlp_name(layer, p) for layer in range(num_layers) for p in MLP_PROJECTIONS}
    for name in base.tensor_names():
        if ".mlp." in name and name not in wanted:
            raise MergeError(f"base_model {base.source}: tensor {name!r} is not a gate/up/down projection weight; "
                             "a MoE expert cannot hold it")
    for name in sorted(wanted):
        if name not in base:
            raise MergeError(f"base_model {base.source}: has no tensor {name!r}")
        for model, reader in experts.items():
            if name not in reader:
                raise MergeError(f"expert {model}: has no tensor {name!r}")
            if reader.shape(name) != base.shape(name):
                raise MergeError(f"expert {model}: tensor {name!r} has shape {list(reader.shape(name))}, "
                                 f"the base model's is {list(base.shape(name))}")


def _expert_tensor(reader: CheckpointReader, name: str, *, noise: float | None, residual: float | None,
                   dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    tensor = reader.get(name)
    if noise:
        tensor = tensor.float() + torch.randn(tensor.shape, generator=generator) * noise
    if residual is not None and name.endswith("down_proj.weight"):
        tensor = tensor.float() * residual
    return tensor.to(dtype)


def compute_gates(config: MoeConfig, base: CheckpointReader, *, num_layers: int, hidden_size: int,
                  generator: torch.Generator, device: str, where: str,
                  progress: ProgressFn = no_progress) -> torch.Tensor:
    """(L, E, H) router rows for :meth:`MoeConfig.gated_experts`, in float32."""
    experts = config.gated_experts()
    mode = config.gate_mode
    if mode in ("random", "uniform_random"):
        return random_gates(num_layers, len(experts), hidden_size, uniform=mode == "uniform_random",
                            generator=generator)
    folder = base.path if base.path.is_dir() else base.path.parent
    tokenizer = load_tokenizer(folder, revision=None, mode=mode)
    if mode == "cheap_embed":
        embed = next((n for n in base.tensor_names() if n.endswith("embed_tokens.weight")), None)
        if embed is None:
            raise MergeError(f"base_model {base.source}: no embed_tokens.weight for gate_mode cheap_embed")
        return cheap_embed_gates(experts, base.get(embed), tokenizer, num_layers, where=where)
    model = load_base_for_gates(folder, revision=None, device=device)
    try:
        return hidden_gates(experts, model, tokenizer, average=mode == "hidden_avg", device=device,
                            where=where, progress=progress)
    finally:
        del model


def build_moe(config: MoeConfig | str | Path, out: str | Path, *, config_text: str | None = None,
              shard_size: int = DEFAULT_MAX_SHARD_BYTES, device: str = "cpu", seed: int = 0,
              allow_pickle: bool = False, overwrite: bool = False, allow_all_same: bool = False,
              progress: ProgressFn = no_progress) -> MoeResult:
    """Build the MoE model ``config`` describes into a Hugging Face folder ``out``.

    ``config`` is a :class:`MoeConfig` or the path of its YAML file. ``seed`` seeds random gates
    and expert noise when the config sets no ``seed``; ``device`` is where the base model runs
    for ``hidden`` gates. The folder is staged beside ``out``: on any error nothing is left there.
    """
    where = "moe config"
    if not isinstance(config, MoeConfig):
        where = str(config)
        config, config_text = load_moe_config(config)
    check_moe_config(config, where=where, allow_all_same=allow_all_same)
    from shoal.merge.execute import check_device

    check_device(device)
    from shoal.checkpoint.references import resolve_reference

    generator = torch.Generator().manual_seed(config.seed if config.seed is not None else seed)
    with ExitStack() as stack:
        readers: dict[str, CheckpointReader] = {}
        for name in config.source_models():
            location = resolve_reference(name)
            source = location.path if location.path is not None else str(location.hub_id)
            readers[name] = stack.enter_context(open_checkpoint(source, allow_pickle=allow_pickle,
                                                                revision=location.revision))
        base = readers[config.base_model]
        hf_configs = {name: _hf_config(reader, "base_model" if name == config.base_model else "expert")
                      for name, reader in readers.items()}
        kind = select_architecture(config, {n: c.model_type for n, c in hf_configs.items()}, where=where)
        base_hf = hf_configs[config.base_model]
        num_layers, hidden = int(base_hf.num_hidden_layers), int(base_hf.hidden_size)
        experts = [*config.experts, *(config.shared_experts or ())]
        _check_sources(base, {e.source_model: readers[e.source_model] for e in experts}, num_layers)
        dtype = _output_dtype(config, base)
        out_config = moe_config(kind, base_hf, experts=len(config.experts),
                                experts_per_token=config.experts_per_token, dtype=dtype)
        gates = compute_gates(config, base, num_layers=num_layers, hidden_size=hidden, generator=generator,
                              device=device, where=where, progress=progress)
        warn_degenerate(gates[:, : len(config.experts)])
        text = config_text if config_text is not None else config.to_yaml()
        with staged_output(Path(out), overwrite=overwrite) as stage:
            copy_support_files(base, stage)
            out_config.save_pretrained(stage)
            with ShardedWriter(stage, max_shard_bytes=shard_size) as writer:
                count, total = _write_tensors(kind, config, readers, writer, gates, num_layers=num_layers,
                                              dtype=dtype, generator=generator, progress=progress)
            _write_card(stage, config, text, ARCHITECTURES[kind][0])
    return MoeResult(Path(out), ARCHITECTURES[kind][0], len(config.experts), count, total, gates)


def _write_tensors(kind: str, config: MoeConfig, readers: dict[str, CheckpointReader], writer: ShardedWriter,
                   gates: torch.Tensor, *, num_layers: int, dtype: torch.dtype, generator: torch.Generator,
                   progress: ProgressFn) -> tuple[int, int]:
    """Write every output tensor; return how many and their bytes."""
    base = readers[config.base_model]
    outside = [n for n in base.tensor_names() if ".mlp." not in n]
    shared = list(config.shared_experts or ())
    per_layer = 3 * (len(config.experts) + len(shared)) + 1 + (1 if shared else 0)
    zero_biases = [n for n in outside if kind == "qwen" and n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))
                   and n.removesuffix("weight") + "bias" not in base]
    total = len(outside) + len(zero_biases) + num_layers * per_layer
    written = nbytes = 0

    def add(name: str, tensor: torch.Tensor) -> None:
        nonlocal written, nbytes
        writer.add(name, tensor)
        written += 1
        nbytes += tensor.numel() * tensor.element_size()
        progress("moe tensors", min(written, total), total)

    for name in outside:
        add(name, base.get(name, dtype=dtype))
        if name in zero_biases:  # Qwen2-MoE attention has biases; a Llama or Mistral base has none: zeros
            add(name.removesuffix("weight") + "bias", torch.zeros(base.shape(name)[0], dtype=dtype))
    for layer in range(num_layers):
        for index, expert in enumerate([*config.experts, *shared]):
            reader = readers[expert.source_model]
            for projection in MLP_PROJECTIONS:
                tensor = _expert_tensor(reader, _mlp_name(layer, projection), noise=expert.noise_scale,
                                        residual=expert.residual_scale, dtype=dtype, generator=generator)
                if kind == "mixtral":
                    add(f"model.layers.{layer}.block_sparse_moe.experts.{index}.{_MIXTRAL_NAMES[projection]}.weight",
                        tensor)
                elif index < len(config.experts):
                    add(f"model.layers.{layer}.mlp.experts.{index}.{projection}.weight", tensor)
                else:
                    add(f"model.layers.{layer}.mlp.shared_expert.{projection}.weight", tensor)
        routed = gates[layer, : len(config.experts)].to(dtype).contiguous()
        if kind == "mixtral":
            add(f"model.layers.{layer}.block_sparse_moe.gate.weight", routed)
        else:
            add(f"model.layers.{layer}.mlp.gate.weight", routed)
            add(f"model.layers.{layer}.mlp.shared_expert_gate.weight",
                gates[layer, len(config.experts):len(config.experts) + 1].to(dtype).contiguous())
    return written, nbytes


def _write_card(stage: Path, config: MoeConfig, text: str, architecture: str) -> None:
    shared = f" plus a shared expert from `{config.shared_experts[0].source_model}`" if config.shared_experts else ""
    intro = (f"This {architecture} model was made with `shoal moe`: the MLPs of {len(config.experts)} dense "
             f"models became its experts{shared}, routed {config.experts_per_token} per token by router rows "
             f"from gate mode `{config.gate_mode}`; every other tensor is the base model's.")
    write_model_card(stage, sources=config.source_models(), method=f"moe ({config.gate_mode} gates)",
                     recipe_yaml=text, base_model=config.base_model, title="Mixture of experts",
                     intro=intro, recipe_file=MOE_CONFIG_FILENAME)

