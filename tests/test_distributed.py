"""Distributed pieces without processes: the rank split, the sharding plan from fsdp / deepspeed keys, the launch
command from LLaMA-Factory's variables, resume across world sizes in the schedule check."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.data.batching import batch_order, rank_share
from lorakit.train import load_config
from lorakit.train.distributed import World, launch_command, wants_launch
from lorakit.train.sharding import Plan, deepspeed_stage, load_device, move_buffers, plan_for
from lorakit.train.state import Schedule


def _config(tmp_path, *extra):
    return load_config(None, [f"dataset={tmp_path / 'd.jsonl'}", *extra])[0]


@pytest.mark.parametrize("n, world", [(8, 2), (7, 2), (3, 2), (1, 2), (5, 3), (2, 3), (4, 1)])
def test_rank_shares_cover_the_global_batch_once(n, world):
    batch = list(range(10, 10 + n))
    shares = [rank_share(batch, r, world) for r in range(world)]
    real = [part for part, padding in shares if not padding]
    assert [i for part in real for i in part] == batch  # consecutive parts, in order: what one process takes
    sizes = [len(part) for part in real]
    assert max(sizes) - min(sizes) <= 1
    for part, padding in shares:
        assert part and (not padding or part == batch[:1])  # an empty share trains on a padding item
    assert sum(padding for _, padding in shares) == max(world - n, 0)


def test_two_ranks_of_bs_2_see_the_batches_of_one_process_of_bs_4():
    lengths = list(range(3, 16))
    one = batch_order(lengths, 4, seed=5, epoch=1)
    two = [[i for r in range(2) for i in rank_share(b, r, 2)[0] if not rank_share(b, r, 2)[1]]
           for b in batch_order(lengths, 2 * 2, seed=5, epoch=1)]
    assert one == two


def test_single_world_is_the_identity():
    world = World.single()
    assert world.sum([1.5, 2]) == [1.5, 2] and world.gather("x") == ["x"] and world.broadcast(3) == 3
    assert world.is_main and not world.distributed


def _ds(tmp_path, stage, offload=None):
    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": offload, "pin_memory": True}
    path = tmp_path / f"ds_z{stage}_{offload}.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": zero}))
    return path


def test_deepspeed_key_maps_to_ddp_or_fsdp2_in_one_line(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    plan = plan_for(_config(tmp_path, f"deepspeed={_ds(tmp_path, 2)}"))
    assert plan.mode == "ddp" and "ZeRO stage 2) runs as DDP; DeepSpeed itself is not used" in plan.mapped
    plan = plan_for(_config(tmp_path, f"deepspeed={_ds(tmp_path, 3)}", "finetuning_type=full"))
    assert plan.mode == "fsdp" and not plan.offload and "runs as FSDP2 full shard;" in plan.mapped
    plan = plan_for(_config(tmp_path, f"deepspeed={_ds(tmp_path, 3, 'cpu')}", "finetuning_type=full"))
    assert plan.mode == "fsdp" and plan.offload and "CPU offload" in plan.mapped
    assert deepspeed_stage(_ds(tmp_path, 0)) == (0, False)
    with pytest.raises(ValueError, match="NVMe"):
        deepspeed_stage(_ds(tmp_path, 3, "nvme"))
    with pytest.raises(ValueError, match="deepspeed: config file .* not found"):
        _config(tmp_path, f"deepspeed={tmp_path / 'missing.json'}")


def test_fsdp_keys_and_refusals(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    assert plan_for(_config(tmp_path)).mode == "ddp"  # lora
    assert plan_for(_config(tmp_path, "finetuning_type=freeze")).mode == "ddp"
    assert plan_for(_config(tmp_path, "finetuning_type=full")).mode == "fsdp"  # full shards by default
    plan = plan_for(_config(tmp_path, "finetuning_type=full", "fsdp=shard_grad_op auto_wrap", "fsdp_offload=true"))
    assert (plan.mode, plan.reshard_after_forward, plan.offload) == ("fsdp", False, True)
    with pytest.raises(ValueError, match="fsdp: hybrid_shard not supported"):
        plan_for(_config(tmp_path, "finetuning_type=full", "fsdp=hybrid_shard"))
    with pytest.raises(ValueError, match="QLoRA with FSDP2 is refused: .*packed"):
        plan_for(_config(tmp_path, "quantization_bit=4", "fsdp=full_shard"))
    assert plan_for(_config(tmp_path, "fsdp=full_shard")).mode == "fsdp"  # lora on a base too big for one device
    assert plan_for(_config(tmp_path, "finetuning_type=freeze", "fsdp=full_shard", "fsdp_offload=true")).offload
    assert plan_for(_config(tmp_path, f"deepspeed={_ds(tmp_path, 3)}")).mode == "fsdp"  # lora under ZeRO 3
    for key in ("use_adalora", "pissa_init", "loraga_init"):
        with pytest.raises(ValueError, match=f"^{key} with FSDP2 is refused: .*it runs as DDP"):
            plan_for(_config(tmp_path, f"{key}=true", "fsdp=full_shard"))
    with pytest.raises(ValueError, match="^replay_kl_weight with FSDP2 is refused: .*same forwards"):
        plan_for(_config(tmp_path, "fsdp=full_shard", f"replay_dataset={tmp_path / 'd.jsonl'}", "replay_ratio=0.3",
                         "replay_kl_weight=0.5"))
    with pytest.raises(ValueError, match="^replay_null_space with FSDP2 is refused: .*shards them"):
        plan_for(_config(tmp_path, "fsdp=full_shard", f"replay_dataset={tmp_path / 'd.jsonl'}", "replay_ratio=0.3",
                         "replay_null_space=0.99"))
    with pytest.raises(ValueError, match="deepspeed and fsdp are both set"):
        plan_for(_config(tmp_path, "finetuning_type=full", "fsdp=full_shard", f"deepspeed={_ds(tmp_path, 3)}"))


def test_fsdp2_on_an_accelerator_loads_the_base_on_the_cpu():
    two, cuda, cpu = World(rank=0, size=2, backend="nccl"), torch.device("cuda", 1), torch.device("cpu")
    assert load_device(Plan("fsdp"), two, cuda) == cpu  # fully_shard moves each layer over as it shards it
    assert load_device(Plan("ddp"), two, cuda) == cuda  # DDP: every rank holds the whole model on its device
    assert load_device(Plan("fsdp"), World.single(), cuda) == cuda
    assert load_device(Plan("fsdp"), two, cpu) == cpu


def test_move_buffers_puts_every_buffer_on_the_device():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    move_buffers(module, torch.device("meta"))
    assert all(b.device.type == "meta" for b in module.buffers())
    assert all(p.device.type == "cpu" for p in module.parameters())  # parameters are fully_shard's


def test_launch_command_follows_llama_factory_variables():
    env = {"NPROC_PER_NODE": "4", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501"}
    cmd = launch_command(["run.yaml", "lora_rank=4"], env)
    assert cmd[1:3] == ["-m", "lorakit.torchrun"] and cmd[-5:] == ["-m", "lorakit", "train", "run.yaml",
                                                                          "lora_rank=4"]
    text = " ".join(cmd)
    assert "--nproc_per_node 4 --nnodes 2 --node_rank 1 --master_addr 10.0.0.1 --master_port 29501" in text
    elastic = " ".join(launch_command([], {"NPROC_PER_NODE": "2", "RDZV_ID": "job7", "MIN_NNODES": "1",
                                           "MAX_NNODES": "3", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}))
    assert "--nnodes 1:3 --rdzv_id job7 --rdzv_backend c10d --rdzv_endpoint h:1234 --max_restarts 3" in elastic
    port = launch_command([], {"NPROC_PER_NODE": "2"})
    assert int(port[port.index("--master_port") + 1]) > 0  # a free port when MASTER_PORT is unset
    assert wants_launch({"NPROC_PER_NODE": "2"}) and wants_launch({"FORCE_TORCHRUN": "true"})
    assert not wants_launch({}) and not wants_launch({"NPROC_PER_NODE": "2", "RANK": "0", "WORLD_SIZE": "2"})


def test_resume_at_another_world_size_keeps_the_global_micro_batch():
    base = dict(total_steps=4, warmup_steps=0, lr_scheduler_type="linear", learning_rate=1e-3, max_steps=4,
                num_train_epochs=1.0, gradient_accumulation_steps=2, batches_per_epoch=4, seed=1)
    two = Schedule(per_device_train_batch_size=2, world_size=2, **base)
    assert two.mismatch(Schedule(per_device_train_batch_size=4, world_size=1, **base)) is None
    assert two.mismatch(Schedule(per_device_train_batch_size=1, world_size=4, **base)) is None
    key, saved, now = two.mismatch(Schedule(per_device_train_batch_size=2, world_size=1, **base))
    assert (key, saved, now) == ("per_device_train_batch_size x world size (the global micro-batch)", "2x2", "2x1")
