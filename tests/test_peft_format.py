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
    ("qwen2", dict(target_modules=["q_proj", "v_proj"], bias="lora_only")),
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
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # handed back unwrapped, unchanged
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


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


def _save(lm, path):
    lm.save_pretrained(path)
    return load_file(str(path / "adapter_model.safetensors")), json.loads((path / "adapter_config.json").read_text())


@pytest.mark.parametrize("drop", ["base_model.model.lm_head.weight",
                                  "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"])
def test_an_adapter_file_missing_a_tensor_is_refused_by_name(drop, tmp_path):
    lm = get_lora_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    state, _ = _save(lm, tmp_path)
    del state[drop]
    save_file(state, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    model = make_model("llama")
    with pytest.raises(ValueError, match=f"lacks 1 tensor.*'{drop}'"):
        LoraModel.from_pretrained(model, tmp_path)
    assert not any("lora_" in k or "modules_to_save" in k for k, _ in model.named_modules())  # handed back plain


def test_lora_only_biases_are_saved_and_loaded_by_peft_as_by_lorakit(tmp_path):
    """PEFT 0.21's own saver keeps the trained biases of wrapped layers under `.base_layer.bias`, as lorakit does."""
    theirs = peft.get_peft_model(make_model("qwen2"), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                       bias="lora_only"))
    perturb(theirs)
    state, _ = _save(theirs, tmp_path / "peft")
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in state
    ours = get_lora_model(make_model("qwen2"), LoraConfig(r=4, target_modules=["q_proj"], bias="lora_only"))
    assert sorted(_save(ours, tmp_path / "ours")[0]) == sorted(state)


def test_conv1d_adapters_say_fan_in_fan_out_and_peft_loads_them_without_correcting(tokens, tmp_path, recwarn):
    lm = get_lora_model(make_model("gpt2"), LoraConfig(r=4, target_modules=["c_attn"]))
    perturb(lm)
    _, config = _save(lm, tmp_path)
    assert config["fan_in_fan_out"] is True
    theirs = peft.PeftModel.from_pretrained(make_model("gpt2"), tmp_path)
    assert not [w for w in recwarn if "fan_in_fan_out" in str(w.message)]
    torch.testing.assert_close(logits(theirs, tokens), logits(lm, tokens), atol=1e-5, rtol=1e-5)
    # a config that says false (older lorakit files) is corrected, with a warning, as PEFT does
    config["fan_in_fan_out"] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="fan_in_fan_out=False .* Conv1D"):
        again = LoraModel.from_pretrained(make_model("gpt2"), tmp_path)
    assert again.peft_config["default"].fan_in_fan_out is True
    torch.testing.assert_close(logits(again, tokens), logits(lm, tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers", [2, 3], ids=["14-modules", "21-modules"])
def test_all_linear_is_saved_as_peft_saves_it(layers, tmp_path):
    """PEFT writes the full names of a short target list and condenses one of 20 or more to name suffixes."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    def model():
        torch.manual_seed(0)
        config = tiny_config("llama")
        config.num_hidden_layers = layers
        return AutoModelForCausalLM.from_config(config)

    ours = get_lora_model(model(), LoraConfig(r=4, target_modules="all-linear"))
    theirs = peft.get_peft_model(model(), peft.LoraConfig(r=4, target_modules="all-linear"))
    _, our_config = _save(ours, tmp_path / "ours")
    _, their_config = _save(theirs, tmp_path / "peft")
    assert sorted(our_config["target_modules"]) == sorted(their_config["target_modules"])
    if layers == 3:
        assert sorted(our_config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                        "up_proj", "v_proj"]
    wrapped = {k for k, m in ours.model.named_modules() if hasattr(m, "lora_A")}
    assert len(wrapped) == 7 * layers


def test_a_base_embedding_carried_by_a_peft_file_is_restored_by_unload_and_delete(tokens, tmp_path):
    theirs = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    perturb(theirs)
    theirs.save_pretrained(tmp_path, save_embedding_layers=True)
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    state[key] = state[key] + 0.25  # e.g. rows of new tokens trained elsewhere
    save_file(state, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    plain = logits(make_model("llama"), tokens)
    model = make_model("llama")
    ours = LoraModel.from_pretrained(model, tmp_path)
    loaded = logits(ours, tokens)
    assert not torch.allclose(loaded, plain)
    torch.testing.assert_close(logits(ours.unload(), tokens), plain, atol=0, rtol=0)
    ours = LoraModel.from_pretrained(make_model("llama"), tmp_path)
    ours.load_adapter(tmp_path, adapter_name="second")
    torch.testing.assert_close(logits(ours, tokens), loaded)
    ours.delete_adapter("second")
    ours.delete_adapter("default")
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours, tokens), plain, atol=0, rtol=0)
