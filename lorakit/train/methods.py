"""What trains: a LoRA adapter, every weight (full), or the last few decoder layers (freeze); and the AdamW
parameter groups for it (LoRA+ learning rates, weight decay only on matrices)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..dtypes import DTYPE_NAMES
from ..lora import AdaLoraConfig, LoraConfig, LoraGAConfig, LoraModel, get_lora_model
from ..lora.inject import uncovered_weights
from ..quant import EIGHT_BIT, Quantization, describe, eight_bit_optimizer, quantize_model, quantized_layers
from .config import TrainConfig


@dataclass
class Trainable:
    """The model being trained and how to describe it."""

    model: nn.Module
    """The transformers model (with LoRA layers inside it, for lora)."""
    lora: LoraModel | None
    """The LoraModel wrapper for lora, else None."""
    summary: str
    """One line: the method and its settings."""

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def total_params(self) -> int:
        """Parameters of the model; a quantized layer's weight counts as in * out, not as its packed storage."""
        layers = [m for _, m in quantized_layers(self.model)]
        packed = {id(m.weight) for m in layers}
        total = sum(p.numel() for p in self.model.parameters() if id(p) not in packed)
        return total + sum(m.in_features * m.out_features for m in layers)

    def counts_line(self) -> str:
        """PEFT's "trainable params: ... || all params: ... || trainable%: ..." line."""
        trainable = sum(p.numel() for _, p in self.named_trainable())
        total = self.total_params()
        share = 100 * trainable / total
        return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"


def lora_config_for(cfg: TrainConfig, base_model_name_or_path: str | None) -> LoraConfig:
    """TrainConfig's LLaMA-Factory LoRA keys as PEFT's LoraConfig (AdaLoraConfig with use_adalora; its total_step
    is set from the trainer's schedule, see rank_allocation.py)."""
    common = dict(lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=cfg.lora_targets,
                  modules_to_save=cfg.additional_targets, task_type="CAUSAL_LM",
                  base_model_name_or_path=base_model_name_or_path)
    if cfg.use_adalora:
        return AdaLoraConfig(init_r=cfg.adalora_init_r, target_r=cfg.adalora_target_r, tinit=cfg.adalora_tinit,
                             tfinal=cfg.adalora_tfinal, deltaT=cfg.adalora_deltaT, beta1=cfg.adalora_beta1,
                             beta2=cfg.adalora_beta2, orth_reg_weight=cfg.adalora_orth_reg_weight,
                             total_step=cfg.adalora_tinit + cfg.adalora_tfinal + 1, **common)
    init: bool | str = True
    if cfg.pissa_init:
        init = "pissa" if cfg.pissa_iter == -1 else f"pissa_niter_{cfg.pissa_iter}"
    ga = None
    if cfg.loraga_init:
        init = "lora_ga"
        ga = LoraGAConfig(direction=cfg.loraga_direction, scale=cfg.loraga_scale, stable_gamma=cfg.loraga_stable_gamma,
                          stable_scale_on=cfg.loraga_stable_scale_on)
    return LoraConfig(r=cfg.lora_rank, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, init_lora_weights=init,
                      lora_ga_config=ga, **common)


def quantization_of(cfg: TrainConfig) -> Quantization | None:
    """QLoRA's settings for `load_model(..., quantization=...)`, which quantizes while loading; None without
    quantization_bit."""
    if not cfg.quantization_bit:
        return None
    return Quantization(bits=cfg.quantization_bit, quant_type=cfg.quantization_type,
                        double_quant=cfg.double_quantization, compute_dtype=DTYPE_NAMES.get(cfg.compute_dtype or ""),
                        backend=cfg.quantization_method)


def make_trainable(model: nn.Module, cfg: TrainConfig, lora_ga_factors: dict | None = None) -> Trainable:
    """Set up `model` for cfg.finetuning_type: wrap it with LoRA (on a quantized base when quantization_bit is
    set: QLoRA), or choose which weights train. A QLoRA base comes quantized from `load_model(...,
    quantization=quantization_of(cfg))`; an unquantized one is quantized here, before LoRA wraps its layers.
    `lora_ga_factors` (loraga_init.estimate_lora_ga) is LoRA-GA's starting point."""
    quantized = ""
    if cfg.quantization_bit:
        if not quantized_layers(model):
            spec = quantization_of(cfg)
            quantize_model(model, spec.bits, spec.quant_type, spec.double_quant, spec.compute_dtype, spec.backend)
        quantized = f"; {describe(model)}"
    if cfg.finetuning_type == "lora":
        lora = get_lora_model(model, lora_config_for(cfg, getattr(model, "name_or_path", None)),
                              lora_ga_factors=lora_ga_factors)
        lc = lora.peft_config["default"]
        variant = "".join([" rsLoRA" if cfg.use_rslora else "", " DoRA" if cfg.use_dora else "",
                           " PiSSA init" if cfg.pissa_init else "", " LoRA-GA init" if cfg.loraga_init else "",
                           f" AdaLoRA (init_r {cfg.adalora_init_r} -> target_r {cfg.adalora_target_r})"
                           if cfg.use_adalora else ""])
        left = uncovered_weights(model)
        if left:  # e.g. all-linear on an MoE model: routers and expert tensors are not nn.Linear layers
            variant += "; not covered: " + ", ".join(f"{n} x{c}" for n, c in left.items())
        targets = lc.target_modules if isinstance(lc.target_modules, str) else _short_names(lc.target_modules)
        extra = f", modules_to_save {','.join(lc.modules_to_save)}" if lc.modules_to_save else ""
        rank = lc.init_r if cfg.use_adalora else lc.r
        summary = (f"lora r={rank} alpha={lc.lora_alpha:g} dropout={lc.lora_dropout:g}{variant} on {targets}{extra}"
                   + (f", LoRA+ ratio {cfg.loraplus_lr_ratio:g}" if cfg.loraplus_lr_ratio else "") + quantized)
        return Trainable(lora.get_base_model(), lora, summary)
    if cfg.finetuning_type == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return Trainable(model, None, "full: every weight trains")
    return Trainable(model, None, _freeze(model, cfg))


