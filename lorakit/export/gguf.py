"""GGUF export for llama.cpp and Ollama: a merged model, an adapter on its own, and an Ollama Modelfile.

    write_gguf(merged, tokenizer, "out/model.gguf", quant="q8_0")   # Llama / Mistral / Qwen2 -> one .gguf
    write_gguf_lora(lora_model, None, None, "out/adapter.gguf")      # for `llama-cli -m model.gguf --lora ...`
    write_modelfile("out/model.gguf", tokenizer)                     # out/Modelfile (lorakit.export.ollama)

The tokenizer part is in gguf_vocab.py, the Modelfile in ollama.py.
Tensor names and metadata keys are llama.cpp's (convert_hf_to_gguf.py, convert_lora_to_gguf.py), taken from the
`gguf` package's constants and TensorNameMap.

Rotary layout. HF Llama rotates the two halves of a head (rotate_half pairs dim i with i + d/2); llama.cpp's
`llama` architecture rotates adjacent pairs (2i, 2i+1). So q and k get their output rows reordered per head:
new row 2i = old row i, new row 2i+1 = old row i + d/2 (reshape (heads, 2, d/2, in), swap axes 1 and 2), k with
the KV head count. llama.cpp runs Qwen2 with NeoX (halves) rotary, so Qwen2 is written as it is. The reordering
acts on output rows only, so for a LoRA pair it is applied to B (out, r) and B A stays exact.

Types. 1-D tensors and norms stay f32; matrices take `quant`; a q8_0 matrix whose rows are not a multiple of the
32-value block falls back to f16, as llama.cpp's converter does.

LoRA scale. llama.cpp scales each pair by alpha / r, with r read from the tensor and one `adapter.lora.alpha` per
file. lorakit's scaling s is alpha / r (rsLoRA: alpha / sqrt(r)) per module. We write alpha_gguf = s * r for the
config's default rank (rsLoRA: alpha * sqrt(r)); a module whose s * r differs (rank_pattern / alpha_pattern) has
its B multiplied by s * r / alpha_gguf, so that alpha_gguf / r * B A = s B A for every module.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from ..files import staged_file
from ..lora import LoraConfig
from ..lora.io import BASE_PREFIX, read_adapter
from .gguf_vocab import add_tokenizer

Q = gguf.GGMLQuantizationType
T = gguf.MODEL_TENSOR
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
QUANTS = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
          "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
LORA_QUANTS = ("f32", "f16")


# ---------------------------------------------------------------- the model's numbers


@dataclass(frozen=True)
class Hparams:
    """What llama.cpp reads from a Llama-family config."""

    arch: gguf.MODEL_ARCH
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    eps: float
    rope_theta: float
    rope_scaling: dict | None

    @classmethod
    def from_config(cls, config) -> "Hparams":
        """Read a transformers config; an unsupported architecture is a one-line ValueError."""
        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise ValueError(f"GGUF export does not support model_type '{model_type}'; "
                             f"supported: {', '.join(ARCHITECTURES)}")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"GGUF export: llama.cpp's {model_type} uses SiLU, this model uses {config.hidden_act}")
        params = dict(getattr(config, "rope_parameters", None) or {})  # transformers 5; 4.x: rope_theta/scaling
        scaling = params if params.get("rope_type", "default") != "default" else getattr(config, "rope_scaling", None)
        n_head = config.num_attention_heads
        return cls(arch=ARCHITECTURES[model_type], n_layer=config.num_hidden_layers, n_embd=config.hidden_size,
                   n_ff=config.intermediate_size, n_head=n_head,
                   n_head_kv=getattr(config, "num_key_value_heads", None) or n_head,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_head,
                   n_ctx=config.max_position_embeddings, eps=config.rms_norm_eps,
                   rope_theta=params.get("rope_theta", getattr(config, "rope_theta", 10000.0)),
                   rope_scaling=dict(scaling) if scaling else None)

    @property
    def permutes(self) -> bool:
        return self.arch == gguf.MODEL_ARCH.LLAMA


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k weight (or bias, or LoRA B) from HF's rotate-half order to llama.cpp's interleaved pairs."""
    rows = w.shape[0]
    # (heads, 2, d/2, ...) -> (heads, d/2, 2, ...): row (h, s, i) moves to (h, i, s), i.e. h*d + 2i + s
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _add_hparams(writer: gguf.GGUFWriter, hp: Hparams, n_vocab: int) -> torch.Tensor | None:
    """Architecture metadata; returns llama3's rope_freqs tensor when the model needs one."""
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.eps)
    writer.add_vocab_size(n_vocab)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim != hp.n_embd // hp.n_head:  # llama.cpp assumes n_embd / n_head unless told
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    return _add_rope_scaling(writer, hp)


