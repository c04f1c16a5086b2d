"""lorakit estimate: shapes from configs on the meta device, the activation formula against what autograd really
keeps, the peak against a measured `lorakit train` process, the command's table / JSON / errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_setup import save_tiny_model

from lorakit.cli import main
from lorakit.estimate import as_json, estimate, estimate_for_keys
from lorakit.estimate.devices import Device, gpu, memory_size
from lorakit.estimate.memory import CPU_HEAP_FACTOR, activation_bytes
from lorakit.estimate.plan import config_for_keys, training
from lorakit.estimate.shape import read_shape

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "examples" / "configs"
FAKE_CPU = Device("test cpu", "cpu", 24 * 2**30, {"fp32": 1e11, "bf16": 2e11}, "test")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Llama with the test tokenizer on disk, and an alpaca file of long-ish answers."""
    root = tmp_path_factory.mktemp("estimate")
    save_tiny_model(root / "model", intermediate_size=96)
    words = "the quick brown fox jumps over the lazy dog and asks what the vpn address is today".split()
    records = [{"instruction": f"Question {i}?", "input": "", "output": " ".join(words * (1 + i % 4))}
               for i in range(12)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"model": str(root / "model"), "data": str(root / "data.jsonl"), "root": root}


@pytest.mark.parametrize("name, params", [("llama-2-7b", 6_738_415_616), ("llama-3-8b", 8_030_261_248),
                                          ("llama-3-70b", 70_553_706_496)])
def test_published_shapes_count_their_parameters(name, params):
    shape, model = read_shape(str(CONFIGS / name))
    assert shape.params == params  # the models' published parameter counts
    assert next(model.parameters()).device.type == "meta"


def test_big_configs_fit_where_the_arithmetic_says(tmp_path):
    est = estimate_for_keys({"model_name_or_path": str(CONFIGS / "llama-2-7b"), "finetuning_type": "full",
                             "cutoff_len": 512, "per_device_train_batch_size": 1}, device="A100")
    # full fine-tuning in fp32 with AdamW: 16 bytes per parameter (seed 001's "~112 GB"); the gradients (4 B) fill
    # what the backward frees of the activations, so they count only beyond activations + temporary
    parts = est.parts
    assert parts["trained weights"] + parts["optimizer"] == pytest.approx(12 * est.params, rel=1e-6)
    assert parts["gradients"] + parts["activations"] + parts["temporary"] == pytest.approx(4 * est.params, rel=1e-6)
    assert not est.fits and est.changes and est.changes[0]["change"].startswith("LoRA instead of full")
    lora = estimate_for_keys({"model_name_or_path": str(CONFIGS / "llama-2-7b"), "cutoff_len": 512,
                              "per_device_train_batch_size": 1, "bf16": True}, device="A100")
    assert lora.fits and lora.peak_bytes < est.peak_bytes / 3


def _saved_bytes(model, batch, amp) -> int:
    """Bytes of the tensors autograd keeps for the backward of the chunked loss (parameters excluded)."""
    from lorakit.train.loss import causal_lm_loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            causal_lm_loss(model, batch)
    return sum(seen.values())


@pytest.mark.parametrize("keys", [{"finetuning_type": "lora"}, {"finetuning_type": "lora", "lora_rank": 16},
                                  {"finetuning_type": "lora", "bf16": True},
                                  {"finetuning_type": "lora", "lora_target": "q_proj,v_proj"},
                                  {"finetuning_type": "freeze", "freeze_trainable_layers": 1},
                                  {"finetuning_type": "qlora", "bf16": True}])
def test_activation_formula_matches_what_autograd_keeps(tiny, keys):
    """The per-token formula against the tensors saved by a real forward of the trainer's loss on a tiny Llama."""
    from lorakit.models import load_model
    from lorakit.train.methods import make_trainable
    from lorakit.train.precision import store_frozen_base

    cfg, _ = config_for_keys({"model_name_or_path": tiny["model"], "output_dir": "x", **keys})
    model, _, _ = load_model(tiny["model"], device="cpu")
    trainable = make_trainable(model, cfg)
    model.train()
    if cfg.bf16 and trainable.lora is not None:
        store_frozen_base(model, torch.bfloat16)
    ids = torch.randint(3, 300, (2, 64), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :16] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    measured = _saved_bytes(model, batch, cfg.bf16)
    shape, meta = read_shape(tiny["model"])
    from lorakit.estimate.memory import Workload

    work = Workload(rows=2, width=64, labels=2 * 47, packed=False)
    predicted = activation_bytes(shape, cfg, training(meta, shape, cfg), work, cfg.bf16, FAKE_CPU)
    assert predicted == pytest.approx(measured, rel=0.12)