def _short_names(names: list[str]) -> str:
    return ",".join(sorted({n.rsplit(".", 1)[-1] for n in names}))


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the model's decoder layers: the ModuleList with num_hidden_layers entries."""
    config = getattr(model.config, "text_config", None) or model.config
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name, module
    raise ValueError("finetuning_type freeze: cannot find the decoder layers of this model")


def _freeze(model: nn.Module, cfg: TrainConfig) -> str:
    """Freeze everything but the chosen layers (and their chosen modules) plus freeze_extra_modules."""
    prefix, layers = decoder_layers(model)
    n = cfg.freeze_trainable_layers
    chosen = list(range(len(layers)))[-n:] if n > 0 else list(range(len(layers)))[:-n]
    modules = [m.strip() for m in cfg.freeze_trainable_modules.split(",") if m.strip()]
    extras = [m.strip() for m in (cfg.freeze_extra_modules or "").split(",") if m.strip()]
    for p in model.parameters():
        p.requires_grad_(False)
    missing = set(modules) - {"all"}
    for i in chosen:
        for name, p in layers[i].named_parameters():
            parts = name.split(".")
            hit = [m for m in modules if m == "all" or m in parts]
            missing -= set(hit)
            if hit:
                p.requires_grad_(True)
    for name, p in model.named_parameters():
        if set(extras) & set(name.split(".")):
            p.requires_grad_(True)
    unknown_extras = [e for e in extras if not any(e in n.split(".") for n, _ in model.named_parameters())]
    if missing or unknown_extras:
        raise ValueError(f"finetuning_type freeze: no module named {', '.join(sorted(missing | set(unknown_extras)))}"
                         f" in {prefix}")
    layer_list = f"{chosen[0]}..{chosen[-1]}" if len(chosen) > 1 else str(chosen[0])
    return (f"freeze: layers {layer_list} of {len(layers)} train ({cfg.freeze_trainable_modules})"
            + (f" + {','.join(extras)}" if extras else ""))


def param_groups(trainable: Trainable, cfg: TrainConfig) -> list[dict]:
    """AdamW groups. Each group's "base_lr" is its peak learning rate; the schedule scales all of them.

    LoRA+ (Hayou et al. 2024), grouped as LLaMA-Factory groups it: lora_B and every 1-D parameter (DoRA
    magnitudes, biases) at learning_rate * loraplus_lr_ratio, lora_embedding_B at loraplus_lr_embedding, the rest
    (lora_A) at learning_rate. Weight decay applies to matrices only, not to biases, norms or magnitude vectors.
    """
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in trainable.named_trainable():
        lr = cfg.learning_rate
        if cfg.loraplus_lr_ratio:
            if "lora_embedding_B" in name:
                lr = cfg.loraplus_lr_embedding
            elif "lora_B" in name or p.ndim == 1:
                lr = cfg.learning_rate * cfg.loraplus_lr_ratio
        decay = cfg.weight_decay if p.ndim >= 2 and "lora_magnitude_vector" not in name else 0.0
        groups.setdefault((lr, decay), []).append(p)
    return [{"params": ps, "lr": lr, "base_lr": lr, "weight_decay": decay} for (lr, decay), ps in groups.items()]


def make_optimizer(trainable: Trainable, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; the fused kernel (one call for all parameters) on CUDA, and on a CPU for plain
    tensors (FSDP2's sharded DTensors keep the loop); 8-bit AdamW for optim adamw_8bit / paged_adamw_8bit
    (lorakit.quant.optim)."""
    groups = param_groups(trainable, cfg)
    if cfg.optim in EIGHT_BIT:
        return eight_bit_optimizer(cfg.optim, groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                   eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    from torch.distributed.tensor import DTensor

    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() for p in params) and (
        all(p.is_cuda for p in params) or all(p.device.type == "cpu" and not isinstance(p, DTensor) for p in params))
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay, fused=fused or None)
