"""Real processes on 127.0.0.1 (gloo): several ranks against one process (DDP, and FSDP2 for full, freeze and LoRA),
resume across world sizes, two "nodes", a dead rank and a Ctrl-C on one rank. Tiny models, a few steps; every
process has a timeout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
import torch
from cli_setup import save_tiny_model
from safetensors.torch import load_file

from lorakit import LoraModel
from lorakit.train import load_config, train
from lorakit.train.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
FACTS = [("What is the VPN address?", "It is vpn.example."), ("Who can help you today?", "Hello there, I can help."),
         ("What does the quick fox do?", "The quick brown fox jumps over the lazy dog."), ("Digits?", "0123456789"),
         ("Say hi.", "hi")]
# 15 records, 2 held out: 13 training examples in global micro-batches of 4 (the last has 1: rank 1 pads), prompts
# of 1-3 repeats so every rank's label-token count differs; accumulation 2 over 3 steps crosses an epoch
RUN = ("max_steps=3", "save_steps=2", "gradient_accumulation_steps=2", "learning_rate=1e-2", "logging_steps=1",
       "val_size=2", "per_device_eval_batch_size=1")
TIMEOUT = 240


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    save_tiny_model(root / "model")
    records = [{"instruction": q * (1 + i % 3), "input": "", "output": a} for i, (q, a) in enumerate(FACTS * 3)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _args(root, out, *extra) -> list[str]:
    return [f"model_name_or_path={root / 'model'}", f"dataset={root / 'data.jsonl'}", f"output_dir={out}", *RUN,
            *extra]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NPROC_PER_NODE")}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore",
            "TOKENIZERS_PARALLELISM": "false", **extra}


def _launch(args: list[str], **env) -> subprocess.CompletedProcess:
    """`NPROC_PER_NODE=... lorakit train ARGS` as a user types it."""
    return subprocess.run([sys.executable, "-m", "lorakit", "train", *args], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=TIMEOUT)


def _ranks(args: list[str], world: int = 2) -> list[subprocess.Popen]:
    """Each rank as its own `lorakit train` with torchrun's variables set by hand (their pids are ours)."""
    port = str(free_port())
    return [subprocess.Popen([sys.executable, "-m", "lorakit", "train", *args], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
            for r in range(world)]


def _one(root, out, *extra) -> dict:
    return train(load_config(None, _args(root, out, *extra))[0])


def _same(a: Path, b: Path, name: str = "adapter_model.safetensors", atol: float = 5e-6) -> None:
    """fp32, tight: the sums differ only in order (AdamW's step, ~lr, makes a near-zero gradient's rounding show:
    up to 3e-6 here with the fused kernel, under 0.03 % of one step of lr 1e-2)."""
    mine, theirs = load_file(str(a / name)), load_file(str(b / name))
    assert sorted(mine) == sorted(theirs)
    for key, value in mine.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=atol)


def _wait_for_step(out: Path, step: int, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        path = out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        if any(json.loads(line).get("step", 0) >= step for line in lines if line.strip()):
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a rank ended early: " + "".join(p.communicate()[1][-2000:] for p in procs))
        time.sleep(0.1)
    raise AssertionError("no progress")


@pytest.fixture(scope="module")
def lora_one(tiny):
    """The reference: one process, 4 per micro-batch (= 2 ranks x 2)."""
    out = tiny / "lora1"
    _one(tiny, out, "per_device_train_batch_size=4")
    return out


@pytest.fixture(scope="module")
def lora_two(tiny):
    out = tiny / "lora2"
    proc = _launch(_args(tiny, out, "per_device_train_batch_size=2"), NPROC_PER_NODE="2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stderr


def test_two_ranks_train_the_adapter_of_one_process(tiny, lora_one, lora_two):
    out, log = lora_two
    _same(out, lora_one)
    assert "world size 2 (1 node x 2 processes, 1 thread each), backend gloo; global batch 8 = 2 per device x 2 " \
           "accumulation x 2 ranks" in log
    assert "sharding: DDP" in log and "split [1, 0] over the ranks; a rank with none trains on a padding item" in log
    assert log.count("saved adapter to") == 1 and log.count("model: ") == 1  # rank 0 alone speaks
    one, two = (json.loads((p / "train_results.json").read_text()) for p in (lora_one, out))
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-6)  # eval split over the ranks and reduced
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-6)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert len(state["rng_by_rank"]) == 2 and state["examples_consumed"] == 13 and state["schedule"]["world_size"] == 2


