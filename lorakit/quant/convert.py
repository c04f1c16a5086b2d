"""Quantizing a loaded model's linear layers in place (QLoRA's frozen base), and dequantizing them back.

Two backends hold the 4/8-bit weights:
- "lorakit": `QuantLinear` (plain torch, any device, any shape; see linear.py);
- "bnb": bitsandbytes' Linear4bit / Linear8bitLt, the layers transformers' BitsAndBytesConfig creates.
"auto" takes bitsandbytes whenever it is installed (its fused kernels on CUDA; on this CPU it measured faster
than QuantLinear on most SmolLM2 shapes, bench/bench_qlora.py) and QuantLinear otherwise. torchao's NF4Tensor
was not taken: its second-level block (256) must divide the number of first-level blocks, which fails for
SmolLM2's 576x576 and 192x576 layers.

The output head (lm_head) is never quantized: it is where the loss is computed, and QLoRA keeps it 16-bit too.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..lora.layers import LoraLayer, dense_weight, is_conv1d, is_quantized
from .linear import QuantLinear

BACKENDS = ("auto", "lorakit", "bnb")
QUANT_TYPES = ("nf4", "fp4")


class QuantizationError(ValueError):
    """A quantization request that cannot be carried out (bad settings, a missing package)."""


def require(package: str, purpose: str, alternatives: str) -> object:
    """Import `package` or raise a QuantizationError that says what needs it and what else would do."""
    if package == "bitsandbytes":
        # bitsandbytes' CPU backend tries to fetch an optional kernel from the Hugging Face hub at import and warns
        # when it can't (always, offline); its built-in kernels are what it then uses, so the warning is noise
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        return importlib.import_module(package)
    except ImportError:
        pip = {"bitsandbytes": "bitsandbytes>=0.50", "torchao": "torchao"}.get(package, package)
        raise QuantizationError(f"{purpose} needs the '{package}' package, which is not installed "
                                f"(pip install '{pip}'); {alternatives}") from None


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """"auto" -> "bnb" when bitsandbytes is installed, else "lorakit"."""
    if backend not in BACKENDS:
        raise QuantizationError(f"quantization backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    if importlib.util.find_spec("bitsandbytes") is not None:
        return "bnb"
    return "lorakit"


def _head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, m in model.named_modules() if head is not None and m is head}


def quantizable(model: nn.Module, skip_modules: list[str] | None = None) -> list[str]:
    """Names of the linear layers `quantize_model` would replace: every nn.Linear / Conv1D but the output head."""
    skip = _head_names(model) | set(skip_modules or [])
    return [name for name, m in model.named_modules()
            if (type(m) is nn.Linear or is_conv1d(m)) and name not in skip
            and not any(name == s or name.endswith("." + s) for s in skip)]


@dataclass(frozen=True)
class Quantization:
    """How the base's linear layers are stored (QLoRA): `quantize_model`'s settings, for `load_model`."""

    bits: int = 4
    """4 (`quant_type` nf4 or fp4, blocks of 64) or 8 (int8 per output row)."""
    quant_type: str = "nf4"
    double_quant: bool = True
    """4-bit: also quantize the per-block scales to 8 bits."""
    compute_dtype: torch.dtype | None = None
    """Matmul dtype; None: the input's (or the autocast dtype)."""
    backend: str = "auto"
    """lorakit, bnb, or auto (bnb when bitsandbytes is installed)."""

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise QuantizationError(f"quantization bits must be 4 or 8, got {self.bits!r}")
        if self.quant_type not in QUANT_TYPES:
            raise QuantizationError(f"quantization type must be nf4 or fp4, got {self.quant_type!r}")
        if self.backend not in BACKENDS:
            raise QuantizationError(f"quantization backend must be one of {', '.join(BACKENDS)}, "
                                    f"got {self.backend!r}")


def quantize_model(model: nn.Module, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None, backend: str = "auto",
                   skip_modules: list[str] | None = None) -> nn.Module:
    """Replace the model's linear layers (not the output head, not `skip_modules`) by frozen 4- or 8-bit ones.

    bits 4: `quant_type` nf4 or fp4, `double_quant` also quantizes the block scales (QLoRA). bits 8: int8 rows.
    `compute_dtype` is the matmul dtype (None: the input's, or the autocast dtype). Call it before adding LoRA;
    returns `model`, changed in place. Use `dequantize_model` to get dense layers back, and
    `load_model(..., quantization=Quantization(...))` to quantize while loading instead (never holding the
    full-precision layers).
    """
    Quantization(bits, quant_type, double_quant, compute_dtype, backend)  # checks the settings
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise QuantizationError("quantize the model before adding LoRA adapters (quantize_model, then "
                                "get_lora_model)")
    names = quantizable(model, skip_modules)
    if not names:
        raise QuantizationError("the model has no linear layer to quantize (besides the output head)")
    device = next(iter(model.get_submodule(names[0]).parameters())).device
    chosen = resolve_backend(backend, device)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        weight, bias = dense_of(getattr(parent, child), getattr(parent, child).weight.detach())
        setattr(parent, child, quantized_linear(weight, bias, chosen, bits, quant_type, double_quant, compute_dtype))
    record_quantization(model, bits, quant_type, double_quant, chosen, len(names))
    trim_heap()
    return model


