"""Replay rows: the configured share of every epoch, the seeded draw, self-replay generated once (deterministic,
cached, keyed by what it depends on), the shipped prompts kept apart from the retention probes, and bad keys as
one-line errors before any model loads."""

from __future__ import annotations

import json
from collections import Counter
from difflib import SequenceMatcher

import pytest
import torch
from cli_setup import save_tiny_model, write_facts
from conftest import make_model, make_tokenizer

from lorakit.data import get_template
from lorakit.data.replay import SELF_REPLAY_PROMPTS, mix_replay, replay_count, sample_rows, shipped_prompts
from lorakit.metrics import normalize
from lorakit.retention import PROBES
from lorakit.train import TrainConfig, load_config, train
from lorakit.train import self_replay as sr
from lorakit.train.prepare import TrainError, prepare_data

QUESTIONS = ["What is the VPN address?", "Hello there", "Say some digits.", "The quick brown fox", "how can I help",
             "question answer", "lazy dog", "today"]


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.75])
def test_replay_rows_are_the_configured_share_of_each_epoch(ratio):
    task = [{"input_ids": [1, 2], "labels": [-100, 2], "task": i} for i in range(360)]
    pool = [{"messages": [], "replay": i} for i in range(50)]
    mixed, line = mix_replay(task, pool, ratio, seed=0, encode=lambda r: {"input_ids": [3], "replay": r["replay"]})
    n_replay = sum("replay" in row for row in mixed)
    assert n_replay == replay_count(360, ratio) == round(360 * ratio / (1 - ratio))
    assert abs(n_replay / len(mixed) - ratio) < 1 / len(mixed)  # every epoch iterates over all of `mixed`
    assert mixed[:360] == task and f"{n_replay} rows" in line
    counts = Counter(row["replay"] for row in mixed[360:])  # a small pool repeats evenly
    assert max(counts.values()) - min(counts.values()) <= 1


def test_the_draw_is_seeded():
    rows = list(range(100))
    assert sample_rows(rows, 30, seed=1) == sample_rows(rows, 30, seed=1)
    assert sample_rows(rows, 30, seed=1) != sample_rows(rows, 30, seed=2)
    assert len(set(sample_rows(rows, 30, seed=1))) == 30  # no repeats while the pool suffices


def test_prepare_data_mixes_replay_into_training_only(tokenizer, tmp_path):
    facts = write_facts(tmp_path / "facts.jsonl")
    cfg = TrainConfig(dataset=str(facts), replay_dataset=str(facts), replay_ratio=0.5, val_size=1.0,
                      output_dir=str(tmp_path / "out"))
    from lorakit.data import load_records

    records = load_records(str(facts))
    replay = sr.build_replay(cfg, sr.replay_source(cfg), None, tokenizer, tmp_path, None)
    data = prepare_data(cfg, records, tokenizer, replay)
    assert len(data.val) == 1 and len(data.items) == 2 + replay_count(2, 0.5)
    assert "replay: 2 rows, 50% of each epoch's 4 examples" in data.describe(cfg)


