"""The merge policy for an adapter trained on a quantized base, explicit and measured:

1. dequantize every base layer to the dtype it had before quantization (what the adapter was trained against);
2. merge the adapters with the delta computed in fp32 (LoraLayer.merge);
3. cast the merged model to a 16-bit dtype (bf16 by default) — the model that gets saved;
4. optionally quantize it again (4-bit, for inference on small memory);
and report the largest logits difference between the quantized base + adapter (what was trained) and each
merged model on a fixed probe batch. Merging straight into 4-bit weights is refused (LoraLayer.merge).
"""

from __future__ import annotations

import torch
from torch import nn

from .convert import QuantizationError, dequantize_model, quantize_model, quantized_layers

SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def probe_batch(model: nn.Module, length: int = 16, rows: int = 2) -> torch.Tensor:
    """A fixed batch of token ids within the model's vocabulary."""
    vocab = model.get_input_embeddings().weight.shape[0]
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(1234))


@torch.no_grad()
def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits.float().cpu()


def merge_dequantized(lora_model, dtype: torch.dtype = torch.bfloat16, requantize: bool = False,
                      probe: torch.Tensor | None = None) -> tuple[nn.Module, dict]:
    """Merge the active adapter of `lora_model` (a LoraModel on a quantized base) by the policy above.

    Returns (the merged plain model in `dtype`, report). The report has `max_abs_diff` (quantized base + adapter
    vs the merged 16-bit model), `max_abs_diff_fp32` (vs the merged model before the 16-bit cast: the merge
    itself, ~0) and, with `requantize`, `max_abs_diff_requantized` (the merged model quantized to 4-bit again;
    the returned model is then that one). `lora_model` is consumed: its base is changed in place.
    """
    if dtype not in SIXTEEN_BIT:
        raise QuantizationError(f"the merged model is saved in 16 bits: dtype must be bfloat16 or float16, "
                                f"got {dtype}")
    base = lora_model.get_base_model()
    info = dict(getattr(base, "lorakit_quantization", None) or {})
    if not quantized_layers(base):
        raise QuantizationError("the model has no quantized layer; merge it with merge_and_unload()")
    was_training = base.training
    base.eval()
    probe = probe_batch(base) if probe is None else probe
    reference = logits_of(lora_model, probe)  # what training optimised: quantized base + adapter
    dequantize_model(base)
    merged = lora_model.merge_and_unload()
    report = {"policy": "dequantize -> merge in fp32 -> " + str(dtype).removeprefix("torch."),
              "max_abs_diff_fp32": _diff(merged, probe, reference)}
    merged.to(dtype)
    report["max_abs_diff"] = _diff(merged, probe, reference)
    if requantize:
        quantize_model(merged, bits=info.get("bits", 4), quant_type=info.get("quant_type", "nf4"),
                       double_quant=info.get("double_quant", True), backend=info.get("backend", "auto"))
        report["max_abs_diff_requantized"] = _diff(merged, probe, reference)
    merged.train(was_training)
    return merged, report


def _diff(model: nn.Module, probe: torch.Tensor, reference: torch.Tensor) -> float:
    return (logits_of(model, probe) - reference).abs().max().item()
