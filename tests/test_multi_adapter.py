"""Several adapters on one model, and a mixed batch that routes each row to its own adapter."""

import peft
import pytest
import torch
from conftest import VOCAB, make_model

from lorakit import LoraConfig, LoraModel, get_lora_model

CONFIGS = {
    "a": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    "b": LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_rslora=True),
    "c": LoraConfig(r=2, lora_alpha=2, target_modules=["embed_tokens", "down_proj"], init_lora_weights=False,
                    modules_to_save=["lm_head"]),
}


@pytest.fixture
def three(tmp_path):
    """One model holding adapters a, b, c; each also saved to disk."""
    lm = None
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(10 + i)
        if lm is None:
            lm = get_lora_model(make_model("llama"), cfg, adapter_name=name)
        else:
            lm.add_adapter(name, cfg)
    lm.eval()
    return lm


def single(lm, name, tokens):
    with torch.no_grad():
        if name == "__base__":
            with lm.disable_adapter():
                return lm(tokens).logits
        lm.set_adapter(name)
        return lm(tokens).logits


def test_mixed_batch_rows_equal_single_adapter_runs(three):
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, VOCAB, (5, 9), generator=g)
    names = ["a", "__base__", "c", "b", "a"]
    with torch.no_grad():
        mixed = three(tokens, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], single(three, name, tokens[row:row + 1])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_one_token_rows_equal_single_runs(three, grad):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(3, VOCAB, (5, 1), generator=g)  # one token per row, as in a decoding step
    names = ["b", "a", "__base__", "a", "c"]
    with torch.set_grad_enabled(grad):
        mixed = three(tokens, adapter_names=names).logits
        again = three(tokens, adapter_names=names).logits  # the cached stacks and masks give the same rows
    torch.testing.assert_close(again, mixed, atol=0, rtol=0)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], single(three, name, tokens[row:row + 1])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [1, 6])
def test_rows_of_a_subset_of_the_adapters_multiply_only_their_own(three, length):
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(3, VOCAB, (4, length), generator=g)
    names = ["b", "__base__", "b", "a"]  # c is loaded but no row wants it; b's group has 2 rows, a's 1 (padded)
    with torch.no_grad():
        mixed = three(tokens, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], single(three, name, tokens[row:row + 1])[0], atol=1e-5, rtol=1e-5)


def test_groups_gather_each_adapters_rows_and_pad_with_the_zero_row():
    from lorakit.lora.mixed import Groups

    cpu = torch.device("cpu")
    groups = Groups.of([2, 0, 3, 2, 0, 2], 3, cpu)  # slot 3 = the base model: in no group
    assert groups.present.tolist() == [0, 2] and groups.size == 3 and groups.padded and not groups.identity
    assert groups.gather.tolist() == [1, 4, 6, 0, 3, 5]  # adapter 0: rows 1, 4 and the zero row (6); adapter 2: 0, 3, 5
    assert groups.source.tolist() == [3, 0, 2, 4, 1, 5]  # row 2 (the base) reads padding position 2
    assert Groups.of([3, 3], 3, cpu) is None
    even = Groups.of([1, 0, 0, 1], 2, cpu)
    assert not even.padded and even.gather.tolist() == [1, 2, 0, 3] and even.source.tolist() == [2, 0, 1, 3]
    with_base = Groups.of([0, 2, 0], 2, cpu)  # full groups and a base row: one padding position is added
    assert with_base.size == 3 and with_base.padded and with_base.source.tolist()[1] == 2
    one = Groups.of([1, 1, 1], 2, cpu)
    assert one.identity and one.size == 3 and not one.padded


