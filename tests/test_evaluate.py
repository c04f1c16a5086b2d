"""Evaluation numbers on hand-made cases."""

import math

import pytest
import torch
import torch.nn.functional as F
from cli_setup import save_tiny_model, write_facts
from conftest import make_model
from torch import nn
from torch.overrides import TorchFunctionMode

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
from lorakit.train import load_config, train


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


class VocabRows(TorchFunctionMode):
    """Records the rows of every tensor a torch function returns whose last dimension is the vocabulary."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[-1] == self.vocab:
            self.rows.append(out.numel() // self.vocab)
        return out


def test_reference_loss_never_builds_the_whole_logits():
    """eval's loss runs the head on label positions only, in chunks: no (batch, tokens, vocab) tensor exists."""
    vocab = 320
    lm = get_lora_model(make_model("llama", vocab=vocab), LoraConfig(target_modules="all-linear"))
    examples = [{"input_ids": [3 + i % 90 for i in range(n)], "labels": [-100] * (n - 3) + [5, 6, 7]}
                for n in (300, 280, 290)]
    record = VocabRows(vocab)
    with record:
        loss, _ = reference_loss(lm, examples, batch_size=3)
    # one batch of 3 x 300 positions, 9 of them labelled; the only wider tensors are those of the trainer's
    # one-time route check (check_chunked_route), capped at 256 positions of one row
    assert record.rows and max(record.rows) <= 256 < 3 * 300
    assert sum(rows <= 9 for rows in record.rows) >= 2 and sum(rows > 9 for rows in record.rows) <= 3
    ids, labels = torch.tensor([e["input_ids"][:280] for e in examples]), torch.tensor(examples[1]["labels"])
    with torch.no_grad():
        logits = lm(ids[1:2]).logits[0, :-1].float()  # (T-1, V): the plain computation, for the value
    expected = F.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum")
    one, _ = reference_loss(lm, [examples[1]])
    assert one == pytest.approx(float(expected) / 3, rel=1e-5) and math.isfinite(loss)


def test_reference_loss_equals_the_trainers_eval_loss(tmp_path):
    """The same examples give the same number through `lorakit eval` and through the trainer's evaluation."""
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_facts(tmp_path / "facts.jsonl")
    config, _ = load_config(None, [f"model_name_or_path={model_dir}", f"dataset={data}", "val_size=2",
                                   f"output_dir={tmp_path / 'out'}", "max_steps=2", "learning_rate=1e-2",
                                   "per_device_train_batch_size=1", "per_device_eval_batch_size=2",
                                   "logging_steps=100", "save_strategy=epoch"])
    seen = []

    def compare(trainer):
        pad = trainer.tokenizer.pad_token_id
        seen.append((trainer.evaluate()["eval_loss"], reference_loss(trainer.model, trainer.data.val, 2, pad)[0]))

    train(config, on_step=compare)
    assert len(seen) == 2 and seen[0][0] != seen[1][0]  # the adapter changed between the two steps
    for trainer_loss, eval_loss in seen:
        assert eval_loss == pytest.approx(trainer_loss, rel=1e-6)
