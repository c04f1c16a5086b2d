"""The PEFT adapter format: adapter_config.json + adapter_model.safetensors.

File keys are the in-memory names with the adapter name dropped, prefixed with `base_model.model.`:
    model.layers.0.self_attn.q_proj.lora_A.default.weight  ->  base_model.model.model.layers.0...q_proj.lora_A.weight
    ...q_proj.lora_magnitude_vector.default.weight         ->  ...q_proj.lora_magnitude_vector
    AdaLoRA: ...q_proj.lora_A / lora_B / lora_E (PEFT's keys), only the triplets its rank_pattern keeps
    lm_head.modules_to_save.default.weight                  ->  base_model.model.lm_head.weight
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import staged_files
from .config import CONFIG_NAME, LoraConfig
from .layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave
from .params import LoraParameters

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
BASE_PREFIX = "base_model.model."  # before every tensor key in a PEFT file


def adapter_tensors(model: nn.Module, adapter_name: str, bias: str) -> dict[str, torch.Tensor]:
    """File key -> live tensor (parameter data) for adapter `adapter_name` of the HF `model`."""
    out: dict[str, torch.Tensor] = {}
    for key, module in model.named_modules():
        if isinstance(module, LoraLinear) and adapter_name in module.lora_E:  # AdaLoRA: PEFT's keys have no .weight
            out[f"{BASE_PREFIX}{key}.lora_A"] = module.lora_A[adapter_name].weight
            out[f"{BASE_PREFIX}{key}.lora_B"] = module.lora_B[adapter_name].weight
            out[f"{BASE_PREFIX}{key}.lora_E"] = module.lora_E[adapter_name]
        elif isinstance(module, LoraParameters) and adapter_name in module.lora_A:
            depth = len(module.param_names)
            for i, pname in enumerate(module.param_names):  # PEFT nests one wrapper per parameter, first innermost
                path = f"{BASE_PREFIX}{key}" + ".base_layer" * (depth - 1 - i)
                out[f"{path}.lora_A.weight"] = module.lora_A[adapter_name][pname].weight
                out[f"{path}.lora_B.weight"] = module.lora_B[adapter_name][pname].weight
        elif isinstance(module, LoraLinear) and adapter_name in module.lora_A:
            out[f"{BASE_PREFIX}{key}.lora_A.weight"] = module.lora_A[adapter_name].weight
            out[f"{BASE_PREFIX}{key}.lora_B.weight"] = module.lora_B[adapter_name].weight
        elif isinstance(module, LoraEmbedding) and adapter_name in module.lora_embedding_A:
            out[f"{BASE_PREFIX}{key}.lora_embedding_A"] = module.lora_embedding_A[adapter_name]
            out[f"{BASE_PREFIX}{key}.lora_embedding_B"] = module.lora_embedding_B[adapter_name]
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for name, tensor in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[f"{BASE_PREFIX}{key}.{name}"] = tensor
        if isinstance(module, LoraLayer) and adapter_name in module.lora_magnitude_vector:
            out[f"{BASE_PREFIX}{key}.lora_magnitude_vector"] = module.lora_magnitude_vector[adapter_name].weight
        own_bias = getattr(module.base_layer, "bias", None) if isinstance(module, LoraLayer) else None
        if bias == "lora_only" and own_bias is not None:
            out[f"{BASE_PREFIX}{key}.base_layer.bias"] = own_bias
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias") and ".lora_" not in name and ".modules_to_save." not in name \
                    and ".original_module." not in name:
                out[f"{BASE_PREFIX}{name}"] = param
    return out


def state_dict_for_save(model: nn.Module, adapter_name: str, bias: str) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies, ready for safetensors."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_tensors(model, adapter_name, bias).items()}


def load_into(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str, bias: str,
              source: str) -> dict[str, torch.Tensor]:
    """Copy a PEFT state dict into adapter `adapter_name`; every check runs before the first copy.

    Every tensor the adapter's config implies must be in the file (factors, DoRA magnitudes, modules_to_save copies,
    trained biases): a missing one is an error naming it, never a silently untrained value. PEFT also saves a
    targeted embedding's base weight (`...embed_tokens.base_layer.weight`); where it differs from the model's, it
    is copied into the base and the replaced weight is returned (parameter name -> original), so that the caller
    can restore the base when the adapter goes (LoraModel.delete_adapter, unload)."""
    targets = adapter_tensors(model, adapter_name, bias)
    extra_base = {key: model.get_parameter(key[len(BASE_PREFIX):]) for key in state
                  if key not in targets and key.endswith(".base_layer.weight") and _has_parameter(model, key)}
    for key, tensor in state.items():
        target = targets.get(key, extra_base.get(key))
        if target is None:
            raise ValueError(f"{source}: key '{key}' has no matching module in the model "
                             f"(was the adapter trained on another architecture?)")
        if tuple(target.shape) != tuple(tensor.shape):
            module = key[len(BASE_PREFIX):].rsplit(".", 2 if key.endswith(".weight") else 1)[0]
            raise ValueError(f"{source}: module '{module}' does not fit this model: '{key}' has shape "
                             f"{tuple(tensor.shape)} in the adapter but {tuple(target.shape)} in the model")
    missing = [k for k in targets if k not in state]
    if missing:
        shown = ", ".join(f"'{k}'" for k in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(f"{source}: the adapter file lacks {len(missing)} tensor(s) its config implies: {shown}")
    replaced = {}
    with torch.no_grad():
        for key, tensor in state.items():
            if key in extra_base:
                target = extra_base[key]
                if torch.equal(target, tensor.to(device=target.device, dtype=target.dtype)):
                    continue
                replaced[key[len(BASE_PREFIX):]] = target.detach().clone()
            target = targets.get(key, extra_base.get(key))
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    return replaced


def _has_parameter(model: nn.Module, key: str) -> bool:
    try:
        model.get_parameter(key[len(BASE_PREFIX):])
    except AttributeError:
        return False
    return True


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
    """Write config + weights together or not at all (`lorakit.files.staged_files`): on any error the directory
    keeps the adapter files it had."""
    with staged_files(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config.save(tmp)
