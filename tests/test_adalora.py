"""AdaLoRA: SVD-form adapters whose ranks are allocated during training; PEFT as the oracle for masks and files."""

import copy
import json

import peft
import pytest
import torch
from conftest import VOCAB, make_model

from lorakit import AdaLoraConfig, LoraModel, get_lora_model
from lorakit.lora import RankAllocator, orthogonal_penalty

SCHEDULE = dict(init_r=6, target_r=2, total_step=8, tinit=1, tfinal=2, deltaT=1, lora_alpha=8,
                target_modules=["q_proj", "v_proj", "down_proj"])


def _tokens(seed=0):
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def _pair():
    """PEFT's AdaLoRA model and lorakit's, on the same base, starting from PEFT's random A, B (E = 0 in both)."""
    base = make_model("llama")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(task_type="CAUSAL_LM", **SCHEDULE))
    ours = get_lora_model(base, AdaLoraConfig(**SCHEDULE))
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for key, layer in ours.model.named_modules():
            if "default" in getattr(layer, "lora_E", {}):
                for part in ("lora_A", "lora_B"):
                    getattr(layer, part)["default"].weight.copy_(params[f"base_model.model.{key}.{part}.default"])
    return theirs, ours


def _train_peft(model, steps):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for step in range(steps):
        tokens = _tokens(step)
        model(tokens, labels=tokens).loss.backward()  # PEFT's forward adds the orthogonality penalty itself
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()


def _train_ours(lm, steps):
    config = lm.peft_config["default"]
    allocator = RankAllocator(lm.model, config, "default")
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=2e-2)
    lm.train()
    for step in range(steps):
        tokens = _tokens(step)
        loss = lm(tokens, labels=tokens).loss + config.orth_reg_weight * orthogonal_penalty(lm.model, "default")
        loss.backward()
        opt.step()
        allocator.step(step)
        opt.zero_grad()
    return allocator


def _logits(model, tokens):
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def test_training_allocates_the_same_ranks_as_peft_with_the_same_logits():
    theirs, ours = _pair()
    _train_peft(theirs, SCHEDULE["total_step"])
    _train_ours(ours, SCHEDULE["total_step"])
    their_pattern = {k.replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    our_pattern = ours.peft_config["default"].rank_pattern
    assert our_pattern == their_pattern
    assert sum(map(sum, our_pattern.values())) == SCHEDULE["target_r"] * len(our_pattern)  # the final budget
    tokens = _tokens(99)
    torch.testing.assert_close(_logits(ours, tokens), _logits(theirs, tokens), atol=1e-4, rtol=1e-4)


def test_files_both_ways_with_the_same_logits(tmp_path):
    theirs, ours = _pair()
    _train_peft(theirs, SCHEDULE["total_step"])
    _train_ours(ours, SCHEDULE["total_step"])
    tokens = _tokens(7)
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"] == ours.peft_config["default"].rank_pattern
    peft_loaded = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "ours")
    torch.testing.assert_close(_logits(peft_loaded, tokens), _logits(ours, tokens), atol=1e-5, rtol=1e-5)
    theirs.save_pretrained(tmp_path / "peft")
    ours_loaded = LoraModel.from_pretrained(make_model("llama"), tmp_path / "peft")
    torch.testing.assert_close(_logits(ours_loaded, tokens), _logits(theirs, tokens), atol=1e-5, rtol=1e-5)
    # the loaded layers hold only the kept triplets; merging gives the same model
    layer = ours_loaded.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.shape[0] == sum(
        ours_loaded.peft_config["default"].rank_pattern["model.layers.0.self_attn.q_proj.lora_E"])
    expected = _logits(ours_loaded, tokens)
    merged = ours_loaded.merge_and_unload()
    torch.testing.assert_close(_logits(merged, tokens), expected, atol=1e-5, rtol=1e-5)


def test_a_fresh_adalora_adapter_leaves_the_model_unchanged_and_routes_per_row():
    model = make_model("llama")
    tokens = _tokens(3)
    before = _logits(model, tokens)
    lm = get_lora_model(model, AdaLoraConfig(**SCHEDULE))
    torch.testing.assert_close(_logits(lm, tokens), before)
    with torch.no_grad():
        for key, p in lm.named_parameters():
            if "lora_E" in key:
                p.normal_()
    lm.add_adapter("other", AdaLoraConfig(**{**SCHEDULE, "init_r": 3}))
    lm.eval()
    with torch.no_grad():
        routed = lm(tokens, adapter_names=["default", "__base__"]).logits
        lm.set_adapter("default")
        torch.testing.assert_close(routed[0], lm(tokens[:1]).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(routed[1], before[1], atol=1e-5, rtol=1e-5)


def test_the_budget_schedule_is_the_papers_cubic():
    lm = get_lora_model(make_model("llama"), AdaLoraConfig(**{**SCHEDULE, "total_step": 20, "tinit": 2,
                                                                "tfinal": 4}))
    allocator = RankAllocator(lm.model, lm.peft_config["default"], "default")
    layers = 6  # q, v, down in 2 layers
    assert allocator.budget(2) == (6 * layers, False)
    assert allocator.budget(17)[0] == 2 * layers
    middle = allocator.budget(9)[0]
    assert middle == int((36 - 12) * (1 - 7 / 14) ** 3 + 12)


@pytest.mark.parametrize("bad, message", [
    ({"total_step": None}, "total_step must be a positive integer"),
    ({"tinit": 6, "tfinal": 2}, "tinit .* must be below total_step - tfinal"),
    ({"beta1": 1.5}, "beta1 must be in"),
    ({"use_dora": True}, "does not support DoRA"),
])
def test_bad_adalora_configs_are_one_line(bad, message):
    with pytest.raises(ValueError, match=message):
        AdaLoraConfig(**{**SCHEDULE, **bad})
