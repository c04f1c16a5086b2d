"""One path from a conversation to prompt ids: chat, eval and training tokenise the same history the same way.

For every built-in template and for the tokenizer's own, over multi-turn conversations with and without a system
prompt (and replies that start with a space or a newline, where tokenising the whole rendered text at once would
merge across the piece boundary): the ids chat and eval feed the model before reply k are exactly the training
example's ids up to where reply k starts.
"""

from __future__ import annotations

import pytest
from conftest import make_model

import lorakit.chat
import lorakit.evaluate
from lorakit.chat import ChatSession
from lorakit.data import TEMPLATES, encode_records, get_template
from lorakit.data.encode import prompt_ids
from lorakit.evaluate import EvalItem, generate_answers
from lorakit.generation import Sampling

CONVERSATIONS = [
    [("user", "Hi"), ("assistant", "quick brown fox"), ("user", "And now?"), ("assistant", "0123")],
    [("system", "You are terse."), ("user", "What is the VPN address?"), ("assistant", " It is vpn.example."),
     ("user", "\nAnd who helps?"), ("assistant", "\nThe quick fox."), ("user", "Digits?"), ("assistant", "0 1 2")],
    [("system", "Answer in one line."), ("user", "  spaced  "), ("assistant", "ok"), ("user", "x"),
     ("assistant", "  two spaces")],
]


# a Vicuna-like Jinja template whose generation prompt ends in a space: rendered whole, "ASSISTANT: quick" tokenises
# as ..., ":", " quick"; training tokenises the prompt and the reply apart: ..., ":", " " and "quick"
SPACED = ("{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}\n{% elif m.role == 'user' %}USER: "
          "{{ m.content }}\n{% else %}ASSISTANT: {{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}ASSISTANT: {% endif %}")


@pytest.fixture(scope="module")
def spaced(tokenizer):
    clone = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>",
                                pad_token="<|endoftext|>")
    clone.chat_template = SPACED
    return clone


def messages(turns):
    return [{"role": role, "content": text} for role, text in turns]


def reply_starts(labels: list[int]) -> list[int]:
    """Positions where a run of label tokens begins: where each assistant reply starts."""
    return [i for i, x in enumerate(labels) if x != -100 and (i == 0 or labels[i - 1] == -100)]


def check_one_path(tokenizer, template):
    for turns in CONVERSATIONS:
        conversation = messages(turns)
        [example], _ = encode_records([{"messages": conversation}], tokenizer, template, cutoff_len=4096)
        ends = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
        starts = reply_starts(example["labels"])
        assert len(starts) == len(ends)
        for end, start in zip(ends, starts):
            assert prompt_ids(template, conversation[:end]) == example["input_ids"][:start], (template.name, end)
            assert template.prompt_ids(conversation[:end]) == example["input_ids"][:start]


@pytest.mark.parametrize("name", [None, *TEMPLATES])
def test_prompt_ids_are_the_training_ids_for_every_template(tokenizer, name):
    check_one_path(tokenizer, get_template(name, tokenizer))


def test_a_template_ending_in_a_space_is_one_path_too(spaced):
    check_one_path(spaced, get_template(None, spaced))
    conversation = messages(CONVERSATIONS[0])[:3]
    whole = spaced.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    whole = whole["input_ids"] if hasattr(whole, "keys") else whole
    assert list(whole) != prompt_ids(get_template(None, spaced), conversation)  # rendering it whole would differ


def test_chat_and_eval_feed_the_model_the_training_ids(spaced, monkeypatch):
    """ChatSession and eval's generate_answers, with their default (the tokenizer's own template), pass
    generate() exactly the training example's ids before the reply, earlier turns included."""
    fed = []

    def fake_generate(model, prompts, sampling, stop_ids, pad_id, **kwargs):
        fed.extend(prompts)
        return [[5] for _ in prompts]

    monkeypatch.setattr(lorakit.chat, "generate", fake_generate)
    monkeypatch.setattr(lorakit.evaluate, "generate", fake_generate)
    conversation = messages([("system", "You are terse."), *CONVERSATIONS[0]])  # system, user, reply, user, reply
    [example], _ = encode_records([{"messages": conversation}], spaced, get_template(None, spaced), cutoff_len=4096)
    second_reply = reply_starts(example["labels"])[1]
    session = ChatSession(make_model("llama", vocab=len(spaced)), spaced, Sampling(max_new_tokens=2),
                          system=conversation[0]["content"])
    session.history = conversation[1:3]
    session.answer(conversation[3]["content"], lambda s: None)
    generate_answers(session.model, spaced, [EvalItem(conversation[:4], "ref")], max_new_tokens=2)
    assert fed == [example["input_ids"][:second_reply]] * 2


@pytest.mark.slow
def test_the_default_models_own_template_is_one_path():
    """SmolLM2-135M-Instruct's own ChatML template (with its default system prompt when none is given)."""
    from transformers import AutoTokenizer

    from lorakit.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    check_one_path(tokenizer, get_template(None, tokenizer))
    default_system = tokenizer.decode(prompt_ids(get_template(None, tokenizer), messages([("user", "Hi")])))
    assert default_system.startswith("<|im_start|>system\n") and default_system.endswith("<|im_start|>assistant\n")
