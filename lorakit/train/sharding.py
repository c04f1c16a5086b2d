"""DDP or FSDP2 applied to the model being trained, the gradient sync around accumulation, and the keys that ask.

    ddp     lora / qlora / freeze (and DeepSpeed ZeRO 0-2): every rank holds the whole model; after the last
            micro-batch of a step the gradients of the trainable parameters (only those) are averaged
    fsdp    full, and lora / freeze when HF's fsdp: full_shard (or DeepSpeed ZeRO 3) asks: `fully_shard` per decoder
            layer, then the root; each rank holds 1/W of every weight, gradient and AdamW state; weights are
            all-gathered layer by layer for the forward and the backward, gradients reduce-scattered.
            fsdp_offload (ZeRO offload): the shards live on the CPU. shard_grad_op keeps the gathered weights from
            the forward to the backward (ZeRO-2-like).

LoRA under FSDP2: a decoder layer's group holds its frozen base weights and its LoRA weights together, so the LoRA
layer's forward reads both unsharded (FSDP2 swaps the whole layer's parameters in for its forward and backward).
The frozen base may be bf16 (stored so under bf16 autocast, precision.store_frozen_base, before sharding) while
the LoRA weights are fp32: torch's FSDP2 wants one dtype among a group's *trainable* parameters only, and
all-gathers a group of mixed dtypes as bytes; no MixedPrecisionPolicy (autocast already casts), no extra groups.
The adapter is gathered tensor by tensor for a save (checkpoint.py), never the base.

Both average the gradients over the ranks, so the trainer multiplies each rank's loss by the world size W before
dividing by the step's global label-token count N:  mean_r (W * loss_sum_r / N) = (sum over all tokens) / N.

The trainer's loss runs the backbone and the head itself (causal_lm_loss), not the model's forward, so DDP and
FSDP2 wrap `LossForward`, a module whose forward is that loss: their hooks then see every call.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.batching import rank_share
from .config import TrainConfig
from .distributed import DistributedError, World
from .loss import Distill, causal_lm_loss
from .methods import Trainable, decoder_layers

FSDP_WORDS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")


@dataclass(frozen=True)
class Plan:
    """How a run with several ranks shares the model."""

    mode: str  # "ddp" or "fsdp"
    offload: bool = False  # FSDP2 shards (and AdamW state) on the CPU
    reshard_after_forward: bool = True  # False: shard_grad_op (weights stay gathered until the backward)
    mapped: str | None = None  # the line saying what a deepspeed/fsdp key was read as

    def describe(self) -> str:
        if self.mode == "ddp":
            return "sharding: DDP (every rank holds the model; trainable gradients averaged once per step)"
        how = "full shard" if self.reshard_after_forward else "shard_grad_op"
        return (f"sharding: FSDP2 {how} (fully_shard per decoder layer, then the root)"
                + ("; shards and optimizer state offloaded to the CPU" if self.offload else ""))


def deepspeed_stage(path: str) -> tuple[int, bool]:
    """(ZeRO stage, CPU offload) of a DeepSpeed JSON config (LLaMA-Factory's examples/deepspeed/ds_z*_config.json);
    ValueError naming the file when it cannot be read."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"deepspeed: cannot read '{path}' ({exc})") from None
    zero = data.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    devices = {(zero.get(k) or {}).get("device", "none") for k in ("offload_optimizer", "offload_param")}
    if "nvme" in devices:
        raise ValueError(f"deepspeed: '{path}' offloads to NVMe; lorakit offloads to the CPU only (device: cpu)")
    return stage, "cpu" in devices


def plan_for(cfg: TrainConfig) -> Plan:
    """DDP or FSDP2 from finetuning_type, `fsdp` / `fsdp_offload` and `deepspeed` (ValueError, one line, when
    they ask for something lorakit does not do)."""
    words = set((cfg.fsdp or "").replace(",", " ").split())
    unknown = words - set(FSDP_WORDS)
    if unknown:
        raise ValueError(f"fsdp: {', '.join(sorted(unknown))} not supported (lorakit reads "
                         f"{', '.join(FSDP_WORDS)})")
    offload = cfg.fsdp_offload or "offload" in words
    if cfg.deepspeed:
        if words:
            raise ValueError("deepspeed and fsdp are both set; choose one")
        stage, ds_offload = deepspeed_stage(cfg.deepspeed)
        if stage >= 3 or ds_offload or offload:
            plan = Plan("fsdp", offload=ds_offload or offload)
        else:
            plan = Plan("ddp")
        target = "DDP" if plan.mode == "ddp" else "FSDP2 full shard" + (" + CPU offload" if plan.offload else "")
        plan = Plan(plan.mode, plan.offload, mapped=f"deepspeed: {cfg.deepspeed} (ZeRO stage {stage}"
                    f"{', CPU offload' if ds_offload else ''}) runs as {target}; DeepSpeed itself is not used")
    elif words or offload:
        plan = Plan("fsdp", offload=offload, reshard_after_forward="shard_grad_op" not in words)
    else:
        plan = Plan("fsdp" if cfg.finetuning_type == "full" else "ddp")
    if plan.mode == "fsdp" and cfg.quantization_bit:
        raise ValueError("QLoRA with FSDP2 is refused: the 4-bit weights are packed integer tensors that FSDP2 "
                         "cannot shard with the fp32 LoRA weights; drop fsdp/deepspeed ZeRO 3 (QLoRA runs as DDP, "
                         "each rank holding the 4-bit base)")
    if plan.mode == "fsdp" and cfg.finetuning_type == "lora":
        why = {"use_adalora": "AdaLoRA reads every adapter weight and gradient between steps (importance scores, "
                              "masks) and saves only the kept triplets",
               "pissa_init": "the saved adapter is converted against the initial factors (rank 2r)",
               "loraga_init": "the saved adapter is converted against the initial factors (rank 2r)"}
        for key in why:
            if getattr(cfg, key):
                raise ValueError(f"{key} with FSDP2 is refused: {why[key]}, which lorakit does only on whole "
                                 "tensors; drop fsdp/deepspeed ZeRO 3 (it runs as DDP)")
    if plan.mode == "fsdp" and cfg.replay_kl_weight:
        raise ValueError("replay_kl_weight with FSDP2 is refused: the base's forward runs only on ranks whose "
                         "micro-batch holds replay rows, and FSDP2 needs the same forwards (all-gathers) on every "
                         "rank; drop fsdp/deepspeed ZeRO 3 (it runs as DDP)")
    projected = "replay_null_space" if cfg.replay_null_space else "replay_task_directions"
    if plan.mode == "fsdp" and (cfg.replay_null_space or cfg.replay_task_directions):
        raise ValueError(f"{projected} with FSDP2 is refused: it projects every whole LoRA A after each step, "
                         "and FSDP2 shards them; drop fsdp/deepspeed ZeRO 3 (it runs as DDP)")
    return plan


class LossForward(nn.Module):
    """forward(batch, chunked, distill) = causal_lm_loss(model, batch, chunked, distill=distill): (loss summed over
    label tokens, count)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict, chunked: bool = True, distill: Distill | None = None) -> tuple[torch.Tensor, int]:
        return causal_lm_loss(self.model, batch, chunked=chunked, distill=distill)


@dataclass
class Sharded:
    """The wrapped loss module of a run with several ranks, and how its gradients sync."""

    plan: Plan
    module: nn.Module  # DDP(LossForward) or fully_shard(LossForward)
    world: World

    @property
    def fsdp(self) -> bool:
        """The weights are FSDP2's shards (DTensors): saving gathers them, every rank taking part."""
        return self.plan.mode == "fsdp"

    def loss(self, batch: dict, chunked: bool, distill: Distill | None = None) -> tuple[torch.Tensor, int]:
        """(loss summed over label tokens, their count) of `batch`."""
        return self.module(batch, chunked, distill)

    def sync(self, last: bool):
        """Context for one backward: the gradient reduction runs only for the last of a step (`last`)."""
        if self.plan.mode == "ddp":
            return contextlib.nullcontext() if last else self.module.no_sync()
        self.module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def describe(self, per_device: int, accumulation: int, n_items: int) -> list[str]:
        """The start-up lines of a run with several ranks: world size, backend, global batch, DDP or FSDP2 (and
        what a deepspeed key mapped to), how the last global micro-batch of an epoch splits (`n_items` per epoch)."""
        world, plan = self.world, self.plan
        lines = [world.describe(per_device, accumulation), plan.describe() + (f"; {plan.mapped}" if plan.mapped
                                                                             else "")]
        tail = n_items % (per_device * world.size)
        if tail:
            shares = [rank_share(list(range(tail)), r, world.size) for r in range(world.size)]
            sizes = [0 if padding else len(part) for part, padding in shares]
            items = f"{tail} item{'s' if tail > 1 else ''}"
            lines.append(f"uneven tail: each epoch's last global micro-batch has {items}, split {sizes} over the "
                         "ranks" + ("; a rank with none trains on a padding item with weight 0 (nothing dropped)"
                                    if tail < world.size else " (nothing padded or dropped)"))
        return lines


def load_device(plan: Plan, world: World, device: torch.device) -> torch.device:
    """Where the base model loads: on the CPU for FSDP2 on an accelerator (fully_shard then moves each decoder
    layer to `device` as it shards it, so a rank's device never holds more than one whole layer next to its shards:
    a base that does not fit one device trains); on `device` otherwise."""
    if world.distributed and plan.mode == "fsdp" and device.type != "cpu":
        return torch.device("cpu")
    return device


def shard(trainable: Trainable, plan: Plan, world: World, device: torch.device, find_unused: bool) -> Sharded:
    """Wrap the trainable model for `plan` (the optimizer must be made afterwards, over the parameters it left).

    DDP broadcasts nothing in the forward (forward_sync_buffers off, no init sync: the buffers are rotary tables
    every rank computes alike), so ranks may run different numbers of forward passes per micro-batch; only the
    backward syncs."""
    root = LossForward(trainable.model)
    check_same_weights(trainable, world)
    if plan.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        module = DistributedDataParallel(root, device_ids=ids, find_unused_parameters=find_unused, init_sync=False,
                                         forward_sync_buffers=False, gradient_as_bucket_view=True)
        return Sharded(plan, module, world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    options = {"mesh": mesh, "reshard_after_forward": plan.reshard_after_forward,
               "offload_policy": CPUOffloadPolicy(pin_memory=device.type == "cuda") if plan.offload
               else OffloadPolicy()}
    _, layers = decoder_layers(trainable.model)
    for layer in layers:
        fully_shard(layer, **options)  # moves the layer's weights to the mesh's device, then keeps this rank's shard
    fully_shard(root, **options)
    move_buffers(root, device)
    return Sharded(plan, root, world)


def move_buffers(module: nn.Module, device: torch.device) -> None:
    """Buffers (rotary tables) on `device`, whether or not fully_shard moved them (a base loaded on the CPU)."""
    for sub in module.modules():
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and buffer.device != device:
                sub._buffers[name] = buffer.to(device)


def check_same_weights(trainable: Trainable, world: World) -> None:
    """DDP and FSDP2 start from the weights each rank loaded (no broadcast; FSDP2 keeps each rank's own slice of
    its copy): check the trainable ones agree (one gather of a checksum per rank)."""
    with torch.no_grad():
        total = sum(float(p.double().abs().sum()) for _, p in trainable.named_trainable())
    sums = world.gather(total)
    if any(abs(s - sums[0]) > 1e-9 * max(abs(sums[0]), 1.0) for s in sums):
        raise DistributedError(f"the ranks start from different trainable weights ({sums}); do they load the same "
                               "model and seed?")
