"""A model's shape, read from its config alone: the model is built on the meta device (no weights, no memory, so a
70B config costs nothing) and its modules are counted the way lorakit's trainer would see them.

Where the config comes from (`find_config`): a model directory with config.json, a config.json file, a .gguf file
(its header only), a hub id in the local Hugging Face cache, or the embedded default (its converted cache when
there is one, else the header of its GGUF file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..lora.inject import find_targets
from ..models import ModelError, default_gguf_path, gguf_cache_dir, resolve_model
from ..quant.convert import quantizable
from ..train.config import TrainConfig
from ..train.methods import decoder_layers, lora_config_for, make_trainable


@dataclass
class Linear:
    """One linear layer: its module name, in/out features, bias, decoder layer index (None outside the layers)."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    layer: int | None

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass
class ModelShape:
    """What the memory and FLOP models need to know about a model."""

    name: str
    model_type: str
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    params: int
    """Every parameter, tied ones once."""
    linears: list[Linear] = field(default_factory=list)
    """Every linear layer but the output head."""
    head_params: int = 0
    """The output head's own parameters (0 when tied to the input embedding)."""
    embed_params: int = 0

    @property
    def linear_params(self) -> int:
        return sum(m.params for m in self.linears)

    @property
    def q_width(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.n_kv_heads * self.head_dim


def find_config(name_or_path: str | None):
    """The transformers config of a model (see the module docstring); raises ModelError."""
    from transformers import AutoConfig

    text = (name_or_path or "").strip()
    path = Path(text).expanduser() if text else None
    try:
        if path is not None and path.is_file() and path.suffix == ".json":
            return config_from_json(path)
        if path is not None and path.is_file() and path.suffix.lower() == ".gguf":
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        if path is not None and path.is_dir() and (path / "config.json").is_file():
            return config_from_json(path / "config.json")
        if text.lower() in ("", "default", "smollm2-135m-instruct"):
            gguf = default_gguf_path()
            cached = gguf_cache_dir(gguf) / "config.json"
            return config_from_json(cached) if cached.is_file() else AutoConfig.from_pretrained(
                gguf.parent, gguf_file=gguf.name)
        return config_from_json(resolve_model(text) / "config.json")
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, ModelError):
            raise
        raise ModelError(f"could not read the config of model '{text or 'default'}': {exc}") from exc


def config_from_json(path: Path):
    """A transformers config from a config.json file (its `model_type` picks the class)."""
    from transformers import AutoConfig

    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"'{path}' line {exc.lineno}: invalid JSON: {exc.msg}") from None
    if "model_type" not in data:
        raise ModelError(f"'{path}': no model_type field, so the architecture is unknown")
    kind = data.pop("model_type")
    return AutoConfig.for_model(kind, **data)


def meta_model(config) -> nn.Module:
    """The causal LM of `config` with every tensor on the meta device: shapes only."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def read_shape(name_or_path: str | None, label: str | None = None) -> tuple[ModelShape, nn.Module]:
    """(shape, meta model) of a model from its config."""
    config = find_config(name_or_path)
    model = meta_model(config)
    text = getattr(config, "text_config", None) or config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    _, layers = decoder_layers(model)
    index = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    quant = set(quantizable(model))
    modules = dict(model.named_modules())
    linears = [Linear(n, *_features(modules[n]), getattr(modules[n], "bias", None) is not None,
                      index.get(id(modules[n]))) for n in sorted(quant)]
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    params = sum(p.numel() for p in model.parameters())  # tied parameters are listed once
    shape = ModelShape(name=label or (name_or_path or "SmolLM2-135M-Instruct (default)"),
                       model_type=config.model_type, n_layers=len(layers), hidden=hidden,
                       intermediate=getattr(text, "intermediate_size", None) or 4 * hidden, n_heads=heads,
                       n_kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
                       vocab=embed.weight.shape[0], tied=tied, params=params, linears=linears,
                       head_params=0 if tied or head is None else head.weight.numel(),
                       embed_params=embed.weight.numel())
    return shape, model


def _features(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    if type(module).__name__ == "Conv1D":  # GPT-2 stores (in, out)
        return w.shape[0], w.shape[1]
    return w.shape[1], w.shape[0]


def lora_targets(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """Module names that `lorakit train` would wrap with LoRA for `cfg` (the trainer's own target matching)."""
    return find_targets(model, lora_config_for(cfg, None))


def trained_params(model: nn.Module, cfg: TrainConfig) -> dict[str, bool]:
    """full / freeze: parameter name -> trains, as the trainer's `make_trainable` sets it (on the meta model)."""
    if cfg.finetuning_type not in ("full", "freeze"):
        raise ValueError("trained_params is for full and freeze; LoRA trains its adapters")
    make_trainable(model, cfg)
    return {n: p.requires_grad for n, p in model.named_parameters()}
