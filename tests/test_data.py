"""lorakit.data: formats, registry, templates, masking, truncation, batching and packing, offline.

The tokenizer is the byte-level BPE trained in conftest (ChatML chat template, <|im_start|>/<|im_end|>); the
packing parity checks run a 2-layer Llama built from a config.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from lorakit.data import (
    TEMPLATES,
    DataError,
    batch_order,
    check_datasets,
    check_template,
    collate_packed,
    encode_records,
    get_template,
    iterate_batches,
    load_records,
    pack_examples,
    packed_attention_mask,
    pad_collate,
    split_validation,
    turn_budget,
)

EOT = "<|im_end|>\n"  # ChatML end of turn: the reply's label includes it


def write(path, data, jsonl: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(json.dumps(r) for r in data) + "\n" if jsonl else json.dumps(data, indent=1)
    path.write_text(text, encoding="utf-8")
    return path


def label_runs(tokenizer, example: dict) -> list[str]:
    """The decoded text of each contiguous run of label tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != -100:
            assert label == token
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.decode(r) for r in runs]


def encode_one(tokenizer, messages, template=None, **kw):
    examples, stats = encode_records([{"messages": messages}], tokenizer, get_template(template, tokenizer), **kw)
    return examples[0], stats


def chat(*turns: str, system: str | None = None) -> list[dict]:
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": r, "content": t} for r, t in zip(roles, turns)]


# ---------------------------------------------------------------- formats


def test_alpaca_with_system_and_history(tmp_path, tokenizer):
    path = write(tmp_path / "a.json", [{"instruction": "Name the dog", "input": "the lazy one", "output": "Rex",
                                        "system": "Be brief", "history": [["hello", "hi there"]], "answer": "Rex"}])
    (record,) = load_records(str(path))
    assert record["messages"] == chat("hello", "hi there", "Name the dog\nthe lazy one", "Rex", system="Be brief")
    assert record["answer"] == "Rex" and record["source"] == f"{path}[0]"
    example, _ = encode_one(tokenizer, record["messages"])
    assert label_runs(tokenizer, example) == ["hi there" + EOT, "Rex" + EOT]
    whole = tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert example["input_ids"] == tokenizer(whole, add_special_tokens=False)["input_ids"]


