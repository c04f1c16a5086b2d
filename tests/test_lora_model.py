"""LoraModel invariants on tiny transformers models of several families."""

import re

import peft
import pytest
import torch
from conftest import make_model, tiny_config

from lorakit import LoraConfig, get_lora_model
from lorakit.lora import LoraLayer, ModulesToSave

ARCHS = ["llama", "llama_tied", "qwen2", "gemma2", "gpt2"]


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_adapter_leaves_logits_unchanged(arch, tokens):
    model = make_model(arch)
    ref = logits(model, tokens)
    lm = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.testing.assert_close(logits(lm, tokens), ref)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True}, {"bias": "all"}])
def test_same_logits_adapter_merge_unmerge_unload(arch, variant, tokens):
    model = make_model(arch)
    base = logits(model, tokens)
    lm = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                          **variant))
    with_adapter = logits(lm, tokens)
    assert (with_adapter - base).abs().max() > 1e-3  # the adapter does something
    lm.merge_adapter()
    torch.testing.assert_close(logits(lm, tokens), with_adapter, atol=1e-4, rtol=1e-4)
    lm.merge_adapter()  # twice is a no-op
    torch.testing.assert_close(logits(lm, tokens), with_adapter, atol=1e-4, rtol=1e-4)
    with lm.disable_adapter():
        torch.testing.assert_close(logits(lm, tokens), base, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits(lm, tokens), with_adapter, atol=1e-4, rtol=1e-4)
    lm.unmerge_adapter()
    torch.testing.assert_close(logits(lm, tokens), with_adapter, atol=1e-4, rtol=1e-4)
    plain = lm.merge_and_unload()
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in plain.modules())
    torch.testing.assert_close(logits(plain, tokens), with_adapter, atol=1e-4, rtol=1e-4)


def test_unload_restores_base(tokens):
    model = make_model("llama")
    base = logits(model, tokens)
    lm = get_lora_model(model, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    plain = lm.unload()
    torch.testing.assert_close(logits(plain, tokens), base)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())


@pytest.mark.parametrize("config", [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules="all-linear", use_dora=True),
    dict(target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]),
    dict(target_modules=["q_proj"], bias="all"),
])
def test_gradients_reach_only_adapter_parameters(config, tokens):
    lm = get_lora_model(make_model("qwen2"), LoraConfig(r=4, init_lora_weights=False, **config))
    lm.train()
    out = lm(tokens, labels=tokens)
    out.loss.backward()
    for name, p in lm.named_parameters():
        adapter = any(s in name for s in ("lora_", "modules_to_save")) or (config.get("bias") == "all"
                                                                          and name.endswith("bias"))
        assert p.requires_grad == adapter, name
        if not adapter:
            assert p.grad is None, name
        else:
            assert p.grad is not None, name


@pytest.mark.parametrize("arch, config", [
    ("llama", dict(r=8, target_modules=["q_proj", "v_proj"])),
    ("llama", dict(r=4, target_modules="all-linear", use_dora=True)),
    ("llama", dict(r=4, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])),
    ("qwen2", dict(r=4, target_modules=["q_proj", "k_proj"], bias="all")),
    ("qwen2", dict(r=4, target_modules=["q_proj", "k_proj"], bias="lora_only")),
    ("gpt2", dict(r=4, target_modules=["c_attn"], rank_pattern={"c_attn": 2}, layers_to_transform=[1])),
])
def test_trainable_counts_match_peft(arch, config, capsys):
    ours = get_lora_model(make_model(arch), LoraConfig(**config))
    theirs = peft.get_peft_model(make_model(arch), peft.LoraConfig(**config))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    capsys.readouterr()
    ours.print_trainable_parameters()
    line = capsys.readouterr().out
    theirs.print_trainable_parameters()
    assert line == capsys.readouterr().out
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}\n", line)


def test_meta_device_counts_for_a_7b_config():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      vocab_size=32000)
    with torch.device("meta"):
        ours = get_lora_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=16, target_modules="all-linear"))
        theirs = peft.get_peft_model(AutoModelForCausalLM.from_config(cfg),
                                     peft.LoraConfig(r=16, target_modules="all-linear"))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters() == (39976960, 6778392576)


def test_no_match_lists_linear_modules():
    with pytest.raises(ValueError, match=r"matched no module.*down_proj.*q_proj"):
        get_lora_model(make_model("llama"), LoraConfig(target_modules=["query"]))


def test_unsupported_target_type():
    with pytest.raises(ValueError, match="self_attn.*LoRA wraps Linear"):
        get_lora_model(make_model("llama"), LoraConfig(target_modules=["self_attn"]))


def test_layers_to_transform_and_exclude():
    lm = get_lora_model(make_model("llama"), LoraConfig(target_modules="all-linear", layers_to_transform=[1],
                                                        exclude_modules=["down_proj"]))
    wrapped = {k for k, m in lm.model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped and all(".layers.1." in k and "down_proj" not in k for k in wrapped)
    assert len(wrapped) == 6


def test_default_targets_per_architecture():
    lm = get_lora_model(make_model("llama"), LoraConfig())
    wrapped = {k.rsplit(".", 1)[1] for k, m in lm.model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {"q_proj", "v_proj"}


def test_nan_merge_leaves_model_unchanged(tokens):
    lm = get_lora_model(make_model("llama"), LoraConfig(target_modules="all-linear", init_lora_weights=False))
    before = logits(lm, tokens)
    weights = {k: v.clone() for k, v in lm.state_dict().items()}
    layer = lm.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf.*layers.1.mlp.down_proj"):
        lm.merge_adapter()
    assert not lm.merged
    for k, v in lm.state_dict().items():
        if "lora_B" not in k:
            torch.testing.assert_close(v, weights[k], msg=k)
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = 0.0
    assert logits(lm, tokens).shape == before.shape


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_principal_inits_start_at_the_base_model(init, tokens):
    model = make_model("llama")
    base = logits(model, tokens)
    lm = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init))
    torch.testing.assert_close(logits(lm, tokens), base, atol=1e-4, rtol=1e-4)
    a = lm.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert a.abs().sum() > 0  # not the plain init


def test_delete_and_switch_adapters(tokens):
    lm = get_lora_model(make_model("llama"), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    first = logits(lm, tokens)
    lm.add_adapter("other", LoraConfig(target_modules=["v_proj"], init_lora_weights=False))
    assert lm.active_adapter == "other"
    second = logits(lm, tokens)
    assert (first - second).abs().max() > 1e-4
    lm.set_adapter("default")
    torch.testing.assert_close(logits(lm, tokens), first)
    assert all(p.requires_grad == (".default." in n) for n, p in lm.named_parameters() if "lora_" in n)
    lm.delete_adapter("default")
    assert list(lm.peft_config) == ["other"] and lm.active_adapter == "other"
    torch.testing.assert_close(logits(lm, tokens), second)
    with pytest.raises(ValueError, match="unknown adapter"):
        lm.set_adapter("default")


def test_passthrough_attributes_and_generate(tokens):
    lm = get_lora_model(make_model("llama"), LoraConfig(target_modules="all-linear"))
    assert lm.config.model_type == "llama"
    assert lm.get_base_model() is lm.model is lm.base_model
    out = lm.generate(tokens[:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, tokens.shape[1] + 3)


def test_tiny_configs_build():
    for arch in ARCHS:
        assert tiny_config(arch).vocab_size > 0
