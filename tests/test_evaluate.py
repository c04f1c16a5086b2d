"""Evaluation numbers on hand-made cases."""

import math

import pytest
import torch
from conftest import make_model
from torch import nn

from lorakit import LoraConfig, get_lora_model
from lorakit.evaluate import (
    EvalItem,
    evaluate_models,
    format_table,
    generate_answers,
    items_from_records,
    reference_loss,
    score,
)


class Uniform(nn.Module):
    """Every token equally likely: the loss of any label is exactly log(V)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **_):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab) + self.w})()


def test_reference_loss_of_a_uniform_model_is_log_vocab():
    examples = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}, {"input_ids": [5, 6], "labels": [-100, 6]}]
    loss, ppl = reference_loss(Uniform(50), examples, batch_size=2)
    assert loss == pytest.approx(math.log(50))
    assert ppl == pytest.approx(50)


def test_scores_on_hand_made_answers():
    items = [EvalItem([], "The code is 4410.", ["4410"]), EvalItem([], "Ask Ingrid Solvane.", ["Ingrid Solvane"])]
    s = score(["the code is 4410", "Ask Bob."], items)
    assert s["exact_match"] == 0.5 and s["contains"] == 0.5
    assert 0.5 < s["rouge_l"] < 1


def test_items_from_records_use_answer_key():
    recs = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "It is 42 days."}],
             "answer": "42 days"},
            {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "r2"}]}]
    items = items_from_records(recs)
    assert items[0].answers == ["42 days"] and items[1].answers == ["r2"] and items[0].prompt[0]["content"] == "q"


def test_side_by_side_rows_and_batching_is_invisible(tokenizer):
    lm = get_lora_model(make_model("llama", vocab=320), LoraConfig(target_modules="all-linear",
                                                                   init_lora_weights=False), adapter_name="kb")
    items = [EvalItem([{"role": "user", "content": q}], "ref", ["ref"]) for q in ("hi", "what is the vpn", "x y z")]
    rows = evaluate_models(lm, tokenizer, ["__base__", "kb"], items, max_new_tokens=4, batch_size=2)
    assert [r["model"] for r in rows] == ["__base__", "kb"]
    one_by_one = generate_answers(lm, tokenizer, items, max_new_tokens=4, batch_size=1)
    assert rows[1]["answers"] == one_by_one
    table = format_table(rows)
    assert table.splitlines()[0].startswith("| model | n | contains")
