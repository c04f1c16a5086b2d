"""lorakit: LoRA fine-tuning for causal language models, in the PEFT adapter format."""

from .lora import (
    AdaLoraConfig,
    LoraConfig,
    LoraGAConfig,
    LoraModel,
    get_lora_model,
    get_peft_model_state_dict,
    gradient_factors,
    set_peft_model_state_dict,
)
from .quant import dequantize_model, merge_dequantized, quantize_model

__version__ = "0.1.0"

__all__ = ["AdaLoraConfig", "LoraConfig", "LoraGAConfig", "LoraModel", "gradient_factors", "get_lora_model",
           "get_peft_model_state_dict", "set_peft_model_state_dict", "quantize_model", "dequantize_model",
           "merge_dequantized"]