def test_parts_add_up_and_json_has_the_contract(tiny):
    est = estimate_for_keys({"model_name_or_path": tiny["model"], "dataset": tiny["data"], "cutoff_len": 64,
                             "per_device_train_batch_size": 4}, device=FAKE_CPU)
    assert est.data.measured and est.data.examples == 12 and est.data.tokenizer == "the model's own"
    assert est.peak_bytes == max(sum(est.parts.values()), est.load_bytes)
    assert est.workload.rows <= 4 and est.workload.width <= 64
    obj = json.loads(json.dumps(as_json(est)))
    assert {"peak_bytes", "parts", "fits", "tokens_per_s"} <= set(obj) and obj["fits"] is True
    assert obj["tokens_per_s"] > 0 and obj["advice"][0]["source"].startswith("seed 004")


def test_what_to_change_follows_seed_000s_order_and_each_saves_memory():
    tight = Device("tight", "cuda", 40 * 2**30, {"bf16": 1e14}, "test")
    est = estimate_for_keys({"model_name_or_path": str(CONFIGS / "llama-2-7b"), "cutoff_len": 2048,
                             "per_device_train_batch_size": 8, "lora_rank": 64, "bf16": True}, device=tight)
    assert not est.fits
    names = [c["change"] for c in est.changes]
    assert names[0].startswith("lora_rank 64 -> 32") and names[1].startswith("LoRA on attention only")
    assert names.index("gradient_checkpointing: true") > [i for i, n in enumerate(names) if n.startswith("batch")][0]
    assert all(c["saves_bytes"] >= 0 for c in est.changes)
    assert est.changes[-1]["change"].startswith("together:") and est.changes[-1]["fits"]
    small = Device("small", "cuda", 22 * 2**30, {"bf16": 1e14}, "test")  # under the 7B's fp32 load (25 GiB)
    est = estimate_for_keys({"model_name_or_path": str(CONFIGS / "llama-2-7b"), "finetuning_type": "qlora",
                             "cutoff_len": 256, "per_device_train_batch_size": 1, "bf16": True}, device=small)
    assert not est.fits and not any(c["fits"] for c in est.changes)
    assert any("no training setting lowers" in n for n in est.notes)


def test_devices():
    assert gpu("a100").memory_bytes == 80 * 2**30 and gpu("rtx4090").peak_flops["bf16"] == 165.2e12
    assert memory_size("24GB").memory_bytes == 24 * 2**30 and memory_size("A100") is None
    with pytest.raises(ValueError, match="unknown device"):
        gpu("Z80")


@pytest.mark.slow
def test_peak_within_15_percent_of_a_measured_train_process(tiny):
    """A real `lorakit train` process on the tiny model: its peak RSS against the prediction. A tiny model's peak is
    almost all the process's fixed cost (interpreter, torch, transformers), measured 0.45-0.74 GB across runs and
    fresh clones here against 0.39 GB predicted: the bound is that the plan never predicts more than 15 % above the
    peak nor under 0.4 of it; the 15 % validation is on the real model (bench/validate_estimate.py)."""
    out = tiny["root"] / "run"
    keys = {"model_name_or_path": tiny["model"], "dataset": tiny["data"], "output_dir": str(out),
            "cutoff_len": 64, "per_device_train_batch_size": 4, "max_steps": 2, "save_steps": 1000}
    # a clean environment: what earlier tests left in this process's one must not change the child's footprint
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR", "LORAKIT_HOME") if k in os.environ}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "train", *[f"{k}={v}" for k, v in keys.items()]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode()
    assert os.waitstatus_to_exitcode(status) == 0, err
    assert "lorakit train: estimate: lora (fp32)" in err  # the summary line, before the model loads
    assert err.index("estimate:") < err.index("loading")
    predicted = estimate(config_for_keys(keys)[0], FAKE_CPU).peak_bytes
    assert 0.4 <= predicted / (usage.ru_maxrss * 1024) <= 1.15


