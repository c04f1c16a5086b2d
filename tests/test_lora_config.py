"""LoraConfig: PEFT's defaults and field names, validation at construction, JSON both ways."""

import dataclasses
import json
import math

import peft
import pytest

from lorakit import LoraConfig


def test_defaults_match_peft():
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for f in dataclasses.fields(ours):
        if f.name in ("task_type",):
            continue
        assert getattr(ours, f.name) == getattr(theirs, f.name), f.name


@pytest.mark.parametrize("kwargs, field", [
    ({"r": 0}, "r"), ({"r": -4}, "r"), ({"bias": "some"}, "bias"), ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"lora_dropout": -0.1}, "lora_dropout"), ({"init_lora_weights": "kaiming"}, "init_lora_weights"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LoraConfig(**kwargs)


def test_all_problems_reported_at_once():
    with pytest.raises(ValueError) as err:
        LoraConfig(r=0, bias="x", lora_dropout=2.0)
    assert "r must" in str(err.value) and "bias" in str(err.value) and "lora_dropout" in str(err.value)


def test_scaling_patterns_and_rslora():
    cfg = LoraConfig(r=8, lora_alpha=16, rank_pattern={"v_proj": 4}, alpha_pattern={r"layers\.1\..*q_proj": 64})
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == 2.0
    assert cfg.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert cfg.scaling_for("model.layers.0.self_attn.v_proj") == 4.0
    assert cfg.scaling_for("model.layers.1.self_attn.q_proj") == 8.0
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True).scaling_for("x") == pytest.approx(8 / math.sqrt(16))


def test_saved_config_reads_in_peft(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, bias="lora_only")
    cfg.save(tmp_path)
    theirs = peft.LoraConfig.from_pretrained(tmp_path)
    assert (theirs.r, theirs.lora_alpha, theirs.use_dora, theirs.bias) == (4, 8, True, "lora_only")
    assert set(theirs.target_modules) == {"q_proj", "v_proj"}


def test_newer_keys_load_with_warning(tmp_path):
    raw = LoraConfig(target_modules=["q_proj"]).to_peft_dict()
    raw["some_future_option"] = {"x": 1}
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="some_future_option"):
        cfg = LoraConfig.load(tmp_path)
    assert cfg.target_modules == ["q_proj"]


def test_missing_and_broken_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        LoraConfig.load(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"r": 8,\n "target_modules": [}')
    with pytest.raises(ValueError, match="line 2"):
        LoraConfig.load(tmp_path)
