"""LoRA on mixture-of-experts expert tensors (target_parameters), with PEFT as the oracle."""

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from lorakit import LoraConfig, LoraModel, get_lora_model

TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def moe_model(seed=0):
    config = Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                            num_experts_per_tok=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                            tie_word_embeddings=False)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def _tokens():
    return torch.randint(3, 96, (3, 8), generator=torch.Generator().manual_seed(4))


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _perturb(model):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_" in key:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("targets", [TARGETS, TARGETS[::-1], ["down_proj"], ["mlp.gate.weight", "experts.down_proj"]],
                         ids=["both", "reversed", "one", "router-2d"])
def test_lorakit_expert_adapter_loads_in_peft_with_the_same_logits(targets, tmp_path):
    tokens = _tokens()
    base = _logits(moe_model(), tokens)
    lm = get_lora_model(moe_model(), LoraConfig(r=2, target_modules=["q_proj"], target_parameters=targets))
    torch.testing.assert_close(_logits(lm, tokens), base)  # B = 0: unchanged at the start
    _perturb(lm)
    ours = _logits(lm, tokens)
    assert not torch.allclose(ours, base, atol=1e-3)
    lm.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(moe_model(), tmp_path)
    torch.testing.assert_close(_logits(theirs, tokens), ours, atol=1e-5, rtol=1e-5)


def test_peft_expert_adapter_loads_in_lorakit_with_the_same_logits(tmp_path):
    tokens = _tokens()
    theirs = peft.get_peft_model(moe_model(), peft.LoraConfig(r=2, target_modules=[], target_parameters=TARGETS))
    _perturb(theirs)
    expected = _logits(theirs, tokens)
    theirs.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(moe_model(), tmp_path)
    torch.testing.assert_close(_logits(ours, tokens), expected, atol=1e-5, rtol=1e-5)


def test_each_expert_gets_its_own_update_and_merge_is_exact():
    lm = get_lora_model(moe_model(), LoraConfig(r=2, target_modules=[], target_parameters=TARGETS))
    _perturb(lm)
    experts = lm.model.model.layers[0].mlp.experts
    delta = experts.param_delta("default", "gate_up_proj")  # (E, 2I, H)
    a = experts.lora_A["default"]["gate_up_proj"].weight  # (E*r, H)
    b = experts.lora_B["default"]["gate_up_proj"].weight  # (2I, r*E)
    for e in range(4):  # expert e: B[:, e::E] @ A[e*r:(e+1)*r]
        torch.testing.assert_close(delta[e], b[:, e::4] @ a[2 * e:2 * e + 2] * experts.scaling["default"])
    tokens = _tokens()
    expected = _logits(lm, tokens)
    merged = lm.merge_and_unload()
    assert type(merged.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    torch.testing.assert_close(_logits(merged, tokens), expected, atol=1e-5, rtol=1e-5)


def test_unsupported_combinations_are_refused_in_one_line():
    with pytest.raises(ValueError, match="matched no parameter"):
        get_lora_model(moe_model(), LoraConfig(r=2, target_modules=[], target_parameters=["experts.nope"]))
    with pytest.raises(ValueError, match="no lora_dropout, no DoRA"):
        get_lora_model(moe_model(), LoraConfig(r=2, target_modules=[], target_parameters=TARGETS, lora_dropout=0.1))
    lm = get_lora_model(moe_model(), LoraConfig(r=2, target_modules=["q_proj"], target_parameters=TARGETS))
    with pytest.raises(ValueError, match="per-row adapters do not cover it"):
        lm(_tokens(), adapter_names=["default", "__base__", "default"])


def test_all_linear_on_an_moe_model_covers_attention_and_says_what_it_leaves():
    from lorakit.lora.inject import uncovered_weights

    lm = get_lora_model(moe_model(), LoraConfig(r=2, target_modules="all-linear"))
    wrapped = {k.rsplit(".", 1)[-1] for k, m in lm.model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj"}  # the router and experts are not nn.Linear
    assert uncovered_weights(lm.model) == {"experts.gate_up_proj": 2, "experts.down_proj": 2, "gate.weight": 2}
    with_experts = get_lora_model(moe_model(), LoraConfig(r=2, target_modules="all-linear",
                                                          target_parameters=TARGETS + ["mlp.gate.weight"]))
    assert uncovered_weights(with_experts.model) == {}
    down_only = get_lora_model(moe_model(), LoraConfig(r=2, target_modules=[], target_parameters=["down_proj"]))
    assert uncovered_weights(down_only.model) == {"experts.gate_up_proj": 2, "gate.weight": 2}
