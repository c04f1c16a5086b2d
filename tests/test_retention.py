"""Retention on general probes: the shipped probe set, its file checks, retention 1 and KL 0 for an adapter with
B = 0, less for a perturbed one, and the KL equal to the formula computed by hand."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import make_model, make_tokenizer

from lorakit import LoraConfig, get_lora_model
from lorakit.data import get_template
from lorakit.metrics import normalize
from lorakit.retention import (
    KINDS,
    PROBES,
    Probe,
    ProbeError,
    ask,
    compare,
    kl_to_base,
    load_probes,
    retention_of,
)

QUESTIONS = ["What is the VPN address?", "Hello there", "Say some digits.", "The quick brown fox", "how can I help",
             "question answer", "lazy dog", "today"]


def test_shipped_probes_are_general_and_many():
    probes = load_probes()
    assert len(probes) >= 150 and {p.kind for p in probes} == set(KINDS)
    assert len({normalize(p.prompt) for p in probes}) == len(probes)
    facts = yaml.safe_load((PROBES.parents[2] / "demo" / "data" / "kb_facts.yaml").read_text())["facts"]
    keys = {normalize(k) for f in facts for k in ([f["answer"]] if isinstance(f["answer"], str) else f["answer"])}
    company = {"tarnwick"} | keys
    for p in probes:  # nothing about the demo's fictional company: neither its name nor any of its facts
        text = f" {normalize(p.prompt)} {' '.join(normalize(a) for a in p.answers)} "
        assert not any(f" {k} " in text for k in company), p.prompt


@pytest.mark.parametrize("content, message", [
    ("not json", "malformed JSON"),
    ("{}", "expected a non-empty JSON list"),
    ('[{"prompt": "Hi?", "answer": "x"}, {"answer": "y"}]', "[1]: a probe needs a non-empty string 'prompt'"),
    ('[{"prompt": "Hi?", "answer": []}]', "[0]: 'answer' must be a keyword or a non-empty list"),
])
def test_bad_probe_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "probes.json"
    path.write_text(content)
    with pytest.raises(ProbeError) as caught:
        load_probes(path)
    assert message in str(caught.value) and str(path) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ProbeError, match="not found"):
        load_probes(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def setup():
    """A tiny base whose greedy answers end after a few tokens, and probes it answers right by construction (the
    keyword is the first word of its own answer)."""
    tokenizer = make_tokenizer()
    model = make_model("llama", vocab=len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = model.lm_head.weight[249] * 1.05
    render, stop = get_template(None, tokenizer).prompt_ids, {tokenizer.eos_token_id}
    first = ask(model, tokenizer, [Probe(q, ["?"]) for q in QUESTIONS], "__base__", render, stop, max_new_tokens=8)
    probes = [Probe(q, [text.split()[0]]) for q, text in zip(QUESTIONS, first.texts) if text.split()]
    return model, tokenizer, probes, render, stop


def lora_of(model, seed: int, scale: float):
    lora = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * scale)
    return lora


def test_adapter_with_b_zero_keeps_everything(setup):
    model, tokenizer, probes, render, stop = setup
    lora = lora_of(model, 0, scale=0.0)  # B = 0: the model's outputs are unchanged
    try:
        base = ask(lora, tokenizer, probes, "__base__", render, stop, max_new_tokens=8)
        assert base.score == 1.0 and len(probes) >= 4
        kept, answers = retention_of(lora, tokenizer, "default", base, probes, render, stop, max_new_tokens=8)
        assert kept["retention"] == 1.0 and kept["kept"] == kept["base_right"] == len(probes)
        assert abs(kept["kl"]) < 1e-6 and answers.texts == base.texts
    finally:
        lora.unload()


def test_perturbed_adapter_keeps_less(setup):
    model, tokenizer, probes, render, stop = setup
    lora = lora_of(model, 1, scale=2.0)
    try:
        base = ask(lora, tokenizer, probes, "__base__", render, stop, max_new_tokens=8)
        kept, answers = retention_of(lora, tokenizer, "default", base, probes, render, stop, max_new_tokens=8)
        assert kept["retention"] < 1.0 and kept["kl"] > 1e-3
        assert kept["kept"] == sum(b and a for b, a in zip(base.right, answers.right))
    finally:
        lora.unload()


def test_kl_is_the_formula_over_the_first_positions_of_the_base_answer(setup):
    model, tokenizer, probes, render, stop = setup
    lora = lora_of(model, 2, scale=0.5)
    try:
        base = ask(lora, tokenizer, probes, "__base__", render, stop, max_new_tokens=8)
        terms = []
        for prompt, answer in zip(base.prompt_ids, base.ids):  # one probe at a time, no padding, full logits
            k = max(1, min(3, len(answer)))
            ids = torch.tensor([prompt + answer])
            with lora.disable_adapter():
                p_base = F.log_softmax(lora(input_ids=ids).logits[0].float(), dim=-1)  # (T, V)
            p_lora = F.log_softmax(lora(input_ids=ids).logits[0].float(), dim=-1)
            rows = slice(len(prompt) - 1, len(prompt) - 1 + k)  # position len(prompt)-1+t predicts answer token t
            terms += (p_base[rows].exp() * (p_base[rows] - p_lora[rows])).sum(-1).tolist()
        expected = sum(terms) / len(terms)
        got = kl_to_base(lora, "default", base, positions=3, batch_size=3, pad_id=tokenizer.pad_token_id)
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-6) and got > 0
    finally:
        lora.unload()


def test_compare_counts_only_what_the_base_got_right():
    from lorakit.retention import ProbeAnswers

    def answers(right):
        return ProbeAnswers("x", [[1]] * 4, [[1]] * 4, [""] * 4, right)

    row = compare(answers([True, True, False, True]), answers([True, False, True, True]), kl=0.5)
    assert (row["kept"], row["base_right"], row["probes"]) == (2, 3, 4)
    assert row["retention"] == pytest.approx(2 / 3) and row["probe_score"] == 0.75 and row["kl"] == 0.5


def test_probe_file_format_round_trip(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"prompt": "Capital of Peru?", "answer": "Lima"}]))
    assert load_probes(path) == [Probe("Capital of Peru?", ["Lima"], "fact")]


def test_eval_reports_retention_per_adapter_and_can_skip_it(tmp_path, capsys):
    from cli_setup import random_adapter, save_tiny_model, write_facts

    from lorakit.cli import main

    model_dir = save_tiny_model(tmp_path / "model")
    adapter, _ = random_adapter(model_dir, tmp_path / "kb", scale=0.5)
    probes = tmp_path / "probes.json"
    probes.write_text(json.dumps([{"prompt": q, "answer": "the"} for q in QUESTIONS]))
    data, out = write_facts(tmp_path / "facts.jsonl"), tmp_path / "r.json"
    common = ["eval", "--adapter", f"kb={adapter}", "--dataset", str(data), "--max_new_tokens", "4"]
    assert main([*common, f"retention_probes={probes}", "--output", str(out)]) == 0
    base, kb = json.loads(out.read_text())["models"]
    assert "retention" not in base and 0 <= base["probe_score"] <= 1
    assert kb["probes"] == len(QUESTIONS) and kb["kl"] > 0 and len(kb["probe_answers"]) == len(QUESTIONS)
    assert kb["base_right"] == round(base["probe_score"] * len(QUESTIONS))
    assert "| retention | retention_95 | kl |" in capsys.readouterr().out
    assert main([*common, "retention=false", "--output", str(out)]) == 0
    assert all("kl" not in row for row in json.loads(out.read_text())["models"])
    capsys.readouterr()
    assert main([*common, f"retention_probes={tmp_path / 'none.json'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "none.json" in err and "not found" in err  # the only line: nothing was loaded


def test_wilson_interval_brackets_the_share_and_matches_the_formula():
    from lorakit.metrics import wilson_interval

    low, high = wilson_interval(84, 103)
    assert (low, high) == (pytest.approx(0.72977, abs=1e-4), pytest.approx(0.87861, abs=1e-4))  # by hand
    assert low < 84 / 103 < high
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    narrow, wide = wilson_interval(800, 1000), wilson_interval(8, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]  # more questions, a tighter interval


def test_compare_reports_the_interval_of_its_retention():
    from lorakit.retention import ProbeAnswers

    def answers(right):
        return ProbeAnswers("x", [[1]] * len(right), [[1]] * len(right), [""] * len(right), right)

    row = compare(answers([True] * 20), answers([True] * 15 + [False] * 5))
    low, high = row["retention_95"]
    assert low < row["retention"] == 0.75 < high
