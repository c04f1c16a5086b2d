"""The estimate of one `lorakit train` configuration on one device: memory by part, time, fit, and advice.

    estimate(cfg, device)            from a TrainConfig (the data set is read when cfg names one)
    estimate_for_keys(keys, device)  from the same keys `lorakit train` takes
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..device import bf16_supported, shape_bucket
from ..train.config import TrainConfig
from . import advice, dataset, flops
from .dataset import DataSize, Epoch
from .devices import QUANTIZED_SLOWDOWN, Device, find_device
from .memory import Training, Workload, _layer_index, memory
from .shape import ModelShape, lora_targets, read_shape, trained_params

NO_DATA = "(none)"  # the dataset value `lorakit estimate` fills in when no data set is given


@dataclass
class Estimate:
    """Everything `lorakit estimate` reports; sizes in bytes, times in seconds."""

    model: str
    method: str
    device: Device
    precision: str
    parts: dict
    """Bytes by part at the training peak."""
    load_bytes: float
    """Peak while loading (the fp32 model on the device)."""
    peak_bytes: float
    fits: bool
    workload: Workload
    data: DataSize
    epoch: Epoch
    params: int
    trained_params: int
    flops_per_token: float
    flops_per_step: float
    rate: float | None
    """FLOP/s the time is planned at, before the efficiency (see `matmul_rate`)."""
    tokens_per_s: float | None
    epoch_seconds: float | None
    run_seconds: float | None
    steps_per_epoch: int
    changes: list = field(default_factory=list)
    """What to change when it does not fit: {"change", "keys", "peak_bytes", "fits"}, in seed 000's order."""
    advice: list = field(default_factory=list)
    """Rank / method advice from the data set's size, each with its source."""
    notes: list = field(default_factory=list)


def training(model: nn.Module, shape: ModelShape, cfg: TrainConfig) -> Training:
    """What trains for `cfg` on the meta `model` (the trainer's own target matching and freezing)."""
    if cfg.finetuning_type in ("full", "freeze"):
        flags = trained_params(model, cfg)
        sizes = dict((n, p.numel()) for n, p in model.named_parameters())
        trained = {n: sizes[n] for n, on in flags.items() if on}
        layers = {_layer_index(n) for n in trained} - {None}
        outside = any(_layer_index(n) is None for n in trained)
        first = 0 if outside or not layers else min(layers)
        head = model.get_output_embeddings()
        head_name = next(n for n, p in model.named_parameters() if p is head.weight)
        norms = any("norm" in n for n in trained)
        return Training({}, trained, layers, first, head_name in trained, norms)
    modules = dict(model.named_modules())
    targets = {n: _io(modules[n]) for n in lora_targets(model, cfg)}
    trained = {}
    for name, (fan_in, fan_out) in targets.items():
        trained[f"{name}.lora_A"] = cfg.lora_rank * fan_in
        trained[f"{name}.lora_B"] = fan_out * cfg.lora_rank + (fan_out if cfg.use_dora else 0)
    saved = cfg.additional_targets or []
    for name, module in modules.items():
        if any(name == s or name.endswith("." + s) for s in saved):
            trained[f"{name}.modules_to_save"] = sum(p.numel() for p in module.parameters())
    layers = [_layer_index(n) for n in targets]
    first = 0 if saved or not layers or None in layers else min(layers)
    return Training(targets, trained, set(), first, "lm_head" in saved, False)


def _io(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[0], w.shape[1]) if type(module).__name__ == "Conv1D" else (w.shape[1], w.shape[0])


def precision(cfg: TrainConfig, device: Device) -> tuple[str, list[str]]:
    """("bf16" | "fp32", notes): the autocast the trainer would use there."""
    if cfg.bf16 or cfg.fp16:
        if device.kind == "cpu" and cfg.fp16:
            return "fp32", ["fp16 autocast is CUDA-only: the trainer falls back to fp32 here"]
        if device.kind == "cpu" and not bf16_supported(torch.device("cpu")):
            return "fp32", ["this CPU has no native bf16: the trainer falls back to fp32"]
        if device.kind == "cuda" and device.peak_flops and "bf16" not in device.peak_flops and cfg.bf16:
            return "fp32", [f"{device.name} has no bf16: use fp16"]
        return "bf16", []
    return "fp32", []