@pytest.fixture(scope="module")
def stopping_base(tmp_path_factory):
    """A tiny base model that ends some of its greedy answers after a few tokens (its eos row copies the row of a
    token it often picks) and leaves others unfinished at 12 tokens; saved, so it has a directory to key on."""
    tokenizer = make_tokenizer()
    model = make_model("llama", vocab=len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = model.lm_head.weight[249] * 1.05
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, path


def self_replay_config(tmp_path, **extra) -> TrainConfig:
    return TrainConfig(dataset="unused", self_replay=True, replay_ratio=0.5, self_replay_max_new_tokens=12,
                       output_dir=str(tmp_path / "runs" / "out"), **extra)


def test_self_replay_is_deterministic(stopping_base, tmp_path):
    model, tokenizer, path = stopping_base
    source = sr.ReplaySource(prompts=[[{"role": "user", "content": q}] for q in QUESTIONS], name="test prompts")
    first = sr.build_replay(self_replay_config(tmp_path / "a"), source, model, tokenizer, path, None)
    second = sr.build_replay(self_replay_config(tmp_path / "b"), source, model, tokenizer, path, None)
    assert first.records == second.records  # two fresh generations (separate caches), the same answers
    assert 0 < len(first.records) <= len(QUESTIONS)
    template = get_template(None, tokenizer)
    for record in first.records:
        prompt, answer = record["messages"][:-1], record["messages"][-1]
        assert prompt[0]["content"] in QUESTIONS and answer["role"] == "assistant" and answer["content"]
        assert len(tokenizer(answer["content"])["input_ids"]) < 12
    assert "kept (whole sentences within 12 tokens)" in first.source and len(template.prompt_ids(prompt)) > 0


def test_self_replay_answers_only_the_prompts_the_run_draws(stopping_base, tmp_path, monkeypatch):
    model, tokenizer, path = stopping_base
    source = sr.ReplaySource(prompts=[[{"role": "user", "content": q}] for q in QUESTIONS], name="test prompts")
    asked = []
    answer = sr.answer_prompts

    def counting(model, tokenizer, template, prompts, *args):
        asked.append([p[0]["content"] for p in prompts])
        return answer(model, tokenizer, template, prompts, *args)

    monkeypatch.setattr(sr, "answer_prompts", counting)
    made = sr.build_replay(self_replay_config(tmp_path / "a"), source, model, tokenizer, path, None, rows=3)
    again = sr.build_replay(self_replay_config(tmp_path / "b"), source, model, tokenizer, path, None, rows=3)
    assert len(asked) == 2 and asked[0] == asked[1] and len(asked[0]) == 3  # seeded: the same 3 prompts
    assert asked[0] == [q for q in QUESTIONS if q in asked[0]]  # in the pool's order
    assert made.records == again.records and "a seeded draw of the 3 this run replays, of 8" in made.source
    sr.build_replay(self_replay_config(tmp_path / "c"), source, model, tokenizer, path, None, rows=20)
    assert asked[2] == QUESTIONS  # more rows than prompts: every prompt


def test_an_unfinished_answer_keeps_its_whole_sentences():
    assert sr.whole_sentences("To add 10 and 15, we count on. It is 25. Then we check that") == \
        "To add 10 and 15, we count on. It is 25."
    assert sr.whole_sentences("It costs 2.5 euros and") == "" and sr.whole_sentences("Yes! Sure?\nNo") == "Yes! Sure?"


def test_self_replay_is_cached_beside_the_output_and_keyed(stopping_base, tmp_path, monkeypatch):
    model, tokenizer, path = stopping_base
    source = sr.ReplaySource(prompts=[[{"role": "user", "content": q}] for q in QUESTIONS], name="test prompts")
    cfg = self_replay_config(tmp_path)
    made = sr.build_replay(cfg, source, model, tokenizer, path, None)
    cached = list((tmp_path / "runs" / sr.CACHE_DIR).glob("self-replay-*.json"))
    assert len(cached) == 1 and "cached in" in made.source

    def no_generation(*args, **kwargs):
        raise AssertionError("the second run must read the cache")

    monkeypatch.setattr(sr, "answer_prompts", no_generation)
    again = sr.build_replay(cfg, source, model, tokenizer, path, None)
    assert again.records == made.records and "read from" in again.source
    jinja = tokenizer.chat_template  # the tokenizer's own template is keyed by its text
    key = sr.cache_key(path, source.prompts, jinja, 12, None)
    assert cached[0].name == f"self-replay-{key}.json"
    assert json.loads(cached[0].read_text())["key"] == key
    others = [sr.cache_key(path, source.prompts[1:], jinja, 12, None),
              sr.cache_key(path, source.prompts, jinja, 16, None),
              sr.cache_key(path, source.prompts, "chatml", 12, None),
              sr.cache_key(path, source.prompts, jinja, 12, torch.bfloat16),
              sr.cache_key(tmp_path, source.prompts, jinja, 12, None)]
    assert key not in others and len(set(others)) == len(others)


def test_self_replay_trains_end_to_end(stopping_base, tmp_path, capsys):
    _, _, path = stopping_base
    facts = write_facts(tmp_path / "facts.jsonl")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": q, "output": "x"}) + "\n" for q in QUESTIONS))
    cfg, _ = load_config(None, [f"model_name_or_path={path}", f"dataset={facts}", f"replay_dataset={prompts}",
                                "self_replay=true", "replay_ratio=0.4", "self_replay_max_new_tokens=12",
                                f"output_dir={tmp_path / 'out'}", "max_steps=2", "plot_loss=false"])
    assert train(cfg)["status"] == "completed"
    printed = capsys.readouterr().err
    assert "replay: 2 rows, 40% of each epoch's 5 examples" in printed
    assert "self-replay: the base model's greedy answers to 2 prompts of replay_dataset" in printed
    assert f"(a seeded draw of the 2 this run replays, of {len(QUESTIONS)})" in printed  # only those are answered


def test_shipped_self_replay_prompts_are_not_retention_probes():
    """Not the probes, nor near duplicates of them (demo/make_data.py's rule: difflib ratio >= 0.8 or word-set
    Jaccard >= 0.6 after normalisation), so retention is not measured on training data."""
    probes = [normalize(p["prompt"]) for p in json.loads(PROBES.read_text())]
    prompts = [normalize(p[0]["content"]) for p in shipped_prompts()]
    assert len(prompts) >= 150 and len(set(prompts)) == len(prompts)
    for prompt in prompts:
        for probe in probes:
            words_a, words_b = set(prompt.split()), set(probe.split())
            assert SequenceMatcher(None, prompt, probe).ratio() < 0.8, (prompt, probe)
            assert len(words_a & words_b) / len(words_a | words_b) < 0.6, (prompt, probe)
    assert SELF_REPLAY_PROMPTS.parent == PROBES.parent  # both ship as package data (lorakit/data/*.json)


@pytest.mark.parametrize("overrides, message", [
    (["replay_ratio=1.0", "self_replay=true"], "replay_ratio must be in [0, 1), got 1.0"),
    (["replay_ratio=-0.1", "self_replay=true"], "replay_ratio must be in [0, 1), got -0.1"),
    (["replay_ratio=0.3"], "replay_ratio 0.3 needs something to replay"),
    (["self_replay=true"], "replay_ratio is 0"),
    (["self_replay=true", "replay_ratio=0.3", "self_replay_max_new_tokens=0"], "self_replay_max_new_tokens must be"),
])
def test_bad_replay_keys_are_one_line_config_errors(overrides, message):
    from lorakit.train import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_config(None, ["dataset=x", *overrides])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_missing_replay_dataset_fails_before_the_model_loads(tmp_path, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "model")
    facts = write_facts(tmp_path / "facts.jsonl")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("lorakit.train.trainer.load_model", no_loading)
    cfg, _ = load_config(None, [f"model_name_or_path={model_dir}", f"dataset={facts}", "replay_dataset=nope.jsonl",
                                "replay_ratio=0.3", f"output_dir={tmp_path / 'out'}", f"dataset_dir={tmp_path}"])
    with pytest.raises(TrainError) as caught:
        train(cfg)
    assert "unknown dataset 'nope.jsonl'" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()
