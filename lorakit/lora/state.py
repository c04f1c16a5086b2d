"""PEFT's state-dict helpers by name: the adapter's tensors under their file keys, and loading them back."""

from __future__ import annotations

import torch

from . import io
from .model import LoraModel


def get_peft_model_state_dict(model: LoraModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT file keys (not converted: PiSSA/OLoRA factors stay as trained)."""
    return io.state_dict_for_save(model.model, adapter_name, model.peft_config[adapter_name].bias)


def set_peft_model_state_dict(model: LoraModel, state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default") -> None:
    """Copy `state_dict` (PEFT file keys) into adapter `adapter_name`, checking every key and shape first."""
    replaced = io.load_into(model.model, state_dict, adapter_name, model.peft_config[adapter_name].bias,
                            source="state_dict")
    model._replaced_base.setdefault(adapter_name, {}).update(replaced)  # restored by delete_adapter and unload
