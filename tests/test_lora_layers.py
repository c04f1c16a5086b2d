"""LoRA layers on hand-set weights, where the expected value is obvious."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.lora import LoraEmbedding, LoraLinear


def hand_set_linear(use_rslora=False):
    base = nn.Linear(3, 2, bias=True)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    layer = LoraLinear(base)
    layer.add_adapter("default", r=1, lora_alpha=4, use_rslora=use_rslora)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor([[1.0, 1.0, 1.0]]))  # A x = sum(x)
        layer.lora_B["default"].weight.copy_(torch.tensor([[1.0], [0.0]]))
    return layer


def test_formula_on_hand_set_weights():
    layer = hand_set_linear()
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # W0 x + b = [1.5, 1.5];  s B A x = 4 * [6, 0]
    torch.testing.assert_close(layer(x), torch.tensor([[25.5, 1.5]]))


def test_rslora_scaling():
    layer = hand_set_linear(use_rslora=True)
    assert layer.scaling["default"] == 4 / math.sqrt(1)
    layer.add_adapter("r4", r=4, lora_alpha=8, use_rslora=True)
    assert layer.scaling["r4"] == pytest.approx(8 / 2)


def test_default_init_is_kaiming_a_zero_b():
    layer = LoraLinear(nn.Linear(64, 32))
    layer.add_adapter("default", r=8, lora_alpha=16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (8, 64) and b.shape == (32, 8)
    assert torch.all(b == 0) and a.abs().max() <= 1 / math.sqrt(64) and a.std() > 0
    assert isinstance(layer.lora_dropout["default"], nn.Identity)
    layer.add_adapter("drop", r=8, lora_alpha=16, lora_dropout=0.1)
    assert isinstance(layer.lora_dropout["drop"], nn.Dropout)


def test_gaussian_init():
    layer = LoraLinear(nn.Linear(256, 32))
    layer.add_adapter("default", r=4, lora_alpha=8, init="gaussian")
    assert abs(layer.lora_A["default"].weight.std().item() - 0.25) < 0.03
    assert torch.all(layer.lora_B["default"].weight == 0)


def test_embedding_init_and_formula():
    emb = nn.Embedding(10, 4)
    layer = LoraEmbedding(emb)
    layer.add_adapter("default", r=2, lora_alpha=2)
    assert torch.all(layer.lora_embedding_A["default"] == 0) and layer.lora_embedding_B["default"].std() > 0
    with torch.no_grad():
        layer.lora_embedding_A["default"].fill_(1.0)
    ids = torch.tensor([[3, 7]])
    expected = emb.weight[ids] + layer.lora_embedding_B["default"].sum(dim=1)  # s = 1, A^T[id] = ones(r)
    torch.testing.assert_close(layer(ids), expected)


def test_conv1d_matches_linear_and_merges():
    torch.manual_seed(0)
    conv = Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs; weight (4, 6)
    layer = LoraLinear(conv)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (4, 6)
    layer.add_adapter("default", r=2, lora_alpha=4, init=False)
    x = torch.randn(3, 5, 4)
    expected = conv(x) + 2.0 * x @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T
    torch.testing.assert_close(layer(x), expected)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_dora_starts_at_base_and_merges():
    torch.manual_seed(0)
    base = nn.Linear(8, 5)
    layer = LoraLinear(base)
    layer.add_adapter("default", r=2, lora_alpha=4, use_dora=True)
    x = torch.randn(4, 8)
    torch.testing.assert_close(layer(x), base(x))
    with torch.no_grad():  # move off the start point: new direction and magnitude
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].weight.mul_(1.5)
    w = base.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    expected_w = layer.lora_magnitude_vector["default"].weight[:, None] * w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ expected_w.T + base.bias)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(base(x), before, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)


def test_merge_is_idempotent_and_refuses_nan():
    layer = hand_set_linear()
    w0 = layer.base_layer.weight.clone()
    layer.merge()
    once = layer.base_layer.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, once)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0)
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, w0)
    assert not layer.merged


def test_dora_under_bf16_autocast_starts_exactly_at_the_base_and_merges_within_rounding():
    """The weight norm runs in fp32 with autocast off: at step 0 the scale m / ||W0 + s B A|| is exactly 1."""
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    layer = LoraLinear(base)
    layer.add_adapter("default", r=4, lora_alpha=8, use_dora=True)
    x = torch.randn(6, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.1)
        layer.lora_magnitude_vector["default"].weight.mul_(1.2)
    with torch.no_grad():
        want = layer(x)  # fp32, unmerged
        with torch.autocast("cpu", dtype=torch.bfloat16):
            unmerged = layer(x).float()
        layer.merge()
        merged = layer(x)
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unmerged, want, atol=0.05, rtol=0.02)  # bf16 matmul rounding only


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_dora", [False, True])
def test_unmerge_restores_a_16_bit_base_bit_for_bit(dtype, use_dora):
    torch.manual_seed(1)
    base = nn.Linear(32, 24).to(dtype)
    original = base.weight.detach().clone()
    layer = LoraLinear(base)
    layer.add_adapter("default", r=4, lora_alpha=8, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    layer.merge()
    assert not torch.equal(base.weight, original)
    layer.unmerge()
    assert torch.equal(base.weight, original)
    assert not layer.merged


def test_merge_over_fp32_keeps_no_copy_and_unmerges_by_arithmetic():
    layer = hand_set_linear()
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.merge_records[0].original is None
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