def estimate(cfg: TrainConfig, device: Device | str | None = None, data: DataSize | None = None,
             model_label: str | None = None) -> Estimate:
    """Plan `cfg` on `device` (a Device, or `--device` text); `data` is read from cfg.dataset when not given."""
    device = device if isinstance(device, Device) else find_device(device)
    shape, model = read_shape(cfg.model_name_or_path, model_label)
    prec, notes = precision(cfg, device)
    amp = prec == "bf16"
    bucket = shape_bucket(device.kind, torch.bfloat16 if amp else torch.float32)
    if data is None:
        if cfg.dataset and cfg.dataset != NO_DATA:
            data = measured_data(cfg, amp)
        else:
            data = dataset.assumed(cfg)
            notes.append(f"no data set: every micro-batch assumed full ({cfg.per_device_train_batch_size} x "
                         f"{cfg.cutoff_len} tokens, all with loss)")
    result = _plan(shape, model, cfg, device, data, amp, bucket)
    result.notes = notes + result.notes + replay_notes(cfg, data)
    if not result.fits:
        result.changes = advice.changes(cfg, result, lambda c: _plan(shape, meta_copy(model, c), c, device,
                                                                      data.clipped(c.cutoff_len), amp, bucket))
    result.advice = advice.rank_advice(cfg, data, shape)
    return result


def measured_data(cfg: TrainConfig, amp: bool, records: list[dict] | None = None) -> DataSize:
    """The data set as the trainer will see it (`dataset.measure`), replay rows included: a self-replay pool is looked
    up under the run's model and autocast dtype."""
    from ..models import resolve_model

    tokenizer, name = dataset.tokenizer_for(cfg.model_name_or_path)
    model_path = resolve_model(cfg.model_name_or_path) if cfg.self_replay and cfg.replay_ratio else None
    amp_dtype = (torch.float16 if cfg.fp16 and not cfg.bf16 else torch.bfloat16) if amp else None
    return dataset.measure(cfg, tokenizer, name, records, model_path, amp_dtype)


def replay_notes(cfg: TrainConfig, data: DataSize) -> list[str]:
    """Where the replay rows' counts come from, and what the estimate leaves out of a run with them."""
    if not cfg.replay_ratio or not data.measured:
        return []
    from ..train.teacher import MAX_BYTES

    out = [f"counted: {data.replay_rows} replay rows in every epoch (replay_ratio {cfg.replay_ratio:g}), their lengths "
           f"from {data.replay_source}" + ("; the base's head on their labels for the KL term" if data.kl_labels
                                           else "")]
    if cfg.self_replay:
        out.append("not counted: self_replay generates the replay answers with the base before training")
    if cfg.replay_kl_weight:
        out.append("not counted: replay_kl_weight keeps the base's hidden states on the replay rows on the CPU "
                   f"(at most {MAX_BYTES >> 20} MB; the start-up line gives their size)")
    if cfg.replay_null_space or cfg.replay_task_directions:
        key = "replay_null_space" if cfg.replay_null_space else "replay_task_directions"
        rows = "the task and the replay rows" if cfg.replay_task_directions else "the replay rows"
        out.append(f"not counted: {key} sums an (in x in) float64 input covariance per LoRA layer input over {rows} "
                   "before the first step (the start-up line says how long it took)")
    return out


