"""`lorakit chat` end to end on a tiny model and a trained adapter saved to disk: --prompt, stdin lines, YAML +
key=value + flags, the template from training_args.yaml, Ctrl-C, and bad input."""

from __future__ import annotations

import io
import shutil

import pytest
import torch
import yaml
from cli_setup import FACTS, save_tiny_model, train_adapter, write_facts
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.adapters import load_adapters, parse_adapter_specs, plan_adapters
from lorakit.chat import ChatSession, stop_token_ids
from lorakit.cli import main
from lorakit.commands.arguments import parse_command
from lorakit.commands.chat import ALIASES, ChatArgs
from lorakit.data import get_template
from lorakit.generation import Sampling, generate

QUESTION = FACTS[0][0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model = save_tiny_model(root / "model")
    adapter = train_adapter(model, write_facts(root / "facts.jsonl"), root / "kb", "max_steps=8")
    return {"root": root, "model": model, "adapter": adapter}


def direct_answer(setup, question: str, max_new_tokens: int, adapter: bool = True) -> str:
    """The reply computed with the library directly: the adapter model, the tokenizer's template, greedy."""
    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    model = AutoModelForCausalLM.from_pretrained(setup["model"]).eval()
    if adapter:
        model = load_adapters(model, parse_adapter_specs(str(setup["adapter"])))
    template = get_template(None, tokenizer)
    ids = generate(model, [template.prompt_ids([{"role": "user", "content": question}])],
                   Sampling(max_new_tokens=max_new_tokens), stop_token_ids(tokenizer, model), tokenizer.pad_token_id)
    return tokenizer.decode(ids[0], skip_special_tokens=True)


def test_prompt_answers_once_greedy_and_equals_generate(setup, capsys):
    argv = ["chat", "--adapter", str(setup["adapter"]), "--temperature", "0", "--max_new_tokens", "10",
            "--prompt", QUESTION]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out == first.out  # deterministic
    assert first.out.strip()
    assert first.out == direct_answer(setup, QUESTION, 10) + "\n"
    assert "loading" in first.err and str(setup["model"]) in first.err  # the base came from the adapter


def test_base_model_answer_with_active_adapter_base(setup, capsys):
    assert main(["chat", "--adapter", str(setup["adapter"]), "--temperature", "0", "--max_new_tokens", "6",
                 "active_adapter=__base__", "--prompt", QUESTION]) == 0
    assert capsys.readouterr().out == direct_answer(setup, QUESTION, 6, adapter=False) + "\n"


def test_stdin_lines_are_turns_and_commands_work(setup, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n/reset\n\n{QUESTION}\n/exit\nnever read\n"))
    assert main(["chat", "--adapter", str(setup["adapter"]), "--temperature", "0", "--max_new_tokens", "10"]) == 0
    out = capsys.readouterr().out.splitlines()
    answer = direct_answer(setup, QUESTION, 10)
    assert out == [answer, "(conversation cleared)", answer]  # after /reset the same question, the same answer


def test_history_false_answers_every_line_alone(setup, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n{QUESTION}\n"))
    assert main(["chat", "--adapter", str(setup["adapter"]), "--temperature", "0", "--max_new_tokens", "10",
                 "history=false"]) == 0
    answer = direct_answer(setup, QUESTION, 10)
    assert capsys.readouterr().out.splitlines() == [answer, answer]


def test_yaml_overrides_and_flags_combine(setup, tmp_path, capsys):
    config = tmp_path / "infer.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": str(setup["model"]), "adapter_name_or_path": "ignored",
                                      "template": "chatml", "infer_backend": "huggingface", "temperature": 0.9,
                                      "trust_remote_code": True, "max_new_tokens": 99}))
    argv = [str(config), f"adapter_name_or_path={setup['adapter']}", "temperature=0", "--max_new_tokens", "10",
            "--prompt", "yes"]
    args, ignored = parse_command(ChatArgs, argv, ALIASES)
    assert (args.temperature, args.max_new_tokens, args.template, args.prompt) == (0.0, 10, "chatml", "yes")
    assert args.adapter_name_or_path == str(setup["adapter"]) and ignored == ["trust_remote_code"]
    assert main(["chat", *argv[:-1], QUESTION]) == 0
    assert capsys.readouterr().out == direct_answer(setup, QUESTION, 10) + "\n"  # chatml = the tokenizer's own


def test_template_and_base_come_from_training_args(setup, tmp_path):
    copy = tmp_path / "kb"
    shutil.copytree(setup["adapter"], copy)
    settings = yaml.safe_load((copy / "training_args.yaml").read_text())
    assert settings["model_name_or_path"] == str(setup["model"])
    (copy / "training_args.yaml").write_text(yaml.safe_dump({**settings, "template": "alpaca"}))
    plan = plan_adapters(str(copy))
    assert plan.template == "alpaca" and plan.base == str(setup["model"])
    assert plan_adapters(str(copy), template="llama3").template == "llama3"


def test_ctrl_c_stops_the_answer_not_the_session(setup):
    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    model = AutoModelForCausalLM.from_pretrained(setup["model"]).eval()
    session = ChatSession(model, tokenizer, Sampling(max_new_tokens=20))
    pieces = []

    def write(piece):
        pieces.append(piece)
        if len(pieces) == 2:
            raise KeyboardInterrupt

    reply = session.answer("hi", write)
    assert pieces[-1].endswith("[stopped]") and session.history[-1] == {"role": "assistant", "content": reply.strip()}
    assert session.answer("again", lambda s: None) is not None and len(session.history) == 4


def test_help_lists_keys(capsys):
    assert main(["chat", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lorakit chat")
    for key in ("model_name_or_path", "adapter_name_or_path", "template", "finetuning_type", "infer_backend",
                "temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "prompt", "system"):
        assert f"  {key} = " in out


@pytest.mark.parametrize("argv,status,message", [
    (["infer_backend=vllm"], 2, "infer_backend 'vllm' is not supported"),
    (["--temperature", "-1"], 2, "temperature must be >= 0"),
    (["temprature=0"], 2, "did you mean 'temperature'"),
    (["--template", "nope"], 2, "unknown template 'nope'"),
    (["--model", "/no/such/model"], 1, "'/no/such/model' not found"),
    (["finetuning_type=full", "--adapter", "x"], 2, "adapter_name_or_path needs finetuning_type lora"),
])
def test_bad_settings_are_one_line(argv, status, message, capsys):
    assert main(["chat", *argv, "--prompt", "hi"]) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lorakit chat: error: ") and message in err[-1]


def test_adapter_dir_without_config_is_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["chat", "--adapter", str(tmp_path / "empty"), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "empty") in err and "adapter_config.json" in err


def test_stop_ids_include_a_builtin_templates_end_of_turn(tokenizer):
    ids = stop_token_ids(tokenizer, torch.nn.Linear(1, 1), ["<|im_start|>"])
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids
