"""Export a merged model as a standalone Hugging Face directory that plain `transformers` loads.

Written into a temporary sibling directory and renamed into place at the end, so an interrupted export leaves
nothing half-written. After writing, the files are loaded back with transformers alone and their logits compared
with the model the caller had (adapter applied, not merged) on a probe batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..dtypes import DTYPE_NAMES
from .staging import staged_directory


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPE_NAMES:
        raise ValueError(f"export_dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def probe_ids(vocab_size: int, length: int = 16) -> torch.Tensor:
    """A fixed batch of token ids for the before/after logits comparison."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (2, length), generator=g)


@torch.no_grad()
def logits_on(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits.float().cpu()


def export_hf(model: nn.Module, tokenizer, directory: str | Path, dtype: torch.dtype = torch.float32,
              shard_size_gb: float = 5.0, reference_logits: torch.Tensor | None = None,
              probe: torch.Tensor | None = None, overwrite: bool = False, tolerance: float | None = None) -> dict:
    """Save `model` (plain transformers, already merged) + tokenizer to `directory`; returns a report.

    When `reference_logits` (on `probe`) is given, the written model is reloaded with transformers and the largest
    absolute logits difference is reported as `max_abs_diff`; above `tolerance` the export is refused and nothing
    is left on disk. A model with quantized layers is refused: see `export_merged_quantized`.
    """
    from ..quant import quantized_layers

    if quantized_layers(model):
        raise ValueError("the model has quantized (4/8-bit) layers; export a QLoRA adapter with "
                         "export_merged_quantized (dequantize -> merge in fp32 -> 16-bit), or merge it into the "
                         "unquantized base")
    with staged_directory(directory, overwrite) as tmp:
        model.to(dtype)
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(tmp, max_shard_size=f"{int(shard_size_gb * 1000)}MB", safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        report = {"export_dir": str(directory), "dtype": str(dtype).removeprefix("torch."),
                  "files": sorted(p.name for p in tmp.iterdir()),
                  "bytes": sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())}
        if reference_logits is not None:
            report["max_abs_diff"] = diff = _reload_and_compare(tmp, probe, reference_logits)
            if tolerance is not None and diff > tolerance:
                raise ValueError(f"exported model differs from the adapter model: max |logits diff| {diff:.2e} "
                                 f"> {tolerance:.0e}; nothing was written")
    return report


def export_merged_quantized(lora_model, tokenizer, directory: str | Path, dtype: torch.dtype = torch.bfloat16,
                            overwrite: bool = False, tolerance: float | None = None) -> dict:
    """The QLoRA merge policy (lorakit.quant.merge): dequantize the base to its original dtype, merge the adapter in
    fp32, save a 16-bit model. The report's `max_abs_diff` compares the reloaded files with the quantized base +
    adapter the adapter was trained on; `merge` holds the in-memory differences."""
    from ..quant import merge_dequantized

    base = lora_model.get_base_model().eval()
    probe = probe_ids(base.get_input_embeddings().weight.shape[0])
    reference = logits_on(lora_model, probe)
    merged, merge_report = merge_dequantized(lora_model, dtype=dtype, probe=probe)
    report = export_hf(merged, tokenizer, directory, dtype=dtype, reference_logits=reference, probe=probe,
                       overwrite=overwrite, tolerance=tolerance)
    return {**report, "merge": merge_report}


def _reload_and_compare(directory: Path, probe: torch.Tensor, reference: torch.Tensor) -> float:
    """Load the written files with transformers alone (fp32) and compare logits with the reference."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    diff = (logits_on(reloaded.eval(), probe) - reference).abs().max().item()
    del reloaded
    return diff