def record_quantization(model: nn.Module, bits: int, quant_type: str, double_quant: bool, backend: str,
                        layers: int) -> None:
    """What the training log says about a quantized base (`describe`)."""
    model.lorakit_quantization = {"bits": bits, "quant_type": quant_type if bits == 4 else "int8",
                                  "double_quant": double_quant and bits == 4, "backend": backend, "layers": layers}


def dense_of(linear: nn.Module, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias) of an nn.Linear or a transformers Conv1D (whose `weight` is stored (in, out))."""
    return (weight.T.contiguous() if is_conv1d(linear) else weight), linear.bias


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None, backend: str, bits: int, quant_type: str,
                     double_quant: bool, compute_dtype: torch.dtype | None) -> nn.Module:
    """The frozen quantized layer for a dense weight (out, in) and bias, on the weight's device; `backend` is
    "lorakit" or "bnb" (as `resolve_backend` gives it). Both quantization routes (after loading, while loading)
    go through here, so they store the same values."""
    if backend == "bnb":
        return _to_bnb(weight, bias, bits, quant_type, double_quant, compute_dtype)
    return QuantLinear(weight, bias, bits=bits, quant_type=quant_type, double_quant=double_quant,
                       compute_dtype=compute_dtype)


def _to_bnb(weight: torch.Tensor, bias: torch.Tensor | None, bits: int, quant_type: str, double_quant: bool,
            compute_dtype: torch.dtype | None) -> nn.Module:
    """The bitsandbytes layer transformers' BitsAndBytesConfig would have made (quantized by moving it)."""
    bnb = require("bitsandbytes", "quantization backend bnb", "or use backend lorakit (plain torch)")
    out_features, in_features = weight.shape
    device = weight.device
    if bits == 4:
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                                  compress_statistics=double_quant, quant_type=quant_type, device="meta")
        layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, blocksize=64,
                                         compress_statistics=double_quant, quant_type=quant_type, module=layer)
    else:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                    threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
        layer.lorakit_dtype = weight.dtype  # Int8Params forgets it; dequantize_model restores it
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().cpu().clone(), requires_grad=False)
    # bitsandbytes 0.50 repacks 4-bit weights for its AVX512-BF16 CPU inference kernel at the first no-grad eval
    # forward, and that repacking fails when in_features is not a multiple of the block (64); the training path
    # (dequantize + matmul) is kept instead
    layer.support_avx512bf16_for_cpu = False
    return layer.to(device)  # bitsandbytes quantizes on this move


def trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc's `malloc_trim`; a no-op without glibc), so what a
    replaced full-precision layer and the quantizer's temporaries held stops counting as resident."""
    try:
        trim = getattr(ctypes.CDLL("libc.so.6"), "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every quantized linear in the model (lorakit's, bitsandbytes' 4- and 8-bit), LoRA base layers included."""
    return [(name, m) for name, m in model.named_modules() if is_quantized(m)]


def original_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a quantized layer's weight had before quantization (float32 when unknown)."""
    if isinstance(layer, QuantLinear):
        return layer.dtype
    state = getattr(layer.weight, "quant_state", None)
    # bitsandbytes' CPU inference repacking sets quant_state.dtype to bf16 and keeps the real one as original_dtype
    dtype = getattr(state, "original_dtype", None) or getattr(state, "dtype", None)
    return dtype or getattr(layer, "lorakit_dtype", torch.float32)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized linear by an nn.Linear holding its dequantized weight (in `dtype`, default the
    layer's original dtype); LoRA layers keep their adapters around the new base. In place; returns `model`.

    The result is exactly the function the quantized model computed (up to the matmul dtype), so adapters trained
    on the quantized base keep their meaning and can then be merged.
    """
    for name, layer in quantized_layers(model):
        target = dtype or original_dtype(layer)
        weight = dense_weight(layer).to(target)
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=weight.device, dtype=target)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if layer.bias is not None:
                dense.bias.copy_(layer.bias.detach().to(target))
        dense.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
    _forget_hf_quantization(model)
    return model


def _forget_hf_quantization(model: nn.Module) -> None:
    """Drop transformers' record of a bitsandbytes load, so save_pretrained writes plain dense weights."""
    for m in model.modules():
        if getattr(m, "hf_quantizer", None) is not None:
            m.hf_quantizer = None
        if getattr(m, "quantization_method", None) is not None:  # transformers refuses .to(dtype) while it is set
            m.quantization_method = None
        config = getattr(m, "config", None)
        if config is not None and getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
            if getattr(m, flag, False) is True and not isinstance(type(m).__dict__.get(flag), property):
                setattr(m, flag, False)
        if hasattr(m, "lorakit_quantization"):
            del m.lorakit_quantization


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's weights: parameters, buffers and bitsandbytes' quantization constants."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [state.absmax, getattr(state, "code", None)]
            nested = getattr(state, "state2", None)
            tensors += [nested.absmax, nested.code] if nested is not None else []
        scb = getattr(getattr(m, "weight", None), "SCB", None)
        tensors.append(scb)
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def describe(model: nn.Module) -> str:
    """One line on how the model's linears are stored, for the training log."""
    layers = quantized_layers(model)
    if not layers:
        return "base: not quantized"
    info = getattr(model, "lorakit_quantization", None)
    kind = (f"{info['bits']}-bit {info['quant_type']}{' double-quant' if info['double_quant'] else ''} "
            f"({info['backend']})") if info else type(layers[0][1]).__name__
    return f"base: {len(layers)} linear layers {kind}; weights {weight_bytes(model) / 2**20:.1f} MiB"
