"""LoRA-GA: the adapter starts on the gradient's singular directions, outputs unchanged at step 0; PEFT as oracle."""

import copy

import peft
import pytest
import torch
from conftest import VOCAB, make_model

from lorakit import LoraConfig, LoraGAConfig, LoraModel, get_lora_model, gradient_factors


def _batches(model, tokens):
    """One callable per batch of two rows: its forward and mean loss."""
    return [lambda i=i: model(tokens[i:i + 2], labels=tokens[i:i + 2]).loss for i in range(0, len(tokens), 2)]


def _tokens(rows=4, length=10, seed=0):
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr", "random"])
@pytest.mark.parametrize("scale, on", [("stable", "AB"), ("stable", "B"), ("weight_svd", "AB"), ("gd_scale", "AB"),
                                       ("unit", "AB")])
def test_step_zero_outputs_are_unchanged(direction, scale, on):
    model, tokens = make_model("qwen2"), _tokens()
    before = _logits(model, tokens)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig(direction=direction, scale=scale, stable_scale_on=on))
    lm = get_lora_model(model, config, lora_ga_factors=gradient_factors(model, config, _batches(model, tokens)))
    torch.testing.assert_close(_logits(lm, tokens), before, atol=2e-5, rtol=1e-5)
    layer = lm.model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().sum() > 0  # a real start, not B = 0


def test_the_adapter_starts_on_the_gradient_directions_as_the_paper_says():
    """ArB2r, stable on A and B: A = c V[:r]^T, B = c U[:, r:2r], c = d_out^(1/4) / sqrt(gamma)."""
    model, tokens = make_model("llama"), _tokens()
    layer_name = "model.layers.1.mlp.down_proj"
    weight = model.get_submodule(layer_name).weight
    weight.requires_grad_(True)
    for step in _batches(model, tokens):
        step().backward()
    grad = weight.grad / 2
    weight.grad = None
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["down_proj"], init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig(stable_gamma=4))
    lm = get_lora_model(model, config, lora_ga_factors=gradient_factors(model, config, _batches(model, tokens)))
    layer = lm.model.get_submodule(layer_name)
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    c = grad.shape[0] ** 0.25 / 2
    a, b = layer.lora_A["default"].weight / c, layer.lora_B["default"].weight / c
    for i in range(3):  # each singular vector up to its sign
        assert abs(float(a[i] @ vh[i])) == pytest.approx(1, abs=1e-4)
        assert abs(float(b[:, i] @ u[:, 3 + i])) == pytest.approx(1, abs=1e-4)


def test_with_peft_formula_the_factors_equal_peft_lora_ga():
    """stable_scale_on="B" is PEFT 0.21's formula: the same A and B, each singular direction up to its sign."""
    tokens = _tokens(rows=2, length=4)  # a gradient of rank <= 8 = 2r: PEFT's randomized SVD is exact on it
    ours_model = make_model("llama")
    theirs_model = copy.deepcopy(ours_model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig(stable_scale_on="B"))
    ours = get_lora_model(ours_model, config, lora_ga_factors=gradient_factors(
        ours_model, config, _batches(ours_model, tokens)))
    their_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                   init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig())

    def step():
        theirs_model(tokens, labels=tokens).loss.backward()

    peft.preprocess_loraga(theirs_model, their_config, step)
    theirs = peft.get_peft_model(theirs_model, their_config)
    for key in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        mine, peft_layer = ours.model.get_submodule(key), theirs.base_model.model.get_submodule(key)
        for table, dim in (("lora_A", 1), ("lora_B", 0)):
            x, y = getattr(mine, table)["default"].weight, getattr(peft_layer, table)["default"].weight
            sign = torch.sign((x * y).sum(dim=dim, keepdim=True))
            torch.testing.assert_close(x * sign, y, atol=1e-4, rtol=1e-3)
    # the base offsets differ only where the SVDs chose other signs; both leave the model's outputs as they were
    torch.testing.assert_close(_logits(ours, tokens), _logits(theirs, tokens), atol=2e-5, rtol=1e-5)


def test_saved_as_plain_lora_that_peft_and_lorakit_load_with_the_same_logits(tmp_path):
    model, tokens = make_model("llama"), _tokens()
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="lora_ga", use_rslora=True)
    lm = get_lora_model(model, config, lora_ga_factors=gradient_factors(model, config, _batches(model, tokens)))
    with torch.no_grad():  # a training step's worth of change
        for key, p in lm.named_parameters():
            if ".lora_" in key:
                p.add_(0.01 * torch.randn_like(p))
    expected = _logits(lm, tokens)
    lm.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path)  # the untouched base
    torch.testing.assert_close(_logits(theirs, tokens), expected, atol=1e-5, rtol=1e-5)
    assert theirs.peft_config["default"].r == 8 and theirs.peft_config["default"].init_lora_weights is True
    again = LoraModel.from_pretrained(make_model("llama"), tmp_path)
    torch.testing.assert_close(_logits(again, tokens), expected, atol=1e-5, rtol=1e-5)


def test_estimation_trains_nothing_and_restores_the_model():
    model, tokens = make_model("llama"), _tokens()
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    config = LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights="lora_ga")
    factors = gradient_factors(model, config, _batches(model, tokens))
    assert sorted(factors) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    assert not model.training  # make_model returns eval(): the mode is restored


def test_lora_ga_errors_are_one_line():
    model = make_model("llama")
    config = LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights="lora_ga")
    with pytest.raises(ValueError, match="needs the gradient factors of every target layer"):
        get_lora_model(model, config)
    with pytest.raises(ValueError, match="at least one batch"):
        gradient_factors(model, config, [])
    with pytest.raises(ValueError, match="direction must be one of"):
        LoraGAConfig(direction="up")
    with pytest.raises(ValueError, match="use_dora cannot be combined"):
        LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights="lora_ga", use_dora=True)
