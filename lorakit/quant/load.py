"""Loading a checkpoint straight into quantized linear layers: QLoRA without ever holding the full-precision base.

    model = the architecture built from config.json, its parameters on the meta device (no memory; buffers real)
    for each linear layer to quantize (every one but the output head):
        read its weight (and bias) from the safetensors file, quantize it (`convert.quantized_linear`), put it in
    read every other tensor (embeddings, norms, the head), assign it; tie the head; give the freed heap back

so at any time one layer's full-precision weight exists next to the quantized ones, and the values are those
`quantize_model` stores after an ordinary load (both go through `quantized_linear`). A file is opened (memory-mapped)
for the tensors of one layer and closed again, so the checkpoint's pages do not stay resident either.

A checkpoint this cannot stream — no safetensors files, or tensor names other than the model's own (an older
layout that transformers renames while loading) — gives None, and the caller loads it whole and quantizes after.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .convert import (
    Quantization,
    dense_of,
    quantizable,
    quantized_linear,
    record_quantization,
    resolve_backend,
    trim_heap,
)

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"


def checkpoint_files(path: Path) -> dict[str, Path] | None:
    """tensor name -> safetensors file of the checkpoint in `path` (one file or a sharded index); None if none."""
    index = path / INDEX_NAME
    if index.is_file():
        return {key: path / name for key, name in json.loads(index.read_text())["weight_map"].items()}
    single = path / WEIGHTS_NAME
    if not single.is_file():
        return None
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def read_tensors(files: dict[str, Path], keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors `keys` (floating ones in `dtype`), each file opened once for them and closed again."""
    by_file: dict[Path, list[str]] = defaultdict(list)
    for key in keys:
        by_file[files[key]].append(key)
    out = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                tensor = f.get_tensor(name)
                out[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out


def empty_model(path: Path, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """The model of `path`'s config.json with every parameter on the meta device (buffers such as rotary
    frequencies are computed for real, as the architecture's constructor does)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)


def tied_keys(model: nn.Module) -> set[str]:
    """Parameter names a checkpoint may leave out because they are tied to another (the output head)."""
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers 5: {target: source}
    if tied is not None:
        return set(tied)
    head = model.get_output_embeddings()
    if not getattr(model.config, "tie_word_embeddings", False) or head is None:
        return set()
    return {f"{name}.weight" for name, m in model.named_modules() if m is head}


def load_quantized(path: Path, quantization: Quantization, dtype: torch.dtype, device: torch.device,
                   attn_implementation: str = "sdpa") -> nn.Module | None:
    """The model in `path` with its linear layers (not the output head) quantized while they are read, on
    `device`, in eval mode; None when the checkpoint cannot be streamed (see the module docstring)."""
    files = checkpoint_files(path)
    if files is None:
        return None
    model = empty_model(path, dtype, attn_implementation)
    expected = set(model.state_dict())
    if expected - set(files) - tied_keys(model):
        return None  # names transformers would have to convert; nothing has been read yet
    backend = resolve_backend(quantization.backend, device)
    names = quantizable(model)
    for name in names:
        module = model.get_submodule(name)
        keys = [f"{name}.weight"] + ([f"{name}.bias"] if module.bias is not None else [])
        tensors = read_tensors(files, keys, dtype)
        weight, _ = dense_of(module, tensors[keys[0]].to(device))
        bias = tensors[keys[1]].to(device) if len(keys) > 1 else None
        layer = quantized_linear(weight, bias, backend, quantization.bits, quantization.quant_type,
                                 quantization.double_quant, quantization.compute_dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        del weight, bias, tensors  # the full-precision copy goes before the next layer is read
        trim_heap()  # and so do the quantizer's temporaries, which glibc would otherwise keep in the heap
    quantized = {f"{name}.{p}" for name in names for p in ("weight", "bias")}
    rest = [key for key in expected & set(files) if key not in quantized]
    model.load_state_dict(read_tensors(files, rest, dtype), strict=False, assign=True)
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{path}: no tensor for {', '.join(left[:3])} in the checkpoint")
    record_quantization(model, quantization.bits, quantization.quant_type, quantization.double_quant, backend,
                        len(names))
    model.to(device).eval()
    trim_heap()
    return model
