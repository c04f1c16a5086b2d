"""The PEFT adapter format: adapter_config.json + adapter_model.safetensors.

File keys are the in-memory names with the adapter name dropped, prefixed with `base_model.model.`:
    model.layers.0.self_attn.q_proj.lora_A.default.weight  ->  base_model.model.model.layers.0...q_proj.lora_A.weight
    ...q_proj.lora_magnitude_vector.default.weight         ->  ...q_proj.lora_magnitude_vector
    lm_head.modules_to_save.default.weight                  ->  base_model.model.lm_head.weight
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CONFIG_NAME, LoraConfig
from .layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def adapter_tensors(model: nn.Module, adapter_name: str, bias: str) -> dict[str, torch.Tensor]:
    """File key -> live tensor (parameter data) for adapter `adapter_name` of the HF `model`."""
    out: dict[str, torch.Tensor] = {}
    for key, module in model.named_modules():
        if isinstance(module, LoraLinear) and adapter_name in module.lora_A:
            out[f"{PREFIX}{key}.lora_A.weight"] = module.lora_A[adapter_name].weight
            out[f"{PREFIX}{key}.lora_B.weight"] = module.lora_B[adapter_name].weight
        elif isinstance(module, LoraEmbedding) and adapter_name in module.lora_embedding_A:
            out[f"{PREFIX}{key}.lora_embedding_A"] = module.lora_embedding_A[adapter_name]
            out[f"{PREFIX}{key}.lora_embedding_B"] = module.lora_embedding_B[adapter_name]
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for name, tensor in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{key}.{name}"] = tensor
        if isinstance(module, LoraLayer) and adapter_name in module.lora_magnitude_vector:
            out[f"{PREFIX}{key}.lora_magnitude_vector"] = module.lora_magnitude_vector[adapter_name].weight
        own_bias = getattr(module.base_layer, "bias", None) if isinstance(module, LoraLayer) else None
        if bias == "lora_only" and own_bias is not None:
            out[f"{PREFIX}{key}.base_layer.bias"] = own_bias
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias") and ".lora_" not in name and ".modules_to_save." not in name \
                    and ".original_module." not in name:
                out[f"{PREFIX}{name}"] = param
    return out


def state_dict_for_save(model: nn.Module, adapter_name: str, bias: str) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies, ready for safetensors."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_tensors(model, adapter_name, bias).items()}


def load_into(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str, bias: str, source: str) -> None:
    """Copy a PEFT state dict into adapter `adapter_name`; every check runs before the first copy."""
    targets = adapter_tensors(model, adapter_name, bias)
    extra_base = {}
    for key in state:
        if key not in targets and key.endswith(".base_layer.weight"):
            # PEFT saves the base embedding when an embedding is targeted; it is loaded back into the base layer
            extra_base[key] = model.get_parameter(key[len(PREFIX):])
    for key, tensor in state.items():
        target = targets.get(key, extra_base.get(key))
        if target is None:
            raise ValueError(f"{source}: key '{key}' has no matching module in the model "
                             f"(was the adapter trained on another architecture?)")
        if tuple(target.shape) != tuple(tensor.shape):
            module = key[len(PREFIX):].rsplit(".", 2 if key.endswith(".weight") else 1)[0]
            raise ValueError(f"{source}: module '{module}' does not fit this model: '{key}' has shape "
                             f"{tuple(tensor.shape)} in the adapter but {tuple(target.shape)} in the model")
    missing = [k for k in targets if k not in state and ".lora_" in k]
    if missing:
        raise ValueError(f"{source}: adapter file lacks '{missing[0]}' ({len(missing)} tensors missing)")
    with torch.no_grad():
        for key, tensor in state.items():
            target = targets.get(key, extra_base.get(key))
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))


def read_adapter(directory: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Config and tensors of a PEFT adapter directory (safetensors, or the legacy .bin)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory '{directory}' does not exist")
    config = LoraConfig.load(directory)
    weights = directory / WEIGHTS_NAME
    if weights.is_file():
        state = load_file(str(weights))
    elif (directory / LEGACY_WEIGHTS_NAME).is_file():
        state = torch.load(directory / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) next to {CONFIG_NAME}")
    return config, state


def write_adapter(directory: str | Path, config: LoraConfig, state: dict[str, torch.Tensor]) -> None:
    """Write config + weights atomically: a temporary sibling directory renamed into place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config.save(tmp)
        directory.mkdir(exist_ok=True)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
