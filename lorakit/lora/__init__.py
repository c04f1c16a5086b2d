"""The adapter core: needs only torch and safetensors."""

from .adalora import AdaLoraConfig, RankAllocator, orthogonal_penalty
from .config import LoraConfig, LoraGAConfig
from .layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave
from .loraga import GradientFactors, gradient_factors
from .model import LoraModel, get_lora_model
from .state import get_peft_model_state_dict, set_peft_model_state_dict

__all__ = [
    "AdaLoraConfig", "RankAllocator", "orthogonal_penalty", "LoraConfig", "LoraGAConfig", "GradientFactors",
    "gradient_factors", "LoraModel", "get_lora_model", "LoraLayer",
    "LoraLinear", "LoraEmbedding", "ModulesToSave", "get_peft_model_state_dict", "set_peft_model_state_dict",
]
