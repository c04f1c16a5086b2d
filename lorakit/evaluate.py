"""Scoring a base model and its adapters side by side on one data set.

Two kinds of numbers per model: the loss (and perplexity) of the reference answers under teacher forcing, and
scores of greedy answers to the prompts: exact match, contains-the-answer, ROUGE-L F1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .adapters import use_adapter
from .chat import stop_token_ids
from .data import get_template, pad_collate
from .generation import Sampling, generate
from .lora import LoraModel
from .metrics import contains, exact_match, rouge_l
from .train.loss import causal_lm_loss, check_chunked_route


@dataclass
class EvalItem:
    """One question: the conversation up to the answer, the reference answer, and the facts it must contain."""

    prompt: list[dict]
    reference: str
    answers: list[str] = field(default_factory=list)


def items_from_records(records: list[dict]) -> list[EvalItem]:
    """Records with "messages" (last one the assistant's reference); an "answer" key lists the required facts."""
    items = []
    for record in records:
        messages = record["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            continue
        answer = record.get("answer")
        answers = [answer] if isinstance(answer, str) else list(answer or [])
        items.append(EvalItem(messages[:-1], messages[-1]["content"], answers or [messages[-1]["content"]]))
    return items


def generate_answers(model, tokenizer, items: list[EvalItem], max_new_tokens: int = 64, batch_size: int = 16,
                     render=None, stop_ids: set[int] | None = None) -> list[str]:
    """Greedy answers, batched by prompt length so little compute goes to padding; `render(messages) -> ids` is
    the prompt (default: the tokenizer's own template through `data.encode.prompt_ids`, as training tokenises)."""
    render = render or get_template(None, tokenizer).prompt_ids
    prompts = [render(item.prompt) for item in items]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop = stop_ids or stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop)
    answers: list[str] = [""] * len(items)
    sampling = Sampling(max_new_tokens=max_new_tokens)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        outs = generate(model, [prompts[i] for i in chunk], sampling, stop, pad)
        for i, ids in zip(chunk, outs):
            answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return answers


@torch.no_grad()
def reference_loss(model, examples: list[dict], batch_size: int = 8, pad_id: int = 0) -> tuple[float, float]:
    """Mean cross-entropy of the labelled tokens (labels != -100) and its perplexity, by the trainer's own loss
    (`train.loss.causal_lm_loss`: the head on label positions only, in chunks, so the (batch, tokens, vocab)
    logits never exist), batched as the trainer's evaluation batches: equal to its eval loss on these examples."""
    inner = model.get_base_model() if isinstance(model, LoraModel) else model  # LoRA layers sit inside it
    device = next(inner.parameters()).device
    ordered = sorted(examples, key=lambda e: len(e["input_ids"]))  # similar lengths together: less padding
    batches = [pad_collate(ordered[i:i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]
    chunked = not batches or check_chunked_route(inner, batches[0]) is None
    total, count = 0.0, 0
    for batch in batches:
        part, n = causal_lm_loss(inner, {k: v.to(device) for k, v in batch.items()}, chunked=chunked)
        total, count = total + float(part), count + n
    loss = total / max(count, 1)
    return loss, math.exp(min(loss, 50.0))


def score(answers: list[str], items: list[EvalItem]) -> dict[str, float]:
    n = max(len(items), 1)
    return {
        "exact_match": sum(exact_match(a, it.reference) for a, it in zip(answers, items)) / n,
        "contains": sum(contains(a, it.answers) for a, it in zip(answers, items)) / n,
        "rouge_l": sum(rouge_l(a, it.reference) for a, it in zip(answers, items)) / n,
    }


def evaluate_models(model, tokenizer, names: list[str], items: list[EvalItem], examples: list[dict] | None = None,
                    max_new_tokens: int = 64, batch_size: int = 16, render=None, stop_ids: set[int] | None = None,
                    on_model: Callable[[str], None] | None = None) -> list[dict]:
    """One result row per adapter name ("__base__" = no adapter): scores, loss, and the answers themselves.

    `render(messages) -> ids` is the chat template (default: the tokenizer's own); `stop_ids` end an answer
    (default: eos and the usual end-of-turn tokens); `on_model(name)` is called before each model is scored.
    """
    rows = []
    for name in names:
        if on_model is not None:
            on_model(name)
        start = time.perf_counter()
        with use_adapter(model, name):
            answers = generate_answers(model, tokenizer, items, max_new_tokens, batch_size, render, stop_ids)
            row = {"model": name, "n": len(items), **score(answers, items)}
            if examples:
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
                row["loss"], row["perplexity"] = reference_loss(model, examples, batch_size, pad)
        row["seconds"] = round(time.perf_counter() - start, 2)
        row["answers"] = answers
        rows.append(row)
    return rows


def cell(value) -> str:
    """A table cell: floats to 3 decimals, an interval (low, high) as "low-high"."""
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[0]:.3f}-{value[1]:.3f}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """A markdown table of the scores, one row per model."""
    cols = ["model", "n", "contains", "exact_match", "rouge_l", "loss", "perplexity", "retention", "retention_95",
            "kl"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [cell(r.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
