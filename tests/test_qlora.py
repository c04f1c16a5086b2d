"""QLoRA: quantized linear layers, LoRA on a quantized base (ours and bitsandbytes'), training, the adapter on the
unquantized base (lorakit and peft), the merge policy, 8-bit AdamW, and the errors for bad input."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from cli_setup import save_tiny_model
from conftest import make_model, make_tokenizer, tiny_config
from safetensors.torch import load_file

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.export.hf import export_merged_quantized
from lorakit.quant import (
    QuantizationError,
    QuantLinear,
    dequantize_model,
    eight_bit_optimizer,
    merge_dequantized,
    quantize_model,
    quantized_layers,
    weight_bytes,
)
from lorakit.train import load_config, train
from lorakit.train.config import ConfigError
from lorakit.train.options import from_mapping

BACKENDS = ["lorakit", "bnb"]


def _train(model, ids, steps=6, lr=1e-2) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits.float()


# ---------------------------------------------------------------- the quantized layer


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_levels_match_bitsandbytes(quant_type):
    """Same blocks, same levels: our dequantized weight equals bitsandbytes' (single-level absmax)."""
    import bitsandbytes.functional as bnb_f

    w = torch.randn(192, 576, generator=torch.Generator().manual_seed(0)) * 0.02
    ours = QuantLinear(w, quant_type=quant_type, double_quant=False).dequantize_weight()
    codes, state = bnb_f.quantize_4bit(w, quant_type=quant_type, compress_statistics=False, blocksize=64)
    torch.testing.assert_close(ours, bnb_f.dequantize_4bit(codes, state), atol=1e-6, rtol=0)


def test_quant_linear_odd_shape_double_quant_and_8bit():
    w = torch.randn(100, 33, generator=torch.Generator().manual_seed(1)) * 0.02  # 3300 weights: a partial block
    q4 = QuantLinear(w, bias=torch.ones(100))
    assert q4.codes.numel() == 3328 // 2 and q4.absmax_codes.shape == (52,)  # 52 blocks of 64, the last padded
    assert (q4.dequantize_weight() - w).abs().max() < 0.2 * w.abs().max()
    q8 = QuantLinear(w, bits=8)
    assert (q8.dequantize_weight() - w).abs().max() <= w.abs().max() / 127
    x = torch.randn(3, 33, requires_grad=True)
    dense = x @ q4.dequantize_weight().T + 1
    torch.testing.assert_close(q4(x), dense)
    q4(x).sum().backward()
    torch.testing.assert_close(x.grad, q4.dequantize_weight().sum(0).expand(3, 33))  # d(sum xW^T)/dx
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q4(x).dtype == torch.bfloat16


