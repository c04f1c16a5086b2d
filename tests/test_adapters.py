"""Opening adapter directories: specs, up-front checks, base model choice."""

import pytest
import torch
from conftest import make_model

from lorakit import LoraConfig, get_lora_model
from lorakit.adapters import base_model_of, check_adapter_dirs, load_adapters, parse_adapter_specs


def test_parse_specs(tmp_path):
    assert parse_adapter_specs("out/a") == [("default", tmp_path.__class__("out/a"))]
    pairs = parse_adapter_specs(["kb=out/a", "out/b"])
    assert [n for n, _ in pairs] == ["kb", "b"]
    assert [n for n, _ in parse_adapter_specs("x=1,y=2")] == ["x", "y"]
    with pytest.raises(ValueError, match="used twice"):
        parse_adapter_specs("a=1,a=2")
    with pytest.raises(ValueError, match="reserved"):
        parse_adapter_specs("__base__=1")


def test_checks_before_loading(tmp_path):
    with pytest.raises(FileNotFoundError, match="'nope'.*does not exist"):
        check_adapter_dirs(parse_adapter_specs(f"nope={tmp_path / 'missing'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        check_adapter_dirs(parse_adapter_specs(str(tmp_path / "empty")))


def test_base_choice():
    a = LoraConfig(target_modules=["q_proj"], base_model_name_or_path="m1")
    b = LoraConfig(target_modules=["q_proj"], base_model_name_or_path="m2")
    assert base_model_of({"a": a}, None) == "m1"
    assert base_model_of({"a": a, "b": b}, "given") == "given"
    with pytest.raises(ValueError, match="different base models"):
        base_model_of({"a": a, "b": b}, None)


def test_load_several(tmp_path):
    for i, name in enumerate(("x", "y")):
        torch.manual_seed(i)
        get_lora_model(make_model("llama"), LoraConfig(target_modules=["q_proj"], init_lora_weights=False)
                       ).save_pretrained(tmp_path / name)
    lm = load_adapters(make_model("llama"), parse_adapter_specs(f"{tmp_path / 'x'},{tmp_path / 'y'}"))
    assert list(lm.peft_config) == ["x", "y"] and lm.active_adapter == "x"
    assert not any(p.requires_grad for p in lm.parameters())
