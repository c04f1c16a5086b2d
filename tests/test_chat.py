"""Chat sessions: streaming, history through the template, commands, adapter switching, stdin lines."""

import pytest
import torch
from conftest import make_model

from lorakit import LoraConfig, get_lora_model
from lorakit.chat import ChatSession, run_repl, stop_token_ids
from lorakit.data import get_template
from lorakit.generation import Sampling


@pytest.fixture
def session(tokenizer):
    lm = get_lora_model(make_model("llama", vocab=320), LoraConfig(target_modules="all-linear",
                                                                   init_lora_weights=False), adapter_name="kb")
    return ChatSession(lm, tokenizer, Sampling(max_new_tokens=6))


def test_streamed_text_is_the_reply_and_history_grows(session):
    pieces = []
    reply = session.answer("Hello there", pieces.append)
    assert "".join(pieces) == reply and reply
    session.answer("And again?", lambda s: None)
    roles = [m["role"] for m in session.history]
    assert roles == ["user", "assistant", "user", "assistant"]
    ids = get_template(None, session.tokenizer).prompt_ids(session.messages())
    text = session.tokenizer.decode(ids)
    assert text.count("<|im_start|>user") == 2 and text.endswith("<|im_start|>assistant\n")


def test_commands(session):
    session.answer("hi", lambda s: None)
    assert "cleared" in session.command("/reset")[0] and session.history == []
    session.command("/system You are terse.")
    assert session.messages()[0] == {"role": "system", "content": "You are terse."}
    assert session.command("/adapter nope")[0].startswith("unknown adapter")
    assert session.command("/adapter __base__")[0] == "(adapter: __base__)"
    assert "/adapter NAME" in session.command("/help")[0]
    assert session.command("/exit")[1] is False
    assert "unknown command" in session.command("/frobnicate")[0]


def test_base_and_adapter_answers_differ_as_the_models_do(session):
    session.command("/adapter __base__")
    base = session.answer("hi", lambda s: None)
    session.command("/reset")
    session.command("/adapter kb")
    tuned = session.answer("hi", lambda s: None)
    prompt = torch.tensor([get_template(None, session.tokenizer).prompt_ids([{"role": "user", "content": "hi"}])])
    with session.model.disable_adapter():
        expected_base = session.model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                               eos_token_id=sorted(session.stop_ids))
    decoded = session.tokenizer.decode(expected_base[0, prompt.shape[1]:], skip_special_tokens=True)
    assert base == decoded
    assert isinstance(tuned, str)


def test_repl_reads_lines_and_runs_commands(session, capsys):
    run_repl(session, lines=["Hello", "/reset", "/adapter __base__", "Bye", "/exit", "never"], interactive=False)
    out = capsys.readouterr().out
    assert "(conversation cleared)" in out and "(adapter: __base__)" in out
    assert len(session.history) == 2  # "Bye" and its answer; "never" was not read


def test_stop_ids_include_end_of_turn(tokenizer):
    model = make_model("llama", vocab=320)
    ids = stop_token_ids(tokenizer, model)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