def meta_copy(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """A fresh meta model when `cfg` changes what trains (freeze flags are set on the model's parameters)."""
    from .shape import meta_model

    return meta_model(model.config) if cfg.finetuning_type in ("full", "freeze") else model


def _plan(shape: ModelShape, model: nn.Module, cfg: TrainConfig, device: Device, data: DataSize, amp: bool,
          bucket) -> Estimate:
    run = training(model, shape, cfg)
    ep = dataset.epoch(data, cfg, bucket, device.kind == "cpu")
    parts, load = memory(shape, cfg, run, ep.worst, amp, device, bucket)
    train_peak = sum(parts.values())
    peak = max(train_peak, load)
    notes = []
    if load > train_peak:
        notes.append(f"the peak is while loading: lorakit loads the base in fp32 on the device "
                     f"({load / 2**30:.1f} GiB) before it casts or quantizes it")
    if load > device.memory_bytes:
        notes.append("no training setting lowers that load peak: the fp32 base alone does not fit this device")
    seq = data.tokens / max(data.examples, 1) if data.packed else ep.computed_tokens / max(len(data.lengths), 1)
    per_token = flops.per_token(shape, cfg, run, seq)
    epoch_flops = flops.epoch_flops(shape, cfg, run, ep.computed_tokens, data.label_tokens, seq, data.kl_labels)
    steps = math.ceil(ep.micro_batches / cfg.gradient_accumulation_steps)
    rate = matmul_rate(device, shape, ep.typical_pass, amp)
    epoch_s = tokens_s = run_s = None
    if rate:
        epoch_s = epoch_flops / (rate * device.efficiency("bf16" if amp else "fp32"))
        epoch_s *= QUANTIZED_SLOWDOWN if cfg.quantization_bit else 1.0
        tokens_s = data.tokens / epoch_s
        total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps)
        run_s = epoch_s * total_steps / max(steps, 1)
    method = cfg.finetuning_type + (f" on a {cfg.quantization_bit}-bit base" if cfg.quantization_bit else "")
    return Estimate(model=shape.name, method=method, device=device, precision="bf16 autocast" if amp else "fp32",
                    rate=rate,
                    parts=parts, load_bytes=load, peak_bytes=peak, fits=peak <= device.memory_bytes,
                    workload=ep.worst, data=data, epoch=ep, params=shape.params,
                    trained_params=sum(run.trained.values()), flops_per_token=per_token,
                    flops_per_step=epoch_flops / max(steps, 1), tokens_per_s=tokens_s, epoch_seconds=epoch_s,
                    run_seconds=run_s, steps_per_epoch=steps, notes=notes)


def matmul_rate(device: Device, shape: ModelShape, rows: int, amp: bool) -> float | None:
    """FLOP/s the time is planned at: on this machine's CPU the run's own linear shapes at its typical pass, timed
    now (`cpu_matmul_rate`); elsewhere the device's peak (None when unknown)."""
    from .devices import cpu_matmul_rate

    key = "bf16" if amp else "fp32"
    if not (device.measured_here and key in device.peak_flops and shape.linears and rows):
        return device.peak_flops.get(key)
    counts: dict[tuple[int, int], int] = {}
    for m in shape.linears:
        counts[(m.in_features, m.out_features)] = counts.get((m.in_features, m.out_features), 0) + 1
    shapes = tuple((k, n, c) for (k, n), c in sorted(counts.items()))
    return cpu_matmul_rate(torch.bfloat16 if amp else torch.float32, rows, shapes)


def config_for_keys(keys: dict):
    """TrainConfig from `lorakit train` keys (a dict); a missing dataset becomes NO_DATA."""
    from ..train.options import from_mapping

    raw = dict(keys)
    if not raw.get("dataset"):
        raw["dataset"] = NO_DATA
    return from_mapping(raw)


def estimate_for_keys(keys: dict, device: Device | str | None = None) -> Estimate:
    """`estimate` for a dict of `lorakit train` keys (what the bench and tests use)."""
    cfg, _ = config_for_keys(keys)
    return estimate(cfg, device)


def train_summary(cfg: TrainConfig, records: list[dict], device: torch.device) -> list[str]:
    """What `lorakit train` prints before the model loads: the estimate's one-line summary, and a warning when the
    run will not fit. Advisory: a model or data set the estimate cannot read gives a line saying so, not an error
    (the trainer reports its own errors)."""
    from .report import gib, summary

    try:
        found = find_device(device.type)
        data = measured_data(cfg, precision(cfg, found)[0] == "bf16", records)
        result = estimate(cfg, found, data)
    except (ValueError, OSError, RuntimeError) as exc:
        return [f"estimate: unavailable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"]
    lines = [summary(result)]
    if not result.fits:
        first = next((c for c in result.changes if c["fits"]), None)
        hint = f"; {first['change']} would bring it to {gib(first['peak_bytes'])}" if first else ""
        lines.append(f"warning: this run needs about {gib(result.peak_bytes)} but {result.device.name} has "
                     f"{gib(result.device.memory_bytes)}{hint} (lorakit estimate shows what to change)")
    return lines