def _add_rope_scaling(writer: gguf.GGUFWriter, hp: Hparams) -> torch.Tensor | None:
    scaling = hp.rope_scaling
    kind = scaling and scaling.get("rope_type", scaling.get("type"))
    if not kind or kind == "default":
        return None
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(kind))
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        if kind == "yarn" and scaling.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        return None
    if kind == "llama3":
        return _llama3_rope_factors(hp, scaling)
    raise ValueError(f"GGUF export: rope scaling '{kind}' has no llama.cpp equivalent (linear, yarn, llama3 have)")


def _llama3_rope_factors(hp: Hparams, scaling: dict) -> torch.Tensor:
    """Llama 3.1's per-frequency divisors, which llama.cpp reads from the `rope_freqs` tensor."""
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / hp.rope_theta ** (torch.arange(0, hp.head_dim, 2, dtype=torch.float64) / hp.head_dim)  # (d/2,)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = 1 / ((1 - smooth) / factor + smooth)  # between the two bands: interpolated
    factors = torch.where(wavelen > old_ctx / low, torch.full_like(freqs, factor), factors)  # long: fully scaled
    factors = torch.where(wavelen < old_ctx / high, torch.ones_like(freqs), factors)  # short: untouched
    return factors.float()


# ---------------------------------------------------------------- tensors


@dataclass
class _Entry:
    """One GGUF tensor: its name, the source tensor (HF layout), rows to permute, and the stored type."""

    name: str
    tensor: torch.Tensor
    heads: int | None
    qtype: Q

    def nbytes(self) -> int:
        return int(np.prod(gguf.quant_shape_to_byte_shape(tuple(self.tensor.shape), self.qtype)))

    def encode(self) -> np.ndarray:
        """The bytes llama.cpp reads: permuted (llama q/k), then converted or quantised."""
        w = self.tensor.detach().to("cpu", torch.float32)
        if self.heads is not None:
            w = permute_rotary(w, self.heads)
        array = w.contiguous().numpy()
        if self.qtype == Q.F32:
            return array
        if self.qtype == Q.F16:
            out = array.astype(np.float16)
            if not np.isfinite(out).all():
                raise ValueError(f"GGUF export: '{self.name}' has values beyond float16's range; use bf16 or f32")
            return out
        return gguf.quants.quantize(array, self.qtype)


def _qtype(name: str, shape: tuple[int, ...], quant: Q) -> Q:
    """llama.cpp's rule: 1-D and norms in f32; q8_0 only where rows split into whole 32-value blocks, else f16."""
    if len(shape) == 1 or name.endswith("_norm.weight"):
        return Q.F32
    if quant == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return quant


def _gguf_name(names: gguf.TensorNameMap, hp: Hparams, module: str) -> tuple[T, str] | None:
    found = names.get_type_and_name(module)
    if found is None or found[0] not in gguf.MODEL_TENSORS[hp.arch]:
        return None
    return found


def _rotary_heads(hp: Hparams, kind: T) -> int | None:
    if hp.permutes and kind == T.ATTN_Q:
        return hp.n_head
    if hp.permutes and kind == T.ATTN_K:
        return hp.n_head_kv
    return None


