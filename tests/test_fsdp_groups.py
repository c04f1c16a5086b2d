"""FSDP2 groups of a LoRA model, in 2 gloo processes (torch.multiprocessing): a bf16 frozen base and fp32 LoRA
weights shard together in one group per decoder layer, the LoRA layers read them unsharded in the forward, and
the gradients and the gathered adapter equal those of an unsharded copy fed the whole batch; ranks that start from
different LoRA weights are stopped before sharding."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_model

WORLD = 2
ROWS, WIDTH = 4, 12  # the global batch; each rank takes ROWS // WORLD rows


def _batch() -> dict:
    ids = torch.randint(3, 90, (ROWS, WIDTH), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, : WIDTH // 2] = -100  # a prompt half without loss
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _check(rank: int) -> None:
    from torch.distributed.tensor import DTensor

    from lorakit.lora import LoraConfig, get_lora_model
    from lorakit.lora.io import adapter_tensors
    from lorakit.train.checkpoint import gathered_weights
    from lorakit.train.distributed import DistributedError, World
    from lorakit.train.loss import causal_lm_loss
    from lorakit.train.methods import Trainable
    from lorakit.train.precision import store_frozen_base
    from lorakit.train.sharding import Plan, shard

    model = make_model("llama").train()  # the same weights on both ranks (seeded)
    lora = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(2)
    with torch.no_grad():  # B != 0, so the LoRA branch shows in the output and A gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    assert store_frozen_base(model, torch.bfloat16) > 0
    reference = copy.deepcopy(model)
    trainable = Trainable(model, lora, "lora")
    sharded = shard(trainable, Plan("fsdp"), World(rank, WORLD, rank, WORLD, "gloo"), torch.device("cpu"), False)

    q = model.model.layers[0].self_attn.q_proj
    base, a = q.base_layer.weight, q.lora_A["default"].weight
    assert isinstance(base, DTensor) and isinstance(a, DTensor)  # both sharded, in the layer's one group
    assert (base.dtype, a.dtype) == (torch.bfloat16, torch.float32)
    assert base.to_local().shape[0] == base.shape[0] // WORLD

    batch = _batch()
    n_labels = int((batch["labels"][:, 1:] != -100).sum())
    rows = ROWS // WORLD
    mine = {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}  # (rows, WIDTH)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = sharded.loss(mine, True)
        expected, _ = causal_lm_loss(reference, batch, chunked=True)
    (loss * WORLD / n_labels).backward()  # FSDP2 averages over the ranks
    (expected / n_labels).backward()
    total = torch.tensor([float(loss)], dtype=torch.float64)
    dist.all_reduce(total)
    torch.testing.assert_close(float(total), float(expected), rtol=2e-3, atol=0)
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(theirs) and all(".lora_" in n for n in ours)
    for name, p in ours.items():
        grad = p.grad.full_tensor()
        scale = float(theirs[name].grad.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(grad, theirs[name].grad, rtol=0, atol=0.01 * scale)  # bf16 matmuls, rows split

    whole = gathered_weights(trainable)  # every rank takes part; the base is not gathered
    expected_files = adapter_tensors(reference, "default", "none")
    assert sorted(whole) == sorted(expected_files)
    for key, value in whole.items():
        assert not isinstance(value, DTensor) and value.dtype == torch.float32
        torch.testing.assert_close(value, expected_files[key].detach(), rtol=0, atol=0)

    other = make_model("llama")  # FSDP2 keeps each rank's own slice of its copy: the copies must agree
    other_lora = get_lora_model(other, LoraConfig(r=4, target_modules=["q_proj"]))
    if rank == 1:
        with torch.no_grad():
            next(p for n, p in other.named_parameters() if "lora_A" in n).add_(1.0)
    with pytest.raises(DistributedError, match="the ranks start from different trainable weights"):
        shard(Trainable(other, other_lora, "lora"), Plan("fsdp"), World(rank, WORLD, rank, WORLD, "gloo"),
              torch.device("cpu"), False)


def _rank(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        _check(rank)
        dist.barrier()
    finally:
        gc.collect()  # FSDP2's objects hold gloo's async work: gone before the group, not at interpreter shutdown
        dist.destroy_process_group()


def test_bf16_frozen_base_and_fp32_lora_shard_in_one_group_and_match_one_process(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)