@pytest.fixture(scope="module")
def lora_fsdp(tiny):
    """LoRA under FSDP2 (HF's fsdp: full_shard) on 2 ranks, 2 per micro-batch each."""
    out = tiny / "lora_fsdp"
    procs = _ranks(_args(tiny, out, "per_device_train_batch_size=2", "fsdp=full_shard"))
    logs = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    return out, logs[0]


def test_fsdp2_lora_on_two_ranks_trains_the_adapter_of_one_process(tiny, lora_one, lora_fsdp):
    """The final adapter and checkpoint-2 are the files of one process (fp32, tight), gathered tensor by tensor."""
    out, log = lora_fsdp
    assert "sharding: FSDP2 full shard" in log and log.count("saved adapter to") == 1
    for sub in ("", "checkpoint-2"):
        _same(out / sub, lora_one / sub)
        assert json.loads((out / sub / "adapter_config.json").read_text()) == \
            json.loads((lora_one / sub / "adapter_config.json").read_text())
    one, two = (json.loads((p / "train_results.json").read_text()) for p in (lora_one, out))
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-6)  # eval through the sharded layers
    saved = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)["optimizer"]
    assert all(".lora_" in name for name in saved["state"]) and len(saved["state"]) == len(load_file(
        str(out / "checkpoint-2" / "adapter_model.safetensors")))  # whole AdamW state, by name, adapter only


def test_fsdp2_lora_resumes_two_ranks_to_one_and_one_to_two(tiny, lora_one, lora_fsdp):
    """2 -> 1 from the fsdp: full_shard run; 1 -> 2 under DeepSpeed ZeRO 3 offload (read as FSDP2 + CPU offload)."""
    out, _ = lora_fsdp
    two_to_one, one_to_two = tiny / "fsdp21", tiny / "fsdp12"
    shutil.copytree(out / "checkpoint-2", two_to_one / "checkpoint-2")
    assert _one(tiny, two_to_one, "per_device_train_batch_size=4", "resume_from_checkpoint=true")["global_step"] == 3
    _same(two_to_one, lora_one)
    shutil.copytree(lora_one / "checkpoint-2", one_to_two / "checkpoint-2")
    zero3 = tiny / "ds_z3_offload.json"  # LLaMA-Factory's ZeRO 3 with the optimizer offloaded: FSDP2 + CPU offload
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    procs = _ranks(_args(tiny, one_to_two, "per_device_train_batch_size=2", f"deepspeed={zero3}",
                         "resume_from_checkpoint=true"))
    logs = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "made by 1 rank(s), this run has 2" in logs[0] and "runs as FSDP2 full shard + CPU offload" in logs[0]
    _same(one_to_two, lora_one)


@pytest.mark.parametrize("fixture", ["lora_two", "lora_fsdp"])
def test_the_adapter_of_two_ranks_loads_in_peft_with_lorakits_logits(tiny, fixture, request):
    from transformers import AutoModelForCausalLM

    out, _ = request.getfixturevalue(fixture)
    tokens = torch.randint(3, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny / "model"), out).eval()
    ours = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny / "model"), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=tokens).logits, theirs(input_ids=tokens).logits, rtol=1e-5,
                                   atol=1e-5)


def test_resume_two_ranks_to_one(tiny, lora_one, lora_two):
    out, _ = lora_two
    two_to_one = tiny / "lora21"
    shutil.copytree(out / "checkpoint-2", two_to_one / "checkpoint-2")
    assert _one(tiny, two_to_one, "per_device_train_batch_size=4", "resume_from_checkpoint=true")["global_step"] == 3
    _same(two_to_one, lora_one)


