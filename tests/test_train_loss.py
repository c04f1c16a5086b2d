"""The chunked loss equals transformers' own loss and gradients; packing keeps examples apart."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_model

from lorakit import LoraConfig, get_lora_model
from lorakit.data import collate_packed, pack_examples, pad_collate
from lorakit.train.loss import causal_lm_loss, check_chunked_route, plain_route_reason


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 21), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100  # the prompt
    labels[2, 14:] = -100  # row 2 is padded from 14 on
    mask = torch.ones_like(ids)
    mask[2, 14:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _trainable(model, lora: bool, **lora_kwargs):
    if not lora:
        return model
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian", **lora_kwargs)
    return get_lora_model(model, config).get_base_model()


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "gpt2", "qwen2"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_chunked_loss_and_gradients_match_transformers(arch, lora):
    model = _trainable(make_model(arch), lora)  # eval mode: no dropout, so both routes see the same network
    batch = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    expected = model(**batch).loss
    expected_grads = torch.autograd.grad(expected, params)
    total, count = causal_lm_loss(model, batch, chunked=True, chunk_size=7)  # several chunks, a ragged last one
    grads = torch.autograd.grad(total / count, params)
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(total / count, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_wrapped_head_takes_the_checkpointed_chunks():
    """lm_head in modules_to_save is not a plain Linear: the per-chunk checkpointed route must match too."""
    model = _trainable(make_model("llama"), True, modules_to_save=["lm_head"])
    assert type(model.get_output_embeddings()) is not torch.nn.Linear
    batch = _batch(1)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = model(**batch).loss
    expected_grads = torch.autograd.grad(expected, params)
    total, count = causal_lm_loss(model, batch, chunked=True, chunk_size=5)
    for got, want in zip(torch.autograd.grad(total / count, params), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_plain_route_matches_too_and_softcapping_models_use_it():
    model = make_model("llama")
    batch = _batch(2)
    total, count = causal_lm_loss(model, batch, chunked=False)
    torch.testing.assert_close(total / count, model(**batch).loss)
    assert plain_route_reason(model) is None and check_chunked_route(model, batch) is None
    gemma = make_model("gemma2")
    assert "final_logit_softcapping" in plain_route_reason(gemma)


def test_packed_rows_give_the_loss_of_the_separate_examples():
    model = make_model("llama")
    model.config._attn_implementation = "sdpa"
    g = torch.Generator().manual_seed(3)
    examples = []
    for n in (9, 6, 12, 5):
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    rows = pack_examples(examples, max_len=16)
    assert len(rows) < len(examples)
    packed_sum, packed_n = causal_lm_loss(model, collate_packed(rows, pad_token_id=0))
    plain_sum, plain_n = causal_lm_loss(model, pad_collate(examples, pad_token_id=0))
    assert packed_n == plain_n
    torch.testing.assert_close(packed_sum, plain_sum, rtol=1e-5, atol=1e-5)


def test_batch_without_labels_gives_zero_and_a_valid_backward():
    model = _trainable(make_model("llama"), True)
    batch = _batch()
    batch["labels"][:] = -100
    total, count = causal_lm_loss(model, batch)
    total.backward()
    assert count == 0 and float(total.detach()) == 0.0
