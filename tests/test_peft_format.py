"""The PEFT file format both ways, with the real `peft` package as the oracle."""

import json

import peft
import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, LoraModel, get_lora_model

CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules="all-linear", use_rslora=True, r=8, lora_alpha=4)),
    ("llama", dict(target_modules="all-linear", use_dora=True)),
    ("qwen2", dict(target_modules=["q_proj", "k_proj", "o_proj"], bias="all")),
    ("llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    ("llama", dict(target_modules=["embed_tokens", "v_proj"])),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], bias="lora_only")),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], use_dora=True)),
    ("gemma2", dict(target_modules="all-linear", modules_to_save=["embed_tokens"])),
    ("llama", dict(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16})),
]


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def perturb(model):
    """Give every adapter tensor (and trainable bias/copy) non-trivial values, deterministically."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch, config", CASES)
def test_lorakit_adapter_loads_in_peft(arch, config, tokens, tmp_path):
    lm = get_lora_model(make_model(arch), LoraConfig(r=config.pop("r", 4), **config))
    perturb(lm)
    expected = logits(lm, tokens)
    lm.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs = peft.PeftModel.from_pretrained(make_model(arch), tmp_path)
    torch.testing.assert_close(logits(theirs, tokens), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch, config", CASES)
def test_peft_adapter_loads_in_lorakit(arch, config, tokens, tmp_path):
    theirs = peft.get_peft_model(make_model(arch), peft.LoraConfig(r=config.pop("r", 4), **config))
    perturb(theirs)
    expected = logits(theirs, tokens)
    theirs.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(make_model(arch), tmp_path)
    torch.testing.assert_close(logits(ours, tokens), expected, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in ours.parameters())
    trainable = LoraModel.from_pretrained(make_model(arch), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] > 0


def test_file_keys_and_metadata(tmp_path):
    lm = get_lora_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    lm.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    assert state[f"{key}.lora_A.weight"].shape == (4, 64)
    assert state[f"{key}.lora_B.weight"].shape == (64, 4)
    assert state[f"{key}.lora_magnitude_vector"].shape == (64,)
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True and cfg["inference_mode"] is True


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_init_saves_as_plain_lora_for_the_untouched_base(init, tokens, tmp_path):
    lm = get_lora_model(make_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                        init_lora_weights=init))
    perturb(lm)
    expected = logits(lm, tokens)
    lm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (8, 16, True)
    theirs = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path)  # untouched base weights
    torch.testing.assert_close(logits(theirs, tokens), expected, atol=1e-4, rtol=1e-4)
    ours = LoraModel.from_pretrained(make_model("llama"), tmp_path)
    torch.testing.assert_close(logits(ours, tokens), expected, atol=1e-4, rtol=1e-4)


def test_several_adapters_saved_in_subfolders(tmp_path, tokens):
    lm = get_lora_model(make_model("llama"), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    lm.add_adapter("second", LoraConfig(target_modules=["v_proj"], init_lora_weights=False))
    lm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()
    theirs = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "second")
    torch.testing.assert_close(logits(theirs, tokens), logits(lm, tokens), atol=1e-5, rtol=1e-5)


def test_shape_mismatch_names_module_and_shapes(tmp_path):
    lm = get_lora_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    lm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    state[key] = torch.zeros(80, 4)
    save_file(state, path)
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.*\(80, 4\).*\(64, 4\)"):
        LoraModel.from_pretrained(model, tmp_path)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight,
                       before["model.layers.0.self_attn.q_proj.weight"])


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LoraModel.from_pretrained(make_model("llama"), tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        LoraModel.from_pretrained(make_model("llama"), tmp_path)


def test_load_adapter_failure_leaves_no_half_adapter(tmp_path):
    other = get_lora_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 65)
    save_file(state, path)
    lm = get_lora_model(make_model("llama"), LoraConfig(r=4, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="does not fit"):
        lm.load_adapter(tmp_path, "broken")
    assert list(lm.peft_config) == ["default"] and lm.active_adapter == "default"
    assert all(".broken." not in n for n, _ in lm.named_parameters())