def test_mixed_stacks_follow_weight_updates_between_calls(three):
    tokens = torch.randint(3, VOCAB, (2, 1), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        before = three(tokens, adapter_names=["a", "b"]).logits
        three.model.model.layers[0].mlp.up_proj.lora_B["a"].weight.mul_(5)  # (q_proj: no effect on one token)
        after = three(tokens, adapter_names=["a", "b"]).logits
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(after[0], single(three, "a", tokens[:1])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[1], before[1], atol=1e-6, rtol=1e-6)


def test_mixed_stacks_follow_new_storage_and_an_adapter_added_again(three):
    tokens = torch.randint(3, VOCAB, (2, 1), generator=torch.Generator().manual_seed(9))
    up = three.model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        three(tokens, adapter_names=["a", "b"])
        up.lora_B["a"].weight.data = up.lora_B["a"].weight.data * 3  # new storage, not an in-place write
        swapped = three(tokens, adapter_names=["a", "b"]).logits
        torch.testing.assert_close(swapped[0], single(three, "a", tokens[:1])[0], atol=1e-5, rtol=1e-5)
        three.delete_adapter("a")
        torch.manual_seed(99)
        three.add_adapter("a", CONFIGS["a"])  # the same name, new weights
        three.eval()
        again = three(tokens, adapter_names=["a", "b"]).logits
    torch.testing.assert_close(again[0], single(three, "a", tokens[:1])[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(again[0], swapped[0])


def test_mixed_generate_equals_single_generate(three):
    g = torch.Generator().manual_seed(6)
    prompts = torch.randint(3, VOCAB, (4, 6), generator=g)
    names = ["b", "a", "__base__", "c"]
    out = three.generate(prompts, adapter_names=names, max_new_tokens=5, do_sample=False)
    for row, name in enumerate(names):
        if name == "__base__":
            with three.disable_adapter():
                alone = three.generate(prompts[row:row + 1], max_new_tokens=5, do_sample=False)
        else:
            three.set_adapter(name)
            alone = three.generate(prompts[row:row + 1], max_new_tokens=5, do_sample=False)
        assert torch.equal(out[row], alone[0]), name


def test_mixed_batch_matches_peft(three, tmp_path):
    three.save_pretrained(tmp_path)
    three.set_adapter("a")
    theirs = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")  # (PEFT's mixed batch fails on modules_to_save: no "c")
    tokens = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    names = ["__base__", "a", "b"]
    with torch.no_grad():
        torch.testing.assert_close(three(tokens, adapter_names=names).logits,
                                   theirs(tokens, adapter_names=names).logits, atol=1e-5, rtol=1e-5)


def test_load_several_from_disk_and_switch(three, tmp_path, tokens):
    three.save_pretrained(tmp_path)
    lm = LoraModel.from_pretrained(make_model("llama"), tmp_path / "a", adapter_name="a")
    lm.load_adapter(tmp_path / "b", adapter_name="b")
    assert lm.active_adapter == "a"
    for name in ("a", "b"):
        torch.testing.assert_close(single(lm, name, tokens), single(three, name, tokens))


def test_mixed_batch_errors(three, tokens):
    with pytest.raises(ValueError, match="unknown adapter.*zzz"):
        three(tokens, adapter_names=["a", "zzz"])
    with pytest.raises(ValueError, match="3 entries but the batch has 2 rows"):
        three(tokens, adapter_names=["a", "b", "c"])
    three.set_adapter("a")
    three.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        three(tokens, adapter_names=["a", "b"])


@pytest.mark.parametrize("tokens_per_row", [7, 1], ids=["prompt", "decode"])
def test_dora_adapters_run_per_row_and_equal_single_runs(tokens_per_row):
    torch.manual_seed(0)
    lm = get_lora_model(make_model("qwen2"), LoraConfig(r=4, target_modules=["q_proj", "o_proj"], use_dora=True,
                                                        init_lora_weights=False), adapter_name="d")
    lm.add_adapter("p", LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    with torch.no_grad():
        for key, p in lm.named_parameters():
            if "lora_magnitude_vector" in key:
                p.mul_(1.3)
    lm.eval()
    tokens = torch.randint(3, VOCAB, (4, tokens_per_row), generator=torch.Generator().manual_seed(1))
    names = ["d", "p", "__base__", "d"]
    with torch.no_grad():
        routed = lm(tokens, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(routed[row], single(lm, name, tokens[row:row + 1])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens_per_row", [6, 1], ids=["prompt", "decode"])
def test_a_weighted_combination_per_row_equals_the_exact_cat_adapter(three, tokens_per_row):
    three.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="cat")
    tokens = torch.randint(3, VOCAB, (3, tokens_per_row), generator=torch.Generator().manual_seed(2))
    entries = [{"a": 0.7, "b": 0.3}, "b", {"a": 0.5}]
    with torch.no_grad():
        routed = three(tokens, adapter_names=entries).logits
        three.add_weighted_adapter(["a"], [0.5], "halved", combination_type="cat")
        torch.testing.assert_close(routed[0], single(three, "mix", tokens[:1])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(routed[1], single(three, "b", tokens[1:2])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(routed[2], single(three, "halved", tokens[2:])[0], atol=1e-5, rtol=1e-5)


def test_combinations_that_cannot_mix_are_refused_in_one_line(three, tokens):
    with pytest.raises(ValueError, match="includes 'c', an adapter with modules_to_save"):
        three(tokens, adapter_names=[{"a": 0.5, "c": 0.5}, "a"])
    with pytest.raises(ValueError, match=r"adapter_names\[1\]: a combination maps adapter names to finite numbers"):
        three(tokens, adapter_names=["a", {"b": float("nan")}])
    with pytest.raises(ValueError, match="unknown adapter.*zz"):
        three(tokens, adapter_names=["a", {"zz": 1.0}])
    dora = get_lora_model(make_model("llama"), LoraConfig(target_modules=["q_proj"], use_dora=True)).eval()
    with pytest.raises(ValueError, match="DoRA adapter"):
        dora(tokens, adapter_names=[{"default": 0.5}, "default"])


def test_mixed_batch_with_gradients_reaches_every_routed_adapter(three):
    """Eval mode, gradients on: the stacks are built inside the graph, so each row's adapter gets its gradient
    (lm_head of adapter c is a trainable copy: requires_grad on the output alone would prove nothing)."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(3, VOCAB, (3, 5), generator=g)
    for key, p in three.named_parameters():
        p.requires_grad_(".lora_" in key)
    names = ["a", "__base__", "b"]
    three(tokens, adapter_names=names).logits.square().sum().backward()
    layer = three.model.model.layers[0].self_attn.q_proj
    for name in ("a", "b"):
        grad = layer.lora_B[name].weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    # adapter c is not in the batch: nothing reaches it (it sits in the stacks with weight 0 for every row)
    grad_c = three.model.model.layers[0].mlp.down_proj.lora_B["c"].weight.grad
    assert grad_c is None or not grad_c.any()
    # the gradient equals the one of the same row run alone through its adapter
    three.zero_grad(set_to_none=True)
    three.set_adapter("b")
    for key, p in three.named_parameters():
        p.requires_grad_(".lora_" in key)
    three(tokens[2:3]).logits.square().sum().backward()
    alone = layer.lora_B["b"].weight.grad.clone()
    three.zero_grad(set_to_none=True)
    three(tokens, adapter_names=["__base__", "__base__", "b"]).logits[2:3].square().sum().backward()
    torch.testing.assert_close(layer.lora_B["b"].weight.grad, alone, rtol=1e-4, atol=1e-6)


def test_mixed_batch_refuses_training_mode(three, tokens):
    three.train()
    with pytest.raises(ValueError, match="adapter_names .* is for inference: call model.eval"):
        three(tokens, adapter_names=["a", "b"])


def test_mixed_batch_honours_disable_adapter(three):
    tokens = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with three.disable_adapter():
            routed = three(tokens, adapter_names=["a", "b", "c"]).logits
        base = single(three, "__base__", tokens)
    torch.testing.assert_close(routed, base, atol=0, rtol=0)


def test_flattened_input_is_refused_not_misrouted(three):
    layer = three.model.model.layers[0].mlp.down_proj  # adapters a and c
    x = torch.randn(2, 3, layer.in_features)
    with torch.no_grad():
        three(torch.randint(3, VOCAB, (2, 3)), adapter_names=["a", "c"])  # fine: one name per row
        from lorakit.lora import mixed

        routing = mixed.make_routing(["a", "c"], ("a", "b", "c"), x.device,
                                     three._stacks.get([layer], ("a", "b", "c")))
        with mixed.routed(routing):
            with pytest.raises(ValueError, match="2 entries but the batch has 6 rows"):
                layer(x.reshape(6, -1))  # (B*T, in): six rows, a multiple of the two names
            routed = layer(x)
        alone = []
        for row, name in enumerate(["a", "c"]):
            layer.active_adapter = name
            alone.append(layer(x[row:row + 1]))
    torch.testing.assert_close(routed, torch.cat(alone))


def test_generate_with_several_sequences_per_prompt_routes_each_copy(three):
    prompts = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(9))
    out = three.generate(prompts, adapter_names=["a", "b"], max_new_tokens=4, do_sample=False,
                         num_beams=2, num_return_sequences=2)
    for row, name in enumerate(["a", "b"]):
        three.set_adapter(name)
        alone = three.generate(prompts[row:row + 1], max_new_tokens=4, do_sample=False, num_beams=2,
                               num_return_sequences=2)
        assert torch.equal(out[2 * row:2 * row + 2], alone), name


def test_the_stacks_are_built_once_for_every_mix_of_adapters(three, monkeypatch):
    """A server's batches change their mix every step: the stacks hold every adapter, so they are not rebuilt."""
    from lorakit.lora import mixed

    builds = []
    real = mixed.build_stacks
    monkeypatch.setattr(mixed, "build_stacks", lambda layer, names: builds.append(names) or real(layer, names))
    tokens = torch.randint(3, VOCAB, (2, 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for names in (["a", "b"], ["c", "__base__"], [{"a": 0.5, "b": 0.5}, "b"], ["b", "b"]):
            three(tokens, adapter_names=names)
        first = len(builds)
        three(tokens, adapter_names=["a", "c"])
    assert first == len(builds) == len(three._layer_list())  # one build per layer, for all five calls
    assert set(builds) == {("a", "b", "c")}