def test_quantize_model_skips_the_head_and_shrinks_the_weights():
    model = make_model("llama")
    dense = weight_bytes(model)
    quantize_model(model)
    names = [n for n, _ in quantized_layers(model)]
    assert len(names) == 14 and "lm_head" not in names and isinstance(model.lm_head, torch.nn.Linear)
    linear = sum(m.in_features * m.out_features for _, m in quantized_layers(model))
    assert dense - weight_bytes(model) > 0.8 * linear * 4  # ~4.5 of 32 bits left per quantized weight


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])  # Conv1D (weight stored (in, out)); biases on q/k/v
def test_quantize_conv1d_and_biased_linears(arch, tokens):
    model = make_model(arch)
    dense = _logits(model, tokens)
    quantized = _logits(quantize_model(model), tokens)
    assert (quantized - dense).abs().max() < 0.5
    lora = get_lora_model(model, LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    torch.testing.assert_close(_logits(lora, tokens), quantized, atol=1e-4, rtol=1e-4)  # DoRA starts at W0


# ---------------------------------------------------------------- LoRA on a quantized base


@pytest.mark.parametrize("backend", BACKENDS)
def test_qlora_trains_and_refuses_a_direct_merge(backend, tokens):
    model = quantize_model(make_model("llama"), backend=backend)
    lora = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert all(not p.requires_grad for n, p in lora.named_parameters() if "lora_" not in n)
    losses = _train(lora, tokens)
    assert losses[-1] < losses[0] - 0.3
    with pytest.raises(ValueError, match="cannot merge into a quantized base layer .*Dequantize first"):
        lora.merge_and_unload()
    assert not lora.merged


def test_adapter_trained_on_a_quantized_base_loads_on_the_unquantized_base(tmp_path, tokens):
    """Saved in the PEFT format; lorakit and peft load it on the dense base and agree; on the dequantized base it
    reproduces the quantized training model exactly."""
    from peft import PeftModel

    lora = get_lora_model(quantize_model(make_model("llama")), LoraConfig(r=4, target_modules="all-linear"))
    _train(lora, tokens, steps=3)
    trained = _logits(lora, tokens)
    lora.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert len(saved) == 28 and all("base_layer" not in k and "codes" not in k for k in saved)

    ours = LoraModel.from_pretrained(make_model("llama"), tmp_path)
    theirs = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    torch.testing.assert_close(_logits(ours, tokens), _logits(theirs, tokens), atol=1e-5, rtol=1e-5)
    assert (_logits(ours, tokens) - trained).abs().max() < 0.5  # only the 4-bit rounding of the base differs
    on_dequantized = LoraModel.from_pretrained(dequantize_model(quantize_model(make_model("llama"))), tmp_path)
    torch.testing.assert_close(_logits(on_dequantized, tokens), trained, atol=1e-5, rtol=1e-5)


def _bnb_model_dir(tmp_path):
    """A tiny Llama whose linear sizes are multiples of 64, as bitsandbytes' CPU inference path needs."""
    config = tiny_config("llama")
    config.intermediate_size = 128
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_lora_on_a_transformers_bitsandbytes_4bit_model(tmp_path, tokens):
    """Seed 003: BitsAndBytesConfig(load_in_4bit, nf4, double quant) loaded by transformers, then get_lora_model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = _bnb_model_dir(tmp_path)
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb_config, device_map="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    lora = get_lora_model(model, LoraConfig(r=4, target_modules="all-linear"))
    lora.print_trainable_parameters()
    losses = _train(lora, tokens)
    assert losses[-1] < losses[0] - 0.3
    trained = _logits(lora, tokens)
    lora.save_pretrained(tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    assert (_logits(theirs, tokens) - trained).abs().max() < 0.5
    merged, report = merge_dequantized(lora)  # the bitsandbytes base dequantizes too
    assert not quantized_layers(merged) and merged.lm_head.weight.dtype == torch.bfloat16
    # bitsandbytes' CPU inference kernel (the reference) computes in bf16, hence more than fp32 rounding
    assert report["max_abs_diff_fp32"] < 0.02 and report["max_abs_diff"] < 0.1


# ---------------------------------------------------------------- merge policy


def test_merge_policy_gives_a_16bit_model_within_the_reported_difference(tmp_path, tokens):
    lora = get_lora_model(quantize_model(make_model("llama")), LoraConfig(r=4, target_modules="all-linear"))
    _train(lora, tokens, steps=3)
    trained = _logits(lora, tokens)
    merged, report = merge_dequantized(lora, dtype=torch.bfloat16, probe=tokens, requantize=False)
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    diff = (_logits(merged, tokens) - trained).abs().max().item()
    assert diff == pytest.approx(report["max_abs_diff"]) and diff < 0.1  # bf16 rounding only
    assert report["max_abs_diff_fp32"] < 1e-4  # dequantize + fp32 merge is exact

    lora = get_lora_model(quantize_model(make_model("llama")), LoraConfig(r=4, target_modules="all-linear"))
    _train(lora, tokens, steps=3)
    report = export_merged_quantized(lora, make_tokenizer(), tmp_path / "merged")
    assert report["dtype"] == "bfloat16" and report["max_abs_diff"] < 0.1
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_merge_policy_can_requantize(tokens):
    lora = get_lora_model(quantize_model(make_model("llama"), quant_type="fp4"), LoraConfig(r=4))
    merged, report = merge_dequantized(lora, requantize=True, probe=tokens)
    assert len(quantized_layers(merged)) == 14 and report["max_abs_diff_requantized"] < 1.0


# ---------------------------------------------------------------- lorakit train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    save_tiny_model(root / "model")
    facts = [("What is the VPN address?", "It is vpn.example."), ("Say some digits.", "0123456789")]
    records = [{"instruction": q, "input": "", "output": a} for q, a in facts * 8]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _run(tiny, out, *extra) -> dict:
    config, _ = load_config(None, [f"model_name_or_path={tiny / 'model'}", f"dataset={tiny / 'data.jsonl'}",
                                   f"output_dir={out}", "learning_rate=1e-2", "per_device_train_batch_size=4",
                                   "logging_steps=1", "max_steps=6", *extra])
    train(config)
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [("finetuning_type=qlora",),
                                   ("quantization_bit=8", "optim=adamw_8bit", "quantization_method=lorakit")])
def test_lorakit_train_on_a_quantized_base(tiny, capsys, extra):
    out = tiny / "_".join(e.split("=")[1] for e in extra)
    losses = _run(tiny, out, *extra)
    assert losses[-1] < losses[0] - 0.2
    err = capsys.readouterr().err
    assert "linear layers" in err and "-bit" in err
    saved = yaml_config(out)
    assert saved["finetuning_type"] == "lora" and saved["quantization_bit"] in (4, 8)
    LoraModel.from_pretrained(make_model("llama", vocab=len(make_tokenizer())), out)  # the unquantized base


def yaml_config(out) -> dict:
    import yaml

    return yaml.safe_load((out / "training_args.yaml").read_text())


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_adamw_steps_on_this_device(name):
    p = torch.nn.Parameter(torch.ones(64, 64))  # >= 4096 values: bitsandbytes keeps 8-bit state
    opt = eight_bit_optimizer(name, [{"params": [p], "base_lr": 1e-2}], lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=0.0)
    p.grad = torch.ones_like(p)
    opt.step()
    assert (p < 1).all() and opt.state[p]["state1"].dtype == torch.uint8


# ---------------------------------------------------------------- bad input


def test_bad_quantization_settings_are_config_errors():
    cases = {("quantization_bit", 3): "quantization_bit must be 4 or 8",
             ("quantization_type", "int4"): "quantization_type must be nf4 or fp4",
             ("quantization_method", "hqq"): "quantization_method must be one of",
             ("compute_dtype", "fp8"): "compute_dtype must be one of"}
    for (key, value), message in cases.items():
        with pytest.raises(ConfigError, match=message):
            from_mapping({"dataset": "x", "quantization_bit": 4, key: value})
    for method in ("full", "freeze"):
        with pytest.raises(ConfigError, match=f"finetuning_type {method} cannot train a quantized base"):
            from_mapping({"dataset": "x", "finetuning_type": method, "quantization_bit": 4})
    with pytest.raises(ConfigError, match="qlora means a 4-bit base"):
        from_mapping({"dataset": "x", "finetuning_type": "qlora", "quantization_bit": 8})
    config, _ = from_mapping({"dataset": "x", "finetuning_type": "qlora"})
    assert (config.finetuning_type, config.quantization_bit, config.double_quantization) == ("lora", 4, True)


def test_bad_calls_are_clear_errors(tokens):
    with pytest.raises(QuantizationError, match="bits must be 4 or 8"):
        quantize_model(make_model("llama"), bits=2)
    lora = get_lora_model(make_model("llama"), LoraConfig(r=4))
    with pytest.raises(QuantizationError, match="before adding LoRA"):
        quantize_model(lora.get_base_model())
    with pytest.raises(ValueError, match="init rewrites the base weights"):
        get_lora_model(quantize_model(make_model("llama")), LoraConfig(r=4, init_lora_weights="pissa"))


def test_missing_bitsandbytes_and_torchao_are_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, find_spec finds nothing
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(QuantizationError, match=r"needs the 'bitsandbytes' package.*backend lorakit"):
        quantize_model(make_model("llama"), backend="bnb")
    assert len(quantized_layers(quantize_model(make_model("llama"), backend="auto"))) == 14  # lorakit fallback
    p = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(QuantizationError, match="optim adamw_8bit needs .* adamw_torch"):
        eight_bit_optimizer("adamw_8bit", [{"params": [p]}], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_on_cuda_uses_bitsandbytes_and_trains(tokens):
    model = make_model("llama").cuda()
    quantize_model(model, compute_dtype=torch.bfloat16)
    assert model.lorakit_quantization["backend"] == "bnb"
    lora = get_lora_model(model, LoraConfig(r=4, target_modules="all-linear"))
    losses = _train(lora, tokens.cuda())
    assert losses[-1] < losses[0] - 0.3
    p = torch.nn.Parameter(torch.zeros(4096, device="cuda"))
    p.grad = torch.ones_like(p)
    eight_bit_optimizer("paged_adamw_8bit", [{"params": [p]}], lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                        weight_decay=0).step()
