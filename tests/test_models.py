"""Model resolution and loading: local directories, the local HF cache, GGUF conversion, errors (all offline)."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch
from conftest import make_model, make_tokenizer

from lorakit import models
from lorakit.models import DEFAULT_MODEL, ModelError, load_model, model_reference, resolve_model


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private LORAKIT_HOME, so no test touches the user's cache."""
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def tiny_dir(tmp_path):
    """A 2-layer Llama and a ChatML tokenizer saved as a Hugging Face directory."""
    path = tmp_path / "tiny"
    make_model("llama", vocab=320).save_pretrained(path)
    make_tokenizer(320).save_pretrained(path)
    return path


def test_load_local_directory(tiny_dir):
    model, tokenizer, path = load_model(str(tiny_dir), device="cpu")
    assert path == tiny_dir.resolve()
    assert not model.training and model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.config._attn_implementation == "sdpa"
    assert model.name_or_path == str(tiny_dir.resolve())  # what an adapter records as its base
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, 320)


def test_load_dtype_and_errors(tiny_dir):
    model, _, _ = load_model(str(tiny_dir), dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ModelError, match="dtype must be one of"):
        load_model(str(tiny_dir), dtype="int3")


@pytest.mark.parametrize("pad", [None, "<|im_end|>"])
def test_pad_token_is_distinct_from_eos(pad):
    """A missing pad, or pad == eos (SmolLM2's own choice), becomes <|endoftext|> and the configs follow."""
    tokenizer = make_tokenizer(320)
    tokenizer.pad_token = pad
    model = make_model("llama", vocab=320)
    models.align_special_tokens(model, tokenizer)
    assert tokenizer.pad_token == "<|endoftext|>"
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_missing_path_is_one_line_error(tmp_path):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(ModelError) as info:
        resolve_model(str(missing))
    assert str(missing) in str(info.value) and "\n" not in str(info.value)


def test_unknown_hub_id(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError, match=r"model 'acme/no-such-model' not found: .*no downloads"):
        resolve_model("acme/no-such-model")


def test_hub_id_in_local_cache(tmp_path, tiny_dir, monkeypatch):
    """A repo in the HF cache layout (refs/main -> snapshots/<sha>/) resolves to its snapshot, offline."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--acme--tiny"
    shutil.copytree(tiny_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("acme/tiny") == repo / "snapshots" / "abc123"
    assert model_reference("acme/tiny") == "acme/tiny"


def test_directories_that_are_not_models(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="LoRA adapter"):
        resolve_model(str(adapter))
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_model_reference(tiny_dir):
    assert model_reference(None) == model_reference("default") == DEFAULT_MODEL
    assert model_reference(str(tiny_dir)) == str(tiny_dir.resolve())


def test_fingerprint_follows_content_not_location(tmp_path):
    first = tmp_path / "a.gguf"
    first.write_bytes(os.urandom(3 << 20))
    copy = tmp_path / "copy" / "a.gguf"
    copy.parent.mkdir()
    shutil.copy(first, copy)
    assert models.gguf_fingerprint(first) == models.gguf_fingerprint(copy)
    data = bytearray(first.read_bytes())
    data[10] ^= 0xFF
    copy.write_bytes(bytes(data))
    assert models.gguf_fingerprint(first) != models.gguf_fingerprint(copy)


def test_conversion_is_atomic_and_cached(tmp_path, home, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(1000))
    calls = []

    def broken(src, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_into", broken)
    with pytest.raises(KeyboardInterrupt):
        models.convert_gguf(gguf)
    assert not list((home / "models").iterdir())  # neither the final directory nor the temporary one

    abandoned = home / "models" / f".tmp-x-{models._host()}-999999999-0123abcd"  # a pid that cannot exist
    abandoned.mkdir()
    monkeypatch.setattr(models, "_convert_into", lambda src, out: calls.append((out / "config.json").write_text("{}")))
    out = models.convert_gguf(gguf)
    assert out == models.gguf_cache_dir(gguf) and out.name.startswith("m-") and (out / "config.json").is_file()
    assert not abandoned.exists()
    assert resolve_model(str(gguf)) == out and len(calls) == 1  # the second time comes from the cache


@pytest.mark.slow
def test_default_model_round_trip(home):
    """The embedded GGUF converts once; the cache reloads fast with identical logits, template and stop token."""
    try:
        models.default_gguf_path()
    except ModelError as exc:
        pytest.skip(str(exc))
    model, tokenizer, path = load_model(None, device="cpu")
    assert path.parent == home / "models" and (path / "model.safetensors").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.name_or_path == DEFAULT_MODEL

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    start = time.perf_counter()
    again, _, path_again = load_model(DEFAULT_MODEL, device="cpu")
    assert time.perf_counter() - start < 10 and path_again == path
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    answer = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert "Paris" in tokenizer.decode(answer)
