"""`lorakit train` with the initialisations and schedules that need the training loop: LoRA-GA and AdaLoRA."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from cli_setup import train_setup
from transformers import AutoModelForCausalLM

from lorakit.train import ConfigError, load_config, train

FACTS = [("What is the VPN address?", "It is vpn.example."),
         ("Who can help you today?", "Hello there, I can help you today."),
         ("What does the quick fox do?", "The quick brown fox jumps over the lazy dog.")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = train_setup(tmp_path_factory.mktemp("methods"), FACTS, 6)
    return {"model": str(root / "model"), "data": str(root / "data.jsonl"), "root": root}


def _run(tiny, out, *extra):
    config, _ = load_config(None, [f"model_name_or_path={tiny['model']}", f"dataset={tiny['data']}",
                                   f"output_dir={out}", "learning_rate=1e-2", "per_device_train_batch_size=4",
                                   "logging_steps=1", *extra])
    return train(config)


def test_loraga_run_estimates_then_trains_and_saves_plain_lora(tiny, capsys):
    out = tiny["root"] / "loraga"
    results = _run(tiny, out, "max_steps=3", "loraga_init=true", "loraga_batches=2", "use_rslora=true",
                   "lora_rank=4")
    err = capsys.readouterr().err
    assert "LoRA-GA: gradients of" in err and "from 2 batches" in err and "LoRA-GA init" in err
    assert results["global_step"] == 3
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True and config.get("lora_ga_config") is None
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_adalora_run_allocates_ranks_reports_and_plots_them(tiny, capsys):
    out = tiny["root"] / "adalora"
    results = _run(tiny, out, "max_steps=6", "use_adalora=true", "adalora_init_r=4", "adalora_target_r=2",
                   "adalora_tinit=1", "adalora_tfinal=2", "lora_target=q_proj,v_proj")
    err = capsys.readouterr().err
    assert "AdaLoRA (init_r 4 -> target_r 2)" in err and "AdaLoRA final ranks: 8 triplets over 4 layers" in err
    assert (out / "adalora_ranks.png").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 6
    assert sum(map(sum, config["rank_pattern"].values())) == 8 == sum(results["adalora_ranks"].values())
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), out)
    assert isinstance(model.peft_config["default"], peft.AdaLoraConfig)


@pytest.mark.parametrize("extra, message", [
    (["loraga_init=true", "use_dora=true"], "loraga_init cannot be combined"),
    (["loraga_direction=sideways"], "loraga_direction must be one of"),
    (["use_adalora=true", "adalora_target_r=20"], "must not exceed adalora_init_r"),
    (["use_adalora=true", "finetuning_type=full"], "use_adalora is only valid with finetuning_type: lora"),
    (["use_adalora=true", "use_rslora=true"], "use_adalora cannot be combined with .*use_rslora"),
    (["loraga_batches=4"], "loraga_batches is set but loraga_init is false"),
    (["adalora_target_r=4"], "adalora_target_r is set but use_adalora is false"),
])
def test_bad_method_keys_are_config_errors_before_loading(tiny, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"model_name_or_path={tiny['model']}", f"dataset={tiny['data']}", *extra])