def _model_entries(model: nn.Module, hp: Hparams, quant: Q) -> list[_Entry]:
    """Every parameter under its llama.cpp name; a tied output head appears once (as token_embd)."""
    names = gguf.get_tensor_name_map(hp.arch, hp.n_layer)
    entries, unknown = [], []
    for key, param in model.named_parameters():  # remove_duplicate: a tied lm_head is skipped, as llama.cpp does
        if ".lora_" in key or ".base_layer." in key:
            raise ValueError(f"GGUF export needs a plain model, but '{key}' is a LoRA parameter; "
                             f"merge_and_unload() first, or export the adapter with write_gguf_lora")
        module, suffix = key.rsplit(".", 1)
        found = _gguf_name(names, hp, module)
        if found is None:
            unknown.append(key)
            continue
        name = f"{found[1]}.{suffix}"
        entries.append(_Entry(name, param, _rotary_heads(hp, found[0]), _qtype(name, tuple(param.shape), quant)))
    if unknown:
        raise ValueError(f"GGUF export: no llama.cpp tensor for '{unknown[0]}' ({len(unknown)} parameters unmapped)")
    return entries


def _write(writer: gguf.GGUFWriter, entries: list[_Entry], path: Path) -> int:
    """Header, metadata and tensors into a temporary sibling, renamed into place; one tensor in memory at a time."""
    for e in entries:
        writer.add_tensor_info(e.name, tuple(e.tensor.shape), np.dtype(np.float32), e.nbytes(), raw_dtype=e.qtype)
    with staged_file(path) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for e in entries:
                writer.write_tensor_data(e.encode())
        finally:
            writer.close()
    return path.stat().st_size


