"""QLoRA's frozen 4/8-bit base: quantize a loaded model's linear layers, dequantize them back, merge an adapter
trained on them by an explicit policy, and 8-bit AdamW. Sits above `lorakit.lora` (which recognises quantized
layers by duck-typing) and needs only torch; bitsandbytes / torchao are used when installed and asked for."""

from .convert import (
    BACKENDS,
    Quantization,
    QuantizationError,
    dequantize_model,
    describe,
    quantize_model,
    quantized_layers,
    resolve_backend,
    weight_bytes,
)
from .linear import QuantLinear
from .merge import merge_dequantized
from .optim import EIGHT_BIT, eight_bit_optimizer

__all__ = [
    "BACKENDS", "EIGHT_BIT", "QuantLinear", "Quantization", "QuantizationError", "dequantize_model", "describe",
    "eight_bit_optimizer", "merge_dequantized", "quantize_model", "quantized_layers", "resolve_backend",
    "weight_bytes",
]
