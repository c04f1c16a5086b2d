"""What to change when a run does not fit, and which rank and method the data set's size calls for.

Changes come in the order seed 000 advises ("显存紧张时优先降低 lora_rank 或只给注意力/FFN 层上 LoRA,
而不是一味减 batch size": lower the rank or put LoRA on fewer layers before shrinking the batch), then gradient
checkpointing, QLoRA, the 8-bit optimizer and a shorter cutoff_len; full and freeze first try LoRA. Each is planned
again with the same data, so its effect is the model's own figure, and then they are combined in that order until
it fits.

Rank and method follow seed 004's decision flow (under 10k examples LoRA r 8-16; 10k-100k LoRA r 16-32, full
fine-tuning only if LoRA falls short; above 100k LoRA r 32-64 for simple tasks, full or QLoRA for complex ones),
with seeds 001 and 003 on small data sets (a few hundred examples: r 4-8 against overfitting).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..train.config import TrainConfig


def candidates(cfg: TrainConfig) -> list[tuple[str, dict]]:
    """(what, changed keys) in seed 000's order, only those that change something for `cfg`."""
    out = []
    lora = cfg.finetuning_type in ("lora", "qlora")
    if not lora:
        out.append(("LoRA instead of " + cfg.finetuning_type, {"finetuning_type": "lora"}))
    if lora and cfg.lora_rank > 4:
        rank = max(4, cfg.lora_rank // 2)
        out.append((f"lora_rank {cfg.lora_rank} -> {rank}", {"lora_rank": rank}))
    if lora and cfg.lora_target == "all":
        out.append(("LoRA on attention only (lora_target q_proj,v_proj)", {"lora_target": "q_proj,v_proj"}))
    if cfg.per_device_train_batch_size > 1:
        bs = cfg.per_device_train_batch_size // 2
        acc = cfg.gradient_accumulation_steps * cfg.per_device_train_batch_size // bs
        out.append((f"batch {cfg.per_device_train_batch_size} -> {bs}, accumulation {acc} (same effective batch)",
                    {"per_device_train_batch_size": bs, "gradient_accumulation_steps": acc}))
    if not cfg.gradient_checkpointing:
        out.append(("gradient_checkpointing: true", {"gradient_checkpointing": True}))
    if not cfg.quantization_bit:
        out.append(("QLoRA (4-bit NF4 base)", {"finetuning_type": "lora", "quantization_bit": 4}))
    if cfg.optim not in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
        out.append(("optim: adamw_8bit", {"optim": "adamw_8bit"}))
    if cfg.cutoff_len > 256:
        out.append((f"cutoff_len {cfg.cutoff_len} -> {cfg.cutoff_len // 2}", {"cutoff_len": cfg.cutoff_len // 2}))
    return out


def changes(cfg: TrainConfig, base, plan: Callable[[TrainConfig], object]) -> list[dict]:
    """Each candidate that lowers the peak alone, then those in order until the run fits; `plan(cfg)` re-plans."""
    out = []
    combined = {}
    for what, keys in candidates(cfg):
        try:
            alone = plan(dataclasses.replace(cfg, **keys))
        except ValueError:  # a combination the trainer refuses (e.g. QLoRA with pissa_init)
            continue
        if alone.peak_bytes >= base.peak_bytes:  # e.g. QLoRA under bf16 at a large batch: more activations
            continue
        out.append({"change": what, "keys": keys, "peak_bytes": alone.peak_bytes, "fits": alone.fits,
                    "saves_bytes": base.peak_bytes - alone.peak_bytes})
    for item in out:
        combined.update(item["keys"])
        together = plan(dataclasses.replace(cfg, **combined))
        if together.fits:
            out.append({"change": "together: " + "; ".join(i["change"] for i in out[:out.index(item) + 1]),
                        "keys": dict(combined), "peak_bytes": together.peak_bytes, "fits": True,
                        "saves_bytes": base.peak_bytes - together.peak_bytes})
            break
    return out


def rank_advice(cfg: TrainConfig, data, shape) -> list[dict]:
    """Method and rank for the data set's size, each with its source (seeds 001, 003, 004)."""
    if not data.measured:
        return [{"advice": "give the data set (dataset=...) for advice from its size; meanwhile start at LoRA r=8 "
                           "and double it only if the validation loss asks for it", "source": "seed 004, seed 001"}]
    n = data.examples
    if n < 1000:
        items = [{"advice": f"{n:,d} examples: LoRA with a small rank, r 4-8 (a few hundred examples overfit a "
                            f"large rank)", "source": "seed 004 (数据量少: r=4, 8), seed 001 (r=4~8 足够)"}]
    elif n < 10_000:
        items = [{"advice": f"{n:,d} examples (< 10k): LoRA, r 8-16", "source": "seed 004 decision flow"}]
    elif n < 100_000:
        items = [{"advice": f"{n:,d} examples (10k-100k): LoRA first, r 16-32; full fine-tuning only if LoRA "
                            "falls short on the validation set", "source": "seed 004 decision flow"}]
    else:
        items = [{"advice": f"{n:,d} examples (> 100k): simple task: LoRA r 32-64; complex task: consider full "
                            "fine-tuning or QLoRA", "source": "seed 004 decision flow"}]
    low, high = _range(n)
    if cfg.finetuning_type in ("lora", "qlora") and not low <= cfg.lora_rank <= high:
        items.append({"advice": f"the config's lora_rank {cfg.lora_rank} is outside that range ({low}-{high})",
                      "source": "seed 004"})
    items.append({"advice": f"{data.task_label_tokens:,d} label tokens over {n:,d} examples; quality over quantity: "
                            "200 good examples with LoRA beat 10,000 poor ones with full fine-tuning",
                  "source": "seed 001"})
    return items


def _range(n: int) -> tuple[int, int]:
    if n < 1000:
        return 4, 8
    if n < 10_000:
        return 8, 16
    if n < 100_000:
        return 16, 32
    return 32, 64
