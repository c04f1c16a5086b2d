"""Each training fast path gives the plain path's loss and gradients: bf16 autocast with the chunked head,
the frozen base stored in bf16, and no dropout work at p = 0."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_model
from torch import nn

from lorakit import LoraConfig, get_lora_model
from lorakit.device import bf16_supported
from lorakit.train.loss import causal_lm_loss, head_cross_entropy
from lorakit.train.precision import store_frozen_base


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 19), generator=g)  # (B, T)
    labels = ids.clone()
    labels[:, :6] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _lora(arch: str = "llama", **kwargs):
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian", **kwargs)
    return get_lora_model(make_model(arch), config).get_base_model()


def _loss_and_grads(model, batch: dict, chunked: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, count = causal_lm_loss(model, batch, chunked=chunked, chunk_size=5)
    return total / count, list(torch.autograd.grad(total / count, params))


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "qwen2"])
def test_bf16_autocast_chunked_loss_matches_the_plain_route(arch):
    model = _lora(arch)
    batch = _batch()
    want, want_grads = _loss_and_grads(model, batch, chunked=False)
    got, grads = _loss_and_grads(model, batch, chunked=True)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2)  # bf16 matmuls: ~3 significant digits
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=5e-2, atol=5e-3)


def test_head_is_cast_once_under_autocast_and_matches_per_chunk_autocast():
    torch.manual_seed(0)
    head = nn.Linear(16, 40, bias=True)
    rows = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 40, (11,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head_cross_entropy(rows, targets, head, chunk_size=4)
        want = nn.functional.cross_entropy(head(rows).float(), targets, reduction="sum")
    g_got, = torch.autograd.grad(got, rows)
    g_want, = torch.autograd.grad(want, rows)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(g_got, g_want, rtol=2e-2, atol=2e-3)


def test_frozen_base_in_bf16_gives_the_same_autocast_loss_and_gradients():
    model = _lora("qwen2")  # q/k/v carry biases: they are cast too
    batch = _batch(1)
    want, want_grads = _loss_and_grads(model, batch, chunked=True)
    stored = store_frozen_base(model, torch.bfloat16)
    assert stored > 0
    base = model.model.layers[0].self_attn.q_proj.base_layer
    assert base.weight.dtype == torch.bfloat16 and base.bias.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32  # not a LoRA base: untouched
    got, grads = _loss_and_grads(model, batch, chunked=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # autocast cast these weights anyway
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_frozen_base_keeps_fp32_under_dora():
    model = _lora(use_dora=True)
    assert store_frozen_base(model, torch.bfloat16) == 0
    assert model.model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.float32


def test_no_dropout_work_at_p0():
    model = _lora(lora_dropout=0.0)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.lora_dropout["default"], nn.Identity)
    model.train()
    state = torch.get_rng_state()
    causal_lm_loss(model, _batch())
    assert torch.equal(torch.get_rng_state(), state)  # no random mask was drawn


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="no native bf16 on this CPU")
def test_bf16_training_run_uses_the_bf16_base(tmp_path):
    model = _lora()
    store_frozen_base(model, torch.bfloat16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total, count = causal_lm_loss(model, _batch())
        (total / count).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(total.detach() / count))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_lora_linear_fast_forward_matches_the_formula(autocast):
    torch.manual_seed(0)
    model = _lora("qwen2")
    layer = model.model.layers[0].self_attn.q_proj  # has a bias
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        got = layer(x)
        want = layer.base_layer(x) + ((x @ a.T) @ b.T * layer.scaling["default"]).to(got.dtype)
    assert got.dtype == want.dtype
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(got, want, **tol)
    grads = torch.autograd.grad(got.float().sum(), (x, a, b))
    want_grads = torch.autograd.grad(want.float().sum(), (x, a, b))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=5e-2 if autocast else 1e-4, atol=5e-2 if autocast else 1e-5)


def test_no_grad_inference_path_matches_the_formula_and_follows_changes():
    torch.manual_seed(0)
    model = _lora("qwen2")
    layer = model.model.layers[0].self_attn.q_proj  # has a bias
    x = torch.randn(3, 1, layer.in_features)  # one decoding step
    b = layer.lora_B["default"].weight

    def formula() -> torch.Tensor:
        a, b = layer.lora_A[layer.active_adapter].weight, layer.lora_B[layer.active_adapter].weight
        return layer.base_layer(x) + (x @ a.T) @ b.T * layer.scaling[layer.active_adapter]

    with torch.no_grad():
        torch.testing.assert_close(layer(x), formula(), rtol=1e-5, atol=1e-6)
        b.mul_(3)  # in-place updates are seen (the path holds the parameters, not copies)
        torch.testing.assert_close(layer(x), formula(), rtol=1e-5, atol=1e-6)
        layer.add_adapter("other", r=2, lora_alpha=8, init="gaussian")
        layer.lora_B["other"].weight.normal_()
        torch.testing.assert_close(layer(x), formula(), rtol=1e-5, atol=1e-6)  # the new adapter is active
        layer.active_adapter = "default"
        torch.testing.assert_close(layer(x), formula(), rtol=1e-5, atol=1e-6)
        replaced = nn.Linear(layer.in_features, layer.out_features)  # a swapped base (e.g. dequantized)
        layer.base_layer = replaced
        torch.testing.assert_close(layer(x), formula(), rtol=1e-5, atol=1e-6)
        with torch.enable_grad():
            slow = layer(x)
        torch.testing.assert_close(layer(x), slow, rtol=1e-5, atol=1e-6)


def test_no_grad_inference_path_leaves_training_dropout_alone():
    torch.manual_seed(0)
    model = _lora("llama", lora_dropout=0.5)
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        x = torch.randn(4, 3, layer.in_features)
        layer.eval()
        assert torch.equal(layer(x), layer(x))  # eval: no dropout, deterministic
        layer.train()
        assert not torch.equal(layer(x), layer(x))  # train mode keeps dropping the adapter's input


# ---------------------------------------------------------------- attention per example in packed rows


def _sdpa_lora(arch: str):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, VOCAB), attn_implementation="sdpa")
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian")
    return get_lora_model(model, config).get_base_model()


def _packed_batch(lengths=(5, 9, 3, 12, 7), width: int = 24) -> tuple[dict, list[list[int]]]:
    from lorakit.data import collate_packed, pack_examples

    g = torch.Generator().manual_seed(3)
    examples = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return collate_packed(pack_examples(examples, width), 0), [e["input_ids"] for e in examples]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2's tiny config has grouped key/value heads
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_packed_attention_per_example_matches_the_masked_route(arch, autocast, monkeypatch):
    from lorakit.train import attention
    from lorakit.train.attention import NAME, use_cpu_attention

    model = _sdpa_lora(arch)
    batch, _ = _packed_batch()
    assert batch["position_ids"].shape[0] == 2 and (batch["position_ids"] == 0).sum() > 2  # really packed
    params = [p for p in model.parameters() if p.requires_grad]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)

    def run():
        with ctx:
            total, count = causal_lm_loss(model, batch, chunk_size=7)
        return total / count, torch.autograd.grad(total / count, params)

    want, want_grads = run()
    assert use_cpu_attention(model) and model.config._attn_implementation == NAME
    monkeypatch.setattr(attention, "_sdpa", lambda: pytest.fail("a packed batch took the masked route"))
    got, grads = run()
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(got, want, **tol)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, **({"rtol": 5e-2, "atol": 5e-3} if autocast else {"rtol": 1e-4, "atol": 1e-5}))


def test_packed_attention_keeps_examples_apart_and_leaves_other_calls_alone():
    from lorakit.train.attention import mark_packed, use_cpu_attention

    model = _sdpa_lora("llama").eval()
    batch, examples = _packed_batch()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        padded_before = model(input_ids=ids, attention_mask=mask).logits
        use_cpu_attention(model)
        mark_packed(batch["position_ids"])
        hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                             use_cache=False).last_hidden_state  # (2, 24, H)
        checked = 0
        for row in range(2):  # every example of each row equals that example run by itself
            starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
            for s, e in zip(starts, starts[1:]):
                ids_here = batch["input_ids"][row, s:e].tolist()
                if ids_here not in examples:
                    continue  # the padding tail
                alone = model.model(input_ids=torch.tensor([ids_here])).last_hidden_state[0]
                torch.testing.assert_close(hidden[row, s:e], alone, rtol=1e-5, atol=1e-5)
                checked += 1
        assert checked == len(examples)
        # outside a packed forward (padding mask, generation with a cache) it is transformers' SDPA unchanged
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, padded_before, rtol=0, atol=0)
        out = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 9)


def test_packed_attention_survives_gradient_checkpointing(monkeypatch):
    from lorakit.train import attention
    from lorakit.train.attention import use_cpu_attention

    model = _sdpa_lora("llama")
    batch, _ = _packed_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    total, count = causal_lm_loss(model, batch)
    want = torch.autograd.grad(total / count, params)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    use_cpu_attention(model)
    monkeypatch.setattr(attention, "_sdpa", lambda: pytest.fail("the recompute took the masked route"))
    total, count = causal_lm_loss(model, batch)  # the recompute in backward sees the same marked position ids
    for g, w in zip(torch.autograd.grad(total / count, params), want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_packed_attention_only_switches_sdpa_models():
    from lorakit.train.attention import use_cpu_attention

    eager = _lora("llama")  # built with eager attention
    assert not use_cpu_attention(eager)
    assert eager.config._attn_implementation == "eager"


def test_frozen_base_in_bf16_moves_the_rest_off_the_loaded_storage_and_keeps_ties():
    model = _lora("llama_tied")
    embed = model.model.embed_tokens.weight
    before = embed.data_ptr()
    assert model.lm_head.weight is embed
    store_frozen_base(model, torch.bfloat16)
    assert embed.data_ptr() != before and embed.dtype == torch.float32  # a copy of its own, same dtype
    assert model.lm_head.weight is embed  # still one tied parameter
    lora_a = model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert lora_a.requires_grad and lora_a.dtype == torch.float32


@pytest.mark.parametrize("multiple", [1, 4])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cpu_pieces_give_the_whole_micro_batch_gradient(packed, multiple, monkeypatch):
    def round_width(n):
        return -(-n // multiple) * multiple

    from types import SimpleNamespace

    from lorakit.data import pad_collate
    from lorakit.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "CPU_SPLIT_ABOVE", 30)
    monkeypatch.setattr(trainer_module, "CPU_PIECE_TOKENS", 20)
    model = _sdpa_lora("llama")
    if packed:
        batch, _ = _packed_batch(lengths=(5, 9, 3, 12, 7, 8, 6), width=12)
    else:
        g = torch.Generator().manual_seed(4)
        examples = [{"input_ids": (ids := torch.randint(3, VOCAB, (n,), generator=g).tolist()),
                     "labels": [-100] * 2 + ids[2:]} for n in (5, 11, 3, 8, 4)]
        batch = pad_collate(examples, 0, round_width=round_width)
    fake = SimpleNamespace(device=torch.device("cpu"), round_width=round_width if multiple > 1 else None)
    pieces = trainer_module.Trainer.pieces(fake, batch)
    assert len(pieces) > 1 and sum(p["input_ids"].shape[0] for p in pieces) == batch["input_ids"].shape[0]
    assert all(p["input_ids"].shape[1] % multiple == 0 for p in pieces)  # trimmed widths stay rounded
    params = [p for p in model.parameters() if p.requires_grad]
    whole, n = causal_lm_loss(model, batch)
    want = torch.autograd.grad(whole, params)
    total, count, got = 0.0, 0, [torch.zeros_like(p) for p in params]
    for piece in pieces:
        part, c = causal_lm_loss(model, piece)
        for acc, g in zip(got, torch.autograd.grad(part, params)):
            acc += g
        total, count = total + float(part), count + c
    assert count == n
    assert total == pytest.approx(float(whole), rel=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- few matmul shapes on a CPU in bf16


def test_packed_attention_runs_spans_in_fp32_with_autocast_off(monkeypatch):
    from lorakit.train.attention import use_cpu_attention

    model = _sdpa_lora("qwen2")  # grouped key/value heads
    use_cpu_attention(model)
    batch, _ = _packed_batch()
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    outputs = []
    model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, args, out: outputs.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = causal_lm_loss(model, batch)
    total.backward()
    # autocast would cast the spans back to bf16 (oneDNN then compiles kernels for every span length)
    assert seen and set(seen) == {(torch.float32, torch.float32, torch.float32, False)}
    assert outputs == [torch.bfloat16]  # what transformers' SDPA returns under autocast


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: grouped key/value heads
def test_short_padded_rows_attend_in_fp32_under_autocast_and_long_ones_in_bf16(arch, monkeypatch):
    from lorakit.data import pad_collate
    from lorakit.train import attention
    from lorakit.train.attention import NAME, use_cpu_attention

    model = _sdpa_lora(arch)
    g = torch.Generator().manual_seed(6)
    examples = [{"input_ids": (ids := torch.randint(3, VOCAB, (n,), generator=g).tolist()),
                 "labels": [-100] * 2 + ids[2:]} for n in (5, 11, 3, 9)]
    batch = pad_collate(examples, 0)  # right-padded: transformers builds a mask
    params = [p for p in model.parameters() if p.requires_grad]

    def run(dtype=torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            total, count = causal_lm_loss(model, batch)
        return total / count, torch.autograd.grad(total / count, params)

    fp32_loss, fp32_grads = run(None)  # the reference: no autocast at all
    bf16_loss, _ = run()  # transformers' SDPA under autocast: attention in bf16
    assert use_cpu_attention(model) and model.config._attn_implementation == NAME
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    loss, grads = run()
    assert seen and set(seen) == {(torch.float32, torch.float32, torch.float32, False)}
    # the same attention, rounded less: at least as close to the fp32 loss as bf16 attention is
    assert abs(float(loss - fp32_loss)) <= abs(float(bf16_loss - fp32_loss)) + 1e-3
    for got, want in zip(grads, fp32_grads):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-3)
    seen.clear()
    monkeypatch.setattr(attention, "FP32_UP_TO", 4)  # rows longer than this keep transformers' bf16 SDPA
    run()
    assert seen and all(autocast for *_, autocast in seen)  # autocast on: SDPA runs in bf16
    seen.clear()
    with torch.no_grad():  # without autocast nothing changes: fp32 in, transformers' SDPA
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert seen and all(q == torch.float32 for q, *_ in seen)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_padding_to_a_multiple_changes_neither_loss_nor_gradients(packed):
    from lorakit.data import collate_packed, pack_examples, pad_collate

    model = _sdpa_lora("llama")
    g = torch.Generator().manual_seed(5)
    examples = [{"input_ids": (ids := torch.randint(3, VOCAB, (n,), generator=g).tolist()),
                 "labels": [-100] * 2 + ids[2:]} for n in (5, 11, 3, 9)]
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for multiple in (None, 8):
        rule = (lambda n: -(-n // multiple) * multiple) if multiple else None
        if packed:
            batch = collate_packed(pack_examples(examples, 14), 0, round_width=rule)
        else:
            batch = pad_collate(examples, 0, round_width=rule)
        assert batch["input_ids"].shape[1] % (multiple or 1) == 0
        total, count = causal_lm_loss(model, batch)
        results.append((batch["input_ids"].shape[1], total, count, torch.autograd.grad(total, params)))
    (w0, t0, c0, g0), (w1, t1, c1, g1) = results
    assert w1 == 16 > w0 and c1 == c0
    torch.testing.assert_close(t1, t0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_head_cross_entropy_rounds_its_matmuls_and_gives_the_same_numbers(monkeypatch):
    from lorakit.train import loss as loss_module

    torch.manual_seed(0)
    head = nn.Linear(16, 40, bias=False)
    rows = torch.randn(21, 16, requires_grad=True)
    targets = torch.randint(0, 40, (21,))
    shapes, linear = [], torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, *a: shapes.append(x.shape[0]) or linear(x, *a))
    results = []
    for multiple in (1, 8):
        monkeypatch.setattr(loss_module, "shape_bucket", lambda device, dtype, m=multiple: lambda n: -(-n // m) * m)
        shapes.clear()
        total = head_cross_entropy(rows, targets, head, chunk_size=10)  # chunks of 10, 10, 1 rows
        results.append((total, *torch.autograd.grad(total, rows)))
        assert shapes == ([10, 10, 1] if multiple == 1 else [16, 16, 8])
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-7)


def test_shape_buckets_and_trainer_batches_on_a_cpu_in_bf16():
    from types import SimpleNamespace

    from lorakit.device import bucket_size, shape_bucket
    from lorakit.train.trainer import Trainer

    assert shape_bucket("cpu", torch.bfloat16) is bucket_size
    assert shape_bucket("cpu", torch.float32) is None and shape_bucket("cpu", None) is None
    assert shape_bucket("cuda", torch.bfloat16) is None
    assert [bucket_size(n) for n in (1, 16, 17, 36, 37, 300, 505, 512, 513)] == [1, 16, 18, 36, 40, 320, 512, 512, 576]
    sizes = {bucket_size(n) for n in range(1, 4097)}
    assert all(n <= bucket_size(n) <= n * 9 / 8 for n in range(1, 4097)) and len(sizes) < 120
    items = [{"input_ids": [5] * n, "labels": [5] * n, "position_ids": list(range(n))} for n in (70, 20)]
    for packed in (False, True):
        fake = SimpleNamespace(data=SimpleNamespace(items=items, packed=packed), pad_id=0, round_width=bucket_size,
                               device=torch.device("cpu"), teacher=None)
        batch, tokens, _ = Trainer.collate(fake, [0, 1])
        assert batch["input_ids"].shape[1] == 72 and tokens == 90


def test_projections_reading_one_input_share_one_autocast_copy():
    from lorakit.lora.fastpath import autocast_input

    model = _lora("llama")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    seen = {}
    for name, proj in [("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("gate", mlp.gate_proj),
                       ("up", mlp.up_proj)]:
        proj.lora_A["default"].register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0]))
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=batch["input_ids"])
    assert seen["q"].dtype == torch.bfloat16
    assert seen["q"] is seen["k"] is seen["v"] and seen["gate"] is seen["up"] and seen["q"] is not seen["gate"]
    # the cache follows the tensor: an in-place change or another tensor gets a fresh cast
    x = torch.randn(3, 4, requires_grad=True)
    y = x * 1.0
    first = autocast_input(y, torch.bfloat16)
    assert autocast_input(y, torch.bfloat16) is first and autocast_input(first, torch.bfloat16) is first
    with torch.no_grad():
        y.add_(1.0)
    again = autocast_input(y, torch.bfloat16)
    assert again is not first and torch.equal(again, y.detach().to(torch.bfloat16))
    assert autocast_input(y.clone(), torch.bfloat16) is not again
    with torch.inference_mode():
        z = torch.randn(2, 2)
        assert autocast_input(z, torch.bfloat16).dtype == torch.bfloat16  # inference tensors: no cache, no error
    (again.float().sum() + autocast_input(y, torch.bfloat16).float().sum()).backward()  # both uses reach x
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


def test_the_no_grad_fast_path_applies_only_where_the_formula_has_no_other_term():
    """fastpath invariant 1: grad off, plain nn.Linear base, no DoRA, no active dropout, one dtype, no autocast."""
    from lorakit.lora import fastpath

    base = nn.Linear(8, 4)
    a = torch.zeros(2, 8)
    x = torch.randn(3, 8)
    identity, dropout = nn.Identity(), nn.Dropout(0.1)
    with torch.no_grad():
        assert fastpath.applies(base, x, a, identity, variant=False)
        assert fastpath.applies(base, x, a, dropout.eval(), variant=False)
        assert not fastpath.applies(base, x, a, dropout.train(), variant=False)
        assert not fastpath.applies(base, x, a, identity, variant=True)
        assert not fastpath.applies(base, x.bfloat16(), a, identity, variant=False)
        assert not fastpath.applies(base.bfloat16(), x.bfloat16(), a, identity, variant=False)  # fp32 adapter
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fastpath.applies(base.float(), x, a, identity, variant=False)

        class Subclass(nn.Linear):
            pass

        assert not fastpath.applies(Subclass(8, 4), x, a, identity, variant=False)  # e.g. a quantized linear
    assert not fastpath.applies(base, x, a, identity, variant=False)  # gradients on