def test_command_table_json_and_errors(tiny, capsys):
    assert main(["estimate", f"model_name_or_path={tiny['model']}", "cutoff_len=64", "--device", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "| activations |" in out and "of 24.00 GiB" in out and "no data set" in out
    assert main(["estimate", f"model_name_or_path={tiny['model']}", "--device=A100", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["device"]["name"] == "A100" and obj["fits"] is True and obj["peak_bytes"] > 0
    assert main(["estimate", "lora_rnak=8"]) == 2
    assert "did you mean 'lora_rank'" in capsys.readouterr().err
    assert main(["estimate", f"model_name_or_path={tiny['model']}", "--device", "Z80"]) == 1
    assert "unknown device 'Z80'" in capsys.readouterr().err
    assert main(["estimate", "model_name_or_path=/no/such/model"]) == 1
    assert "not found" in capsys.readouterr().err


def test_heap_factor_is_the_measured_one():
    """The CPU heap factor is the one bench/validate_estimate.py was checked with."""
    result = json.loads((ROOT / "bench" / "results" / "estimate.json").read_text())
    assert result["worst_error"] <= result["tolerance"] and len(result["rows"]) >= 8
    assert CPU_HEAP_FACTOR == pytest.approx(result["heap_factor"])


def test_replay_rows_are_counted_as_the_trainer_mixes_them(tiny, tmp_path, capsys):
    """replay_dataset's rows join the epoch's steps and tokens as the trainer mixes them; the KL term adds the base's
    head on their labels; what happens before the first step is named as not counted."""
    keys = [f"model_name_or_path={tiny['model']}", f"dataset={tiny['data']}", "--device", "24GB"]
    assert main(["estimate", *keys]) == 0
    assert "not counted" not in (out := capsys.readouterr().out) and "replay:" not in out
    replay = [f"replay_dataset={tiny['data']}", "replay_ratio=0.5", "replay_kl_weight=1", "replay_null_space=0.99"]
    assert main(["estimate", *keys, *replay, "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["data"]["replay_rows"] == 12 and obj["data"]["examples"] == 12 and obj["data"]["replay_tokens"] > 0
    assert "counted: 12 replay rows in every epoch" in " ".join(obj["notes"])
    assert any("replay_null_space sums" in n for n in obj["notes"])
    assert main(["train", f"model_name_or_path={tiny['model']}", f"dataset={tiny['data']}", *replay, "max_steps=1",
                 f"output_dir={tmp_path / 'run'}", "save_strategy=no", "report_to=none"]) == 0
    printed = capsys.readouterr()
    steps = next(line for line in (printed.out + printed.err).splitlines() if line.startswith("steps:"))
    assert f"{obj['steps_per_epoch']} steps/epoch" in steps  # the trainer's own count, replay rows included
    without_kl = estimate_for_keys({"model_name_or_path": tiny["model"], "dataset": tiny["data"],
                                    "replay_dataset": tiny["data"], "replay_ratio": 0.5}, FAKE_CPU)
    with_kl = estimate_for_keys({"model_name_or_path": tiny["model"], "dataset": tiny["data"],
                                 "replay_dataset": tiny["data"], "replay_ratio": 0.5, "replay_kl_weight": 1.0},
                                FAKE_CPU)
    vh = with_kl.data.kl_labels * 2 * read_shape(tiny["model"])[0].vocab * read_shape(tiny["model"])[0].hidden
    assert with_kl.data.kl_labels == with_kl.data.replay_labels > 0 and without_kl.data.kl_labels == 0
    assert with_kl.flops_per_step * with_kl.steps_per_epoch == pytest.approx(
        without_kl.flops_per_step * without_kl.steps_per_epoch + vh)
    assert main(["estimate", *keys, f"replay_dataset={tiny['data']}", "replay_ratio=0.5", "replay_kl_weight=1",
                 "replay_task_directions=4"]) == 0
    assert "replay_task_directions sums an (in x in) float64 input covariance per LoRA layer input over the task " \
        "and the replay rows" in capsys.readouterr().out


def test_self_replay_rows_before_and_after_generation(tiny, tmp_path):
    """Before the pool is generated each answer counts at its longest; once a run has cached it, its real lengths."""
    from lorakit.estimate import dataset
    from lorakit.estimate.plan import measured_data
    from lorakit.train.self_replay import drawn_prompts, pool_file, replay_source

    keys = {"model_name_or_path": tiny["model"], "dataset": tiny["data"], "self_replay": True, "replay_ratio": 0.5,
            "self_replay_max_new_tokens": 8, "output_dir": str(tmp_path / "out")}
    cfg, _ = config_for_keys(keys)
    before = measured_data(cfg, amp=False)
    assert before.replay_rows == 12 and before.replay_labels == 12 * 9  # 8 tokens and the end token each
    assert "not generated yet" in before.replay_source and "self_replay_max_new_tokens 8" in before.replay_source
    tokenizer, _ = dataset.tokenizer_for(tiny["model"])
    from lorakit.models import resolve_model

    prompts = drawn_prompts(cfg, replay_source(cfg), 12)
    path = pool_file(cfg, prompts, tokenizer, resolve_model(tiny["model"]), None)
    path.parent.mkdir(parents=True)
    pool = [{"messages": p + [{"role": "assistant", "content": "Yes."}]} for p in prompts]
    path.write_text(json.dumps({"records": pool}))
    after = measured_data(cfg, amp=False)
    assert after.replay_rows == 12 and str(path) in after.replay_source
    assert 0 < after.replay_labels < before.replay_labels and after.replay_tokens < before.replay_tokens


def test_cpu_matmul_rate_times_capped_shapes(monkeypatch):
    """A big model's shapes are timed at capped sizes (seconds, not a minute and gigabytes), weighted by count."""
    from lorakit.estimate import devices

    timed = []
    monkeypatch.setattr(devices, "_matmul_seconds", lambda dtype, m, k, n, s: timed.append((m, k, n)) or 1e-3)
    rate = devices.cpu_matmul_rate(torch.float32, 4096, ((8192, 28672, 80), (576, 192, 2)))
    assert timed == [(1024, 2048, 2048), (1024, 576, 192)]
    assert rate == pytest.approx((80 * 2 * 1024 * 2048 * 2048 + 2 * 2 * 1024 * 576 * 192) / (82 * 1e-3))
