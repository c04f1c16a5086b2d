"""The adapter core: needs only torch and safetensors."""

from .config import LoraConfig
from .layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave
from .model import LoraModel, get_lora_model
from .state import get_peft_model_state_dict, set_peft_model_state_dict

__all__ = [
    "LoraConfig", "LoraModel", "get_lora_model", "LoraLayer", "LoraLinear", "LoraEmbedding", "ModulesToSave",
    "get_peft_model_state_dict", "set_peft_model_state_dict",
]