def test_sharegpt_and_openai_messages(tmp_path, tokenizer):
    sharegpt = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "call it"},
                                  {"from": "function_call", "value": '{"name": "f"}'},
                                  {"from": "observation", "value": "42"}, {"from": "gpt", "value": "It is 42."}]}
    openai = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye now"},
                           {"role": "user", "content": "unanswered"}]}
    write(tmp_path / "s.jsonl", [sharegpt], jsonl=True)
    write(tmp_path / "o.json", [openai, openai], jsonl=True)  # .json holding JSON lines is read as JSONL
    (s,) = load_records(str(tmp_path / "s.jsonl"))
    assert [m["role"] for m in s["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    o1, o2 = load_records("o.json", dataset_dir=str(tmp_path))
    assert o1["messages"] == chat("Hi", "Hello", "Bye", "Bye now") and o2["source"].endswith("o.json:2")
    examples, stats = encode_records([s, o1], tokenizer, get_template(None, tokenizer))
    assert label_runs(tokenizer, examples[0]) == ['{"name": "f"}' + EOT, "It is 42." + EOT]
    assert label_runs(tokenizer, examples[1]) == ["Hello" + EOT, "Bye now" + EOT]
    assert stats["examples"] == 2 and stats["truncated"] == 0


def test_pretraining_text_all_labels_and_split(tmp_path, tokenizer):
    write(tmp_path / "pt.jsonl", [{"text": "The quick brown fox"}, {"text": "x" * 50}], jsonl=True)
    records = load_records(str(tmp_path / "pt.jsonl"), stage="pt")
    examples, stats = encode_records(records, tokenizer, None, cutoff_len=32, stage="pt")
    first = examples[0]
    assert tokenizer.decode(first["input_ids"]) == "The quick brown fox" + tokenizer.eos_token
    assert first["labels"] == [-100] + first["input_ids"][1:]
    assert stats["split"] >= 1 and len(examples) == 2 + stats["split"]
    assert all(len(e["input_ids"]) <= 32 for e in examples)
    with pytest.raises(DataError, match="use stage: pt"):
        load_records(str(tmp_path / "pt.jsonl"), stage="sft")


def test_parquet_and_csv(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([{"instruction": "q1", "input": "", "output": "a1"}]), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("instruction,input,output\nq2,,a2\n", encoding="utf-8")
    records = load_records(f"{tmp_path / 'd.parquet'},{tmp_path / 'd.csv'}")
    assert [r["messages"] for r in records] == [chat("q1", "a1"), chat("q2", "a2")]


# ---------------------------------------------------------------- registry


def test_registry_columns_tags_folder_and_max_samples(tmp_path):
    write(tmp_path / "alp.json", [{"q": "Q", "ctx": "C", "a": "A", "sys": "S", "hist": [["h", "g"]], "extra": 1}])
    write(tmp_path / "chat.json", [{"dialog": [{"speaker": "me", "text": "hi"}, {"speaker": "bot", "text": "yo"}],
                                    "sys": "S2"}])
    for i in range(3):  # a folder of files, read in name order
        write(tmp_path / "many" / f"part{i}.jsonl", [{"instruction": f"q{i}{j}", "output": "o"} for j in range(2)],
              jsonl=True)
    write(tmp_path / "dataset_info.json", {
        "alp": {"file_name": "alp.json", "columns": {"prompt": "q", "query": "ctx", "response": "a", "system": "sys",
                                                     "history": "hist"}},
        "talk": {"file_name": "chat.json", "formatting": "sharegpt", "columns": {"messages": "dialog", "system": "sys"},
                 "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}},
        "many": {"file_name": "many"},
    })
    alp, talk = load_records("alp, talk", dataset_dir=str(tmp_path))
    assert alp["messages"] == chat("h", "g", "Q\nC", "A", system="S") and alp["extra"] == 1
    assert talk["messages"] == chat("hi", "yo", system="S2")
    many = load_records("many", dataset_dir=str(tmp_path), max_samples=3)
    assert [r["messages"][0]["content"] for r in many] == ["q00", "q01", "q10"]
    assert check_datasets("alp,many", dataset_dir=str(tmp_path)) == {"alp": 1, "many": 6}


def test_registry_strict_tags_reject_other_roles(tmp_path):
    write(tmp_path / "c.json", [{"conversations": [{"from": "user", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])
    write(tmp_path / "dataset_info.json", {"c": {"file_name": "c.json", "formatting": "sharegpt",
                                                 "tags": {"user_tag": "human"}}})
    with pytest.raises(DataError, match=r"c\.json\[0\] conversations\[0\]: unknown role 'user'"):
        load_records("c", dataset_dir=str(tmp_path))


# ---------------------------------------------------------------- bad input: one line naming file and record


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_inputs_name_file_and_line(tmp_path):
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_records(str(bad_line))
    assert f"{bad_line}:2: malformed JSON line" in one_line(e)

    (tmp_path / "bad.json").write_text('[{"instruction": "a",\n "output": }]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json:2: malformed JSON"):
        load_records(str(tmp_path / "bad.json"))

    write(tmp_path / "miss.json", [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    with pytest.raises(DataError) as e:
        load_records(str(tmp_path / "miss.json"))
    assert "miss.json[1]: alpaca record lacks 'output'" in one_line(e)

    write(tmp_path / "turn.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}],
          jsonl=True)
    with pytest.raises(DataError, match=r"turn\.jsonl:1 messages\[1\]: turn lacks 'content'"):
        load_records(str(tmp_path / "turn.jsonl"))

    write(tmp_path / "noreply.jsonl", [{"messages": [{"role": "user", "content": "a"}]}], jsonl=True)
    with pytest.raises(DataError, match="no assistant turn"):
        load_records(str(tmp_path / "noreply.jsonl"))

    write(tmp_path / "empty.json", [])
    with pytest.raises(DataError, match="dataset .* is empty"):
        load_records(str(tmp_path / "empty.json"))


def test_bad_registry_entries(tmp_path):
    write(tmp_path / "dataset_info.json", {"alpaca_en_demo": {"file_name": "gone.json"},
                                           "hub_one": {"hf_hub_url": "someone/data"}})
    with pytest.raises(DataError) as e:
        load_records("alpaca_en_dem", dataset_dir=str(tmp_path))
    message = one_line(e)
    assert "unknown dataset 'alpaca_en_dem'" in message and "did you mean 'alpaca_en_demo'" in message
    assert "hub_one" in message
    with pytest.raises(DataError, match=r"data file .*gone\.json not found"):
        check_datasets("alpaca_en_demo", dataset_dir=str(tmp_path))
    with pytest.raises(DataError, match="local files only.*hf_hub_url"):
        check_datasets("hub_one", dataset_dir=str(tmp_path))
    with pytest.raises(DataError, match="unknown dataset 'nothing': no such file"):
        load_records("nothing", dataset_dir=str(tmp_path / "absent"))


# ---------------------------------------------------------------- templates


def test_builtin_chatml_equals_tokenizer_chatml(tokenizer):
    messages = chat("Hi", "Hello there", "And?", "0123", system="sys")
    own, _ = encode_one(tokenizer, messages, None)
    builtin, _ = encode_one(tokenizer, messages, "chatml")
    assert own == builtin
    assert get_template("default", tokenizer).prompt(messages[:2]) == get_template("chatml", tokenizer).prompt(
        messages[:2]) == "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("name,text,replies", [
    ("qwen", "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
             "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n", ["Yo" + EOT]),
    ("qwen3_nothink", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n", ["Yo" + EOT]),
    ("llama3", "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nYo<|eot_id|>", ["Yo<|eot_id|>"]),
    ("mistral", "[INST] Hi [/INST]Yo<|im_end|>", ["Yo<|im_end|>"]),
    ("alpaca", "Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.\n\n### Instruction:\nHi\n\n### Response:\nYo<|im_end|>", ["Yo<|im_end|>"]),
    ("empty", "HiYo<|im_end|>", ["Yo<|im_end|>"]),
])
def test_builtin_templates(tokenizer, name, text, replies):
    template = get_template(name, tokenizer)
    assert "".join(t for t, _ in template.segments(chat("Hi", "Yo"))) == text
    example, _ = encode_one(tokenizer, chat("Hi", "Yo"), name)
    assert label_runs(tokenizer, example) == replies
    assert template.stop_words and "{eos}" not in template.stop_words[0]


def test_builtin_multi_turn_and_system(tokenizer):
    mistral = get_template("mistral", tokenizer)
    prompt = mistral.prompt(chat("Hi", "Yo", "Again", system="S"))
    assert prompt == "[INST] S\n\nHi [/INST]Yo<|im_end|>[INST] Again [/INST]"
    alpaca, _ = encode_one(tokenizer, chat("a", "b", "c", "d", system="S"), "alpaca")
    assert tokenizer.decode(alpaca["input_ids"]) == ("S\n\n### Instruction:\na\n\n### Response:\nb<|im_end|>\n\n"
                                                     "### Instruction:\nc\n\n### Response:\nd<|im_end|>")
    assert label_runs(tokenizer, alpaca) == ["b<|im_end|>", "d<|im_end|>"]


def test_unknown_template_and_template_without_prefix_stability(tokenizer):
    with pytest.raises(DataError) as e:
        get_template("vicuna", tokenizer)
    assert all(name in one_line(e) for name in TEMPLATES)
    assert check_template("default") is None and check_template("llama3") == "llama3"
    with pytest.raises(DataError, match="unknown template 'vicuna'"):
        check_template("vicuna")
    clone = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    clone.chat_template = ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}<old>"
                           "{% else %}<{{ m.role }}>{{ m.content }}{% endif %}{% endfor %}"
                           "{% if add_generation_prompt %}<assistant>{% endif %}")
    with pytest.raises(DataError, match=r"\[3\]: the tokenizer's chat template is not prefix-stable"):
        encode_records([{"messages": chat("a", "b", "c", "d"), "source": "f.json[3]"}], clone,
                       get_template(None, clone))
    clone.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        get_template(None, clone)


def test_other_jinja_template_with_default_system(tokenizer):
    clone = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    clone.chat_template = ("{% if messages[0]['role'] != 'system' %}[SYS]default[/SYS]{% endif %}"
                           "{% for m in messages %}{% if m.role == 'system' %}[SYS]{{ m.content }}[/SYS]"
                           "{% elif m.role == 'user' %}[U]{{ m.content }}[/U]{% else %}[A]{{ m.content }}[END]"
                           "{% endif %}{% endfor %}{% if add_generation_prompt %}[A]{% endif %}")
    example, _ = encode_one(clone, chat("q1", "r1", "q2", "r2"))
    assert label_runs(clone, example) == ["r1[END]", "r2[END]"]
    assert clone.decode(example["input_ids"]) == "[SYS]default[/SYS][U]q1[/U][A]r1[END][U]q2[/U][A]r2[END]"


def test_train_on_prompt(tokenizer):
    example, stats = encode_one(tokenizer, chat("Hi", "Yo"), train_on_prompt=True)
    assert example["labels"] == [-100] + example["input_ids"][1:]
    assert stats["label_tokens"] == len(example["input_ids"]) - 1


# ---------------------------------------------------------------- cutoff_len


def test_turn_budget_rule():
    assert turn_budget(10, 5, 100) == (10, 5)  # fits
    assert turn_budget(90, 10, 50) == (40, 10)  # short reply kept whole, prompt start kept
    assert turn_budget(10, 90, 50) == (10, 40)  # short prompt kept whole
    assert turn_budget(60, 40, 50) == (30, 20)  # both long: in proportion
    assert turn_budget(5, 5, 0) == (0, 0)


def test_cutoff_counts_truncation_and_drops(tokenizer):
    long_prompt = chat("q" * 60, "ok")
    records = [{"messages": chat("Hi", "Yo")}, {"messages": long_prompt}, {"messages": chat("Hi", "y" * 80)}]
    full, _ = encode_records(records, tokenizer, get_template(None, tokenizer), cutoff_len=4096)
    examples, stats = encode_records(records, tokenizer, get_template(None, tokenizer), cutoff_len=24)
    assert stats["truncated"] == 2 and stats["dropped_no_labels"] == 0 and stats["examples"] == 3
    assert stats["tokens_cut"] == sum(len(e["input_ids"]) for e in full) - sum(len(e["input_ids"]) for e in examples)
    assert all(len(e["input_ids"]) <= 24 for e in examples)
    assert examples[0] == full[0]  # untouched
    assert label_runs(tokenizer, examples[1]) == ["ok" + EOT]  # short reply kept whole
    n_prompt = full[2]["labels"].count(-100)  # prompt and reply each keep their start, as turn_budget shares
    prompt, reply = full[2]["input_ids"][:n_prompt], full[2]["input_ids"][n_prompt:]
    keep_prompt, keep_reply = turn_budget(len(prompt), len(reply), 24)
    assert examples[2]["input_ids"] == prompt[:keep_prompt] + reply[:keep_reply] and keep_reply > 0
    # a second turn that no longer fits leaves the first turn's labels; a record whose reply is gone is dropped
    multi = {"messages": chat("Hi", "Yo", "q" * 40, "r" * 40)}
    examples, stats = encode_records([multi], tokenizer, get_template(None, tokenizer), cutoff_len=20)
    assert label_runs(tokenizer, examples[0])[0] == "Yo" + EOT and stats["truncated"] == 1
    with pytest.raises(DataError, match="no example has a label token left"):
        encode_records([{"messages": chat("Hi", "Yo")}], tokenizer, get_template(None, tokenizer), cutoff_len=3)


# ---------------------------------------------------------------- splitting, collate, batch order


def fake_examples(lengths):
    return [{"input_ids": list(range(1, n + 1)), "labels": [-100] + list(range(2, n + 1))} for n in lengths]


def test_split_validation():
    examples = fake_examples(range(2, 22))
    train, val = split_validation(examples, 0.25, seed=3)
    assert len(val) == 5 and len(train) == 15
    assert sorted(map(len, (e["input_ids"] for e in train + val))) == list(range(2, 22))
    assert split_validation(examples, 0.25, seed=3) == (train, val)
    assert split_validation(examples, 0.25, seed=4)[1] != val
    assert len(split_validation(examples, 3, seed=0)[1]) == 3
    assert split_validation(examples, None, seed=0) == (examples, [])
    with pytest.raises(DataError, match="val_size"):
        split_validation(examples, 20, seed=0)


def test_pad_collate():
    batch = pad_collate(fake_examples([3, 5]), pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, -100], [-100, 2, 3, 4, 5]]
    assert pad_collate(fake_examples([3]), 0, pad_to_multiple_of=8)["input_ids"].shape == (1, 8)


def test_batch_order_is_resumable_and_seeded():
    items = fake_examples([(i * 7) % 23 + 2 for i in range(40)])
    lengths = [len(e["input_ids"]) for e in items]
    epoch0 = batch_order(lengths, 4, seed=1, epoch=0)
    assert sorted(i for b in epoch0 for i in b) == list(range(40))
    assert epoch0 == batch_order(lengths, 4, seed=1, epoch=0) != batch_order(lengths, 4, seed=1, epoch=1)
    full = list(iterate_batches(items, 4, pad_token_id=0, seed=1, epoch=0))
    resumed = list(iterate_batches(items, 4, pad_token_id=0, seed=1, epoch=0, start=6))
    assert len(full) == 10 and len(resumed) == 4
    for a, b in zip(full[6:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)
    grouped = batch_order(lengths, 4, seed=1, group_by_length=True)
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in grouped)
    assert all(hi <= nxt_lo for (_, hi), (nxt_lo, _) in zip(spans, spans[1:]))  # buckets do not overlap
    assert grouped != batch_order(lengths, 4, seed=2, group_by_length=True)
    assert len(batch_order(lengths, 3, seed=0, drop_last=True)) == 13


# ---------------------------------------------------------------- packing


def test_pack_examples_layout():
    examples = fake_examples([5, 9, 3, 7, 2, 6])
    rows = pack_examples(examples, max_len=12)
    assert all(len(r["input_ids"]) <= 12 for r in rows) and len(rows) == 3
    assert sorted(n for r in rows for n in r["lengths"]) == [2, 3, 5, 6, 7, 9]
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        assert all(r["labels"][s] == -100 for s in starts)
    batch = collate_packed(rows, pad_token_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    short = min(range(3), key=lambda i: len(rows[i]["input_ids"]))
    n = len(rows[short]["input_ids"])
    assert batch["position_ids"][short, n:].tolist() == list(range(batch["input_ids"].shape[1] - n))
    with pytest.raises(DataError, match="packing length"):
        pack_examples(examples, max_len=8)


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over label tokens; position t predicts token t+1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(tokenizer, attn):
    from transformers import AutoModelForCausalLM

    conversations = [chat("Hi", "Hello there"), chat("What is the VPN address?", "vpn.example", "ok?", "yes"),
                     chat("quick brown fox", "lazy dog"), chat("0123456789", "9876543210", system="count"),
                     chat("question", "answer")]
    examples, _ = encode_records([{"messages": c} for c in conversations], tokenizer, get_template(None, tokenizer))
    rows = pack_examples(examples, max_len=96)
    assert len(rows) == 2 and max(len(r["lengths"]) for r in rows) >= 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab=len(tokenizer)), attn_implementation=attn)
    model.eval()
    with torch.no_grad():
        unpacked = sum(summed_loss(model(torch.tensor([e["input_ids"]]), use_cache=False).logits,
                                   torch.tensor([e["labels"]])) for e in examples)
        batch = collate_packed(rows, pad_token_id=tokenizer.pad_token_id)
        packed = summed_loss(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                   use_cache=False).logits, batch["labels"])
        mask = packed_attention_mask(batch["position_ids"], torch.float32)  # (B, 1, T, T) explicit 4-D mask
        explicit = summed_loss(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                     attention_mask=mask, use_cache=False).logits, batch["labels"])
        # control: a plain causal mask lets packed examples see each other, and the loss changes
        leaky = summed_loss(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                  attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits,
                            batch["labels"])
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(explicit, unpacked, rtol=1e-5, atol=1e-4)
    assert (leaky - unpacked).abs() > 1e-2
    assert int((batch["labels"] != -100).sum()) == sum(sum(x != -100 for x in e["labels"]) for e in examples)


def test_packed_attention_mask_blocks():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = packed_attention_mask(position_ids)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    additive = packed_attention_mask(position_ids, torch.float32)[0, 0]
    assert torch.equal(additive == 0, expected)
