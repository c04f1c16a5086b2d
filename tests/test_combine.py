"""add_weighted_adapter against PEFT on the same adapters."""

import peft
import pytest
import torch
from conftest import make_model

from lorakit import LoraConfig, LoraModel, get_lora_model


def two_adapters(tmp_path, r2=4, targets2=("q_proj", "v_proj")):
    torch.manual_seed(0)
    lm = get_lora_model(make_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                             "embed_tokens"],
                                                        init_lora_weights=False), adapter_name="x")
    lm.add_adapter("y", LoraConfig(r=r2, lora_alpha=4, target_modules=list(targets2), init_lora_weights=False,
                                   use_rslora=True))
    lm.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "x", adapter_name="x")
    theirs.load_adapter(tmp_path / "y", adapter_name="y")
    lm.set_adapter("x")
    return lm, theirs


def logits_of(model, name, tokens):
    model.set_adapter(name)
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("kind, extra", [("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 2}),
                                         ("ties", {"density": 0.5}), ("magnitude_prune", {"density": 0.3}),
                                         ("ties_svd", {"density": 0.7})])
def test_matches_peft(kind, extra, tokens, tmp_path):
    lm, theirs = two_adapters(tmp_path)
    weights = [0.7, -0.3]
    lm.add_weighted_adapter(["x", "y"], weights, "mix", combination_type=kind, **extra)
    theirs.add_weighted_adapter(["x", "y"], weights, "mix", combination_type=kind, **extra)
    torch.testing.assert_close(logits_of(lm, "mix", tokens), logits_of(theirs, "mix", tokens), atol=1e-4, rtol=1e-4)
    lm.save_pretrained(tmp_path / "out", selected_adapters=["mix"])
    reloaded = LoraModel.from_pretrained(make_model("llama"), tmp_path / "out" / "mix")
    torch.testing.assert_close(logits_of(reloaded, "default", tokens), logits_of(lm, "mix", tokens))


def test_cat_is_exact(tokens, tmp_path):
    lm, _ = two_adapters(tmp_path, r2=2, targets2=("q_proj", "o_proj"))
    lm.add_weighted_adapter(["x", "y"], [0.5, 2.0], "mix", combination_type="cat")
    layer = lm.model.model.layers[0].self_attn.q_proj
    expected = 0.5 * layer.delta_weight("x") + 2.0 * layer.delta_weight("y")
    torch.testing.assert_close(layer.delta_weight("mix"), expected)
    assert layer.r["mix"] == 6
    o_proj = lm.model.model.layers[0].self_attn.o_proj
    torch.testing.assert_close(o_proj.delta_weight("mix"), 2.0 * o_proj.delta_weight("y"))


def test_dare_density_one_is_linear(tokens, tmp_path):
    lm, _ = two_adapters(tmp_path)
    lm.add_weighted_adapter(["x", "y"], [0.6, 0.4], "lin", combination_type="linear")
    lm.add_weighted_adapter(["x", "y"], [0.6, 0.4], "dare", combination_type="dare_linear", density=1.0)
    torch.testing.assert_close(logits_of(lm, "lin", tokens), logits_of(lm, "dare", tokens))
    torch.manual_seed(0)
    lm.add_weighted_adapter(["x", "y"], [0.6, 0.4], "dare_half", combination_type="dare_ties", density=0.5)
    a = lm.model.model.layers[0].self_attn.q_proj.lora_A["dare_half"].weight
    assert 0.2 < (a == 0).float().mean() < 0.8


@pytest.mark.parametrize("args, message", [
    ((["x", "y"], [0.5], "m", "linear"), "2 adapters but 1 weights"),
    ((["x", "y"], [0.0, 0.0], "m", "svd"), "not all zero"),
    ((["x", "y"], [float("nan"), 1.0], "m", "svd"), "finite"),
    ((["x", "zz"], [1.0, 1.0], "m", "svd"), "unknown adapter"),
    ((["x", "y"], [1.0, 1.0], "m", "average"), "unknown combination_type"),
    ((["x", "y"], [1.0, 1.0], "m", "ties"), "density"),
])
def test_bad_input(args, message, tmp_path):
    lm, _ = two_adapters(tmp_path)
    with pytest.raises(ValueError, match=message):
        lm.add_weighted_adapter(*args)
    assert "m" not in lm.peft_config


def test_linear_needs_equal_ranks(tmp_path):
    lm, _ = two_adapters(tmp_path, r2=2)
    with pytest.raises(ValueError, match="equal ranks"):
        lm.add_weighted_adapter(["x", "y"], [1.0, 1.0], "m", combination_type="linear")