def write_gguf(model: nn.Module, tokenizer, path: str | Path, quant: str = "f16", name: str | None = None,
               pre_tokenizer: str | None = None) -> dict:
    """Write a merged Llama / Mistral / Qwen2 causal LM and its tokenizer as one GGUF file for llama.cpp / Ollama.

    quant: "f32", "f16", "bf16" or "q8_0". pre_tokenizer overrides the detected `tokenizer.ggml.pre`.
    Returns {"path", "tensors", "bytes", "quant", "architecture", "seconds"}. Nothing is left behind on failure.
    """
    start = time.perf_counter()
    if quant not in QUANTS:
        raise ValueError(f"GGUF quant '{quant}' is not one of {', '.join(QUANTS)}")
    if tokenizer is None:
        raise ValueError("GGUF export needs the tokenizer: llama.cpp and Ollama read the vocabulary from the file")
    qtype, ftype = QUANTS[quant]
    hp = Hparams.from_config(model.config)
    entries = _model_entries(model, hp, qtype)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    arch = gguf.MODEL_ARCH_NAMES[hp.arch]
    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or Path(str(getattr(model.config, "name_or_path", "") or "model")).name)
    rope_freqs = _add_hparams(writer, hp, n_vocab)
    if rope_freqs is not None:
        entries.insert(1, _Entry(gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight", rope_freqs, None, Q.F32))
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, n_vocab, pre_tokenizer)
    size = _write(writer, entries, Path(path))
    return {"path": str(path), "tensors": len(entries), "bytes": size, "quant": quant, "architecture": arch,
            "seconds": round(time.perf_counter() - start, 2)}


# ---------------------------------------------------------------- the adapter alone


def _adapter(lora, config: LoraConfig | None, adapter_name: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(config, PEFT-keyed tensors) from a LoraModel, an adapter directory, or a state dict + config."""
    if isinstance(lora, (str, Path)):
        file_config, state = read_adapter(lora)
        return config or file_config, state
    if isinstance(lora, dict):
        if config is None:
            raise ValueError("write_gguf_lora: a state dict needs its LoraConfig")
        return config, lora
    # the tensors save_pretrained writes: PiSSA/OLoRA factors already converted to plain LoRA on the original base
    return lora.exportable(adapter_name)


def _lora_pairs(config: LoraConfig, state: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """module path -> [A (r, in), B (out, r)]; adapters llama.cpp cannot carry are refused in one line."""
    if config.use_dora or any(k.endswith("lora_magnitude_vector") for k in state):
        raise ValueError("write_gguf_lora: llama.cpp LoRA adapters cannot carry DoRA magnitudes; merge the adapter "
                         "and export the whole model with write_gguf")
    if config.PEFT_TYPE != "LORA" or getattr(config, "target_parameters", None):
        kind = "AdaLoRA adapters" if config.PEFT_TYPE != "LORA" else "LoRA on expert tensors (target_parameters)"
        raise ValueError(f"write_gguf_lora: llama.cpp LoRA files cannot carry {kind}; merge the adapter and export "
                         f"the whole model with write_gguf")
    pairs: dict[str, list[torch.Tensor]] = {}
    for key, tensor in state.items():
        if ".lora_embedding_" in key:
            raise ValueError(f"write_gguf_lora: '{key}' is an embedding adapter, which llama.cpp LoRA files do not "
                             f"carry; merge the adapter and export the whole model with write_gguf")
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"write_gguf_lora: '{key}' (modules_to_save or a trained bias) has no place in a "
                             f"llama.cpp LoRA file; merge the adapter and export the whole model with write_gguf")
        module, part = key.removeprefix(BASE_PREFIX).rsplit(".", 2)[:2]
        pairs.setdefault(module, [None, None])[1 if part == "lora_B" else 0] = tensor
    return pairs


def write_gguf_lora(lora, config: LoraConfig | None, base_model, path: str | Path, adapter_name: str = "default",
                    quant: str = "f32") -> dict:
    """Write a LoRA adapter as a llama.cpp GGUF adapter (`llama-cli --lora`, Ollama's ADAPTER).

    lora: a LoraModel (config and base_model may be None), an adapter directory, or a PEFT state dict with its
    `config`. base_model: the HF model or its config (architecture and head counts). quant: "f32" or "f16".
    Returns {"path", "tensors", "bytes", "quant", "alpha"}.
    """
    if quant not in LORA_QUANTS:
        raise ValueError(f"GGUF LoRA quant '{quant}' is not one of {', '.join(LORA_QUANTS)}")
    config, state = _adapter(lora, config, adapter_name)
    if base_model is None and not hasattr(lora, "peft_config"):
        raise ValueError("write_gguf_lora: pass base_model (the HF model or its config) with a directory or state dict")
    base = base_model if base_model is not None else lora.model
    base_config = getattr(base, "config", base)
    hp = Hparams.from_config(base_config)
    pairs = _lora_pairs(config, state)
    if "lm_head" in pairs and getattr(base_config, "tie_word_embeddings", False):
        raise ValueError("write_gguf_lora: the adapter targets lm_head, which llama.cpp shares with the embeddings "
                         "in this tied model; merge the adapter and export the whole model with write_gguf")
    default_scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    alpha = default_scale * config.r or float(config.r)  # alpha 0 means "scale 1" to llama.cpp: fold 0 into B
    entries = _lora_entries(pairs, config, hp, alpha, QUANTS[quant][0])
    arch = gguf.MODEL_ARCH_NAMES[hp.arch]
    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(f"{Path(str(config.base_model_name_or_path or 'model')).name} LoRA '{adapter_name}'")
    writer.add_file_type(QUANTS[quant][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    size = _write(writer, entries, Path(path))
    return {"path": str(path), "tensors": len(entries), "bytes": size, "quant": quant, "alpha": alpha}


def _lora_entries(pairs: dict[str, list[torch.Tensor]], config: LoraConfig, hp: Hparams, alpha: float,
                  qtype: Q) -> list[_Entry]:
    names = gguf.get_tensor_name_map(hp.arch, hp.n_layer)
    entries = []
    for module, (lora_A, lora_B) in pairs.items():
        found = _gguf_name(names, hp, module)
        if found is None or lora_A is None or lora_B is None:
            what = "has no llama.cpp tensor" if found is None else "lacks its lora_A or lora_B"
            raise ValueError(f"write_gguf_lora: module '{module}' {what}")
        r = lora_A.shape[0]
        factor = config.scaling_for(module) * r / alpha  # 1 unless rank/alpha patterns make this module differ
        lora_B = lora_B.float() * factor if not math.isclose(factor, 1.0, rel_tol=1e-12) else lora_B
        entries.append(_Entry(f"{found[1]}.weight.lora_a", lora_A, None, qtype))  # (r, in): ggml ne = (in, r)
        entries.append(_Entry(f"{found[1]}.weight.lora_b", lora_B, _rotary_heads(hp, found[0]), qtype))  # (out, r)
    return entries