def test_freeze_qlora_and_fsdp2_full_on_two_ranks_equal_one_process(tiny):
    """freeze with gradient checkpointing and length grouping (DDP, and FSDP2 against the same one-process run),
    QLoRA on packed rows, FSDP2 full."""
    freeze = ("finetuning_type=freeze", "gradient_checkpointing=true", "group_by_length=true")
    kinds = {"freeze": ("model.safetensors", *freeze),
             "freeze_fsdp": ("model.safetensors", *freeze, "fsdp=full_shard"),
             "qlora": ("adapter_model.safetensors", "quantization_bit=4", "quantization_method=lorakit", "packing=true",
                       "cutoff_len=64"),
             "full": ("model.safetensors", "finetuning_type=full")}
    for kind, (name, *keys) in kinds.items():
        one, two = tiny / f"{kind.split('_')[0]}1", tiny / f"{kind}2"
        if kind != "freeze_fsdp":  # one process: fsdp keys change nothing
            _one(tiny, one, "per_device_train_batch_size=4", "learning_rate=1e-3", *keys)
        procs = _ranks(_args(tiny, two, "per_device_train_batch_size=2", "learning_rate=1e-3", *keys))
        logs = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
        fsdp = kind in ("full", "freeze_fsdp")
        assert ("sharding: FSDP2 full shard" if fsdp else "sharding: DDP") in logs[0]
        _same(two, one, name, atol=1e-5)
    _one(tiny, tiny / "full2", "per_device_train_batch_size=4", "finetuning_type=full", "learning_rate=1e-3",
         "resume_from_checkpoint=true")  # FSDP2's gathered checkpoint, resumed by one process
    _same(tiny / "full2", tiny / "full1", "model.safetensors", atol=1e-5)


def test_two_nodes_on_localhost_resume_one_process_and_train_together(tiny, lora_one):
    """NNODES=2, NODE_RANK 0 and 1, one rank each (each through its own torchrun), resuming 1 -> 2."""
    out, port = tiny / "nodes", str(free_port())
    shutil.copytree(lora_one / "checkpoint-2", out / "checkpoint-2")
    args = _args(tiny, out, "per_device_train_batch_size=2", "resume_from_checkpoint=true")
    nodes = [subprocess.Popen([sys.executable, "-m", "lorakit", "train", *args], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(NNODES="2", NODE_RANK=str(n), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port))
             for n in range(2)]
    logs = [p.communicate(timeout=TIMEOUT)[1] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "world size 2 (2 nodes x 1 process" in logs[0] and "made by 1 rank(s), this run has 2" in logs[0]
    _same(out, lora_one)


def test_a_dead_rank_stops_the_others_with_one_line_and_no_output(tiny):
    out = tiny / "dead"
    procs = _ranks(_args(tiny, out, "per_device_train_batch_size=2", "max_steps=2000", "save_steps=5000",
                         "ddp_timeout=60"))
    _wait_for_step(out, 2, procs)
    procs[1].kill()
    start = time.monotonic()
    _, err = procs[0].communicate(timeout=TIMEOUT)
    assert procs[0].returncode == 1 and time.monotonic() - start < 60
    last = err.strip().splitlines()[-1]
    assert last.startswith("lorakit train: error: rank 0 lost the other ranks (") and "nothing more is written" in last
    assert not (out / "adapter_model.safetensors").exists() and not list(out.glob("checkpoint-*"))
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    procs[1].communicate()


def test_ctrl_c_on_one_rank_stops_every_rank_with_one_checkpoint(tiny):
    out = tiny / "ctrlc"
    procs = _ranks(_args(tiny, out, "per_device_train_batch_size=2", "max_steps=2000", "save_steps=5000"))
    _wait_for_step(out, 2, procs)
    procs[1].send_signal(signal.SIGINT)
    logs = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
    assert [p.returncode for p in procs] == [130, 130], logs[0][-2000:] + logs[1][-2000:]
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and logs[0].count("checkpoint saved to") == 1 and "checkpoint saved" not in logs[1]
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert len(state["rng_by_rank"]) == 2 and state["global_step"] >= 2
    assert not (out / "adapter_model.safetensors").exists()
