"""HF export: reloads with plain transformers, same logits, sharded, atomic."""

import json

import pytest
import torch
from conftest import make_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import LoraConfig, get_lora_model
from lorakit.export.hf import export_hf, logits_on, parse_dtype, probe_ids


def adapter_model(arch="llama"):
    lm = get_lora_model(make_model(arch, vocab=320), LoraConfig(target_modules="all-linear", init_lora_weights=False,
                                                                 use_dora=arch == "qwen2"))
    return lm


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_export_reloads_with_transformers_and_matches(arch, tokenizer, tmp_path):
    lm = adapter_model(arch)
    probe = probe_ids(320)
    reference = logits_on(lm, probe)
    merged = lm.merge_and_unload()
    report = export_hf(merged, tokenizer, tmp_path / "out", reference_logits=reference, probe=probe, tolerance=1e-4)
    assert report["max_abs_diff"] <= 1e-4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits_on(reloaded, probe), reference, atol=1e-4, rtol=1e-4)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.chat_template == tokenizer.chat_template
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_bf16_shards(tokenizer, tmp_path):
    merged = adapter_model().merge_and_unload()
    report = export_hf(merged, tokenizer, tmp_path / "out", dtype=parse_dtype("bf16"), shard_size_gb=0.0001)
    shards = [f for f in report["files"] if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in report["files"]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.bfloat16


def test_refuses_occupied_directory_and_bad_dtype(tokenizer, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        export_hf(adapter_model().merge_and_unload(), tokenizer, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="export_dtype"):
        parse_dtype("int3")


def test_mismatch_beyond_tolerance_leaves_nothing(tokenizer, tmp_path):
    lm = adapter_model()
    probe = probe_ids(320)
    wrong = logits_on(lm, probe) + 1.0
    with pytest.raises(ValueError, match="differs"):
        export_hf(lm.merge_and_unload(), tokenizer, tmp_path / "out", reference_logits=wrong, probe=probe,
                  tolerance=1e-4)
    assert list(tmp_path.iterdir()) == []
