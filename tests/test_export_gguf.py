"""GGUF export: tensors and types, the q/k permutation, metadata, tokenizer, LoRA adapters, Ollama Modelfile.

Files are read back with the `gguf` package and, for the strongest check, loaded with transformers' own GGUF
loader (which undoes llama.cpp's q/k permutation) and compared on logits with the model that was written.
"""

import copy
import json
import math

import gguf
import numpy as np
import pytest
import torch
from conftest import CHATML
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lorakit import LoraConfig, get_lora_model
from lorakit.export import gguf as export_gguf
from lorakit.export import ollama, write_gguf, write_gguf_lora, write_modelfile

VOCAB = 320  # = len(make_tokenizer())
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """2 layers, hidden 64, 4 heads of 16, 2 KV heads; intermediate 80 so ffn_down rows are not q8_0 blocks."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=arch == "llama_tied")
    common.update(overrides)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    else:
        config = {"qwen2": Qwen2Config, "mistral": MistralConfig}.get(arch, LlamaConfig)(**common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def interleave_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order written out index by index: new row h*d + 2i + s is old row h*d + s*d/2 + i."""
    d = w.shape[0] // n_head
    order = [h * d + s * d // 2 + i for h in range(n_head) for i in range(d // 2) for s in range(2)]
    return w[order]


def expected_tensors(model) -> dict[str, np.ndarray]:
    """The GGUF tensors llama.cpp's converter writes for this model, built with a name table of our own."""
    config, permute = model.config, model.config.model_type in ("llama", "mistral")
    out = {}
    for key, param in model.named_parameters():
        w = param.detach().float()
        if key == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
        elif key == "model.norm.weight":
            out["output_norm.weight"] = w
        elif key == "lm_head.weight":
            out["output.weight"] = w
        else:
            _, _, layer, rest = key.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            if permute and module == "self_attn.q_proj":
                w = interleave_rows(w, config.num_attention_heads)
            if permute and module == "self_attn.k_proj":
                w = interleave_rows(w, config.num_key_value_heads)
            out[f"blk.{layer}.{HF_TO_GGUF[module]}.{suffix}"] = w
    return {k: v.numpy() for k, v in out.items()}


def read(path) -> tuple[dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]], dict]:
    """name -> (dequantised array in numpy (rows, cols) order, stored type), and the metadata values."""
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: (gguf.quants.dequantize(t.data, t.tensor_type), t.tensor_type) for t in reader.tensors}
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return tensors, fields


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits


# ---------------------------------------------------------------- the merged model


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("arch", ["llama", "llama_tied", "qwen2"])
def test_every_tensor_equals_the_hf_weight(arch, quant, tokenizer, tmp_path):
    model = tiny_model(arch)
    report = write_gguf(model, tokenizer, tmp_path / "m.gguf", quant=quant)
    tensors, fields = read(tmp_path / "m.gguf")
    expected = expected_tensors(model)
    assert set(tensors) == set(expected) and report["tensors"] == len(expected)
    assert ("output.weight" in tensors) == (arch != "llama_tied")  # tied: llama.cpp reuses token_embd
    Q = gguf.GGMLQuantizationType
    for name, (got, qtype) in tensors.items():
        want = expected[name]
        if want.ndim == 1 or name.endswith("_norm.weight"):
            assert qtype == Q.F32 and np.array_equal(got, want), name
        elif quant == "f32":
            assert qtype == Q.F32 and np.array_equal(got, want), name
        elif quant == "f16" or (quant == "q8_0" and want.shape[1] % 32):  # ffn_down: 80-wide rows fall back
            assert qtype == Q.F16 and np.array_equal(got, want.astype(np.float16).astype(np.float32)), name
        elif quant == "bf16":
            assert qtype == Q.BF16 and np.array_equal(got, torch.from_numpy(want).bfloat16().float().numpy()), name
        else:
            assert qtype == Q.Q8_0, name
            np.testing.assert_allclose(got, want, rtol=0, atol=np.abs(want).max() / 127, err_msg=name)
    assert fields["general.file_type"] == {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[quant]
    assert report["bytes"] == (tmp_path / "m.gguf").stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary file left beside it


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_metadata(arch, tokenizer, tmp_path):
    model = tiny_model(arch, rms_norm_eps=1e-5, rope_theta=50000.0)
    write_gguf(model, tokenizer, tmp_path / "m.gguf", name="tiny")
    _, f = read(tmp_path / "m.gguf")
    a = arch
    assert f["general.architecture"] == a and f["general.name"] == "tiny" and f["general.type"] == "model"
    assert (f[f"{a}.context_length"], f[f"{a}.embedding_length"], f[f"{a}.block_count"]) == (128, 64, 2)
    assert (f[f"{a}.feed_forward_length"], f[f"{a}.attention.head_count"], f[f"{a}.attention.head_count_kv"]) == (
        80, 4, 2)
    assert f[f"{a}.rope.freq_base"] == 50000.0 and f[f"{a}.rope.dimension_count"] == 16
    assert f[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5) and f[f"{a}.vocab_size"] == VOCAB
    assert f"{a}.attention.key_length" not in f  # head_dim = hidden / heads: llama.cpp's default
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(VOCAB)))
    assert len(f["tokenizer.ggml.merges"]) > 0 and all(len(m.split(" ")) == 2 for m in f["tokenizer.ggml.merges"])
    specials = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    assert [f["tokenizer.ggml.token_type"][i] for i in specials] == [3, 3, 3]  # CONTROL
    assert f["tokenizer.ggml.token_type"][100] == 1  # NORMAL
    assert f["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id and "tokenizer.ggml.bos_token_id" not in f
    assert f["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.chat_template"] == CHATML


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("llama_tied", {}), ("qwen2", {}), ("mistral", {}),
                                            ("llama", {"head_dim": 8})])  # head_dim != hidden / heads
def test_transformers_loads_the_file_back_with_the_same_logits(arch, overrides, tokenizer, tmp_path):
    """transformers' GGUF loader un-permutes q/k and rebuilds config and tokenizer from our metadata alone."""
    model = tiny_model(arch, **overrides)
    write_gguf(model, tokenizer, tmp_path / "m.gguf", quant="f32")
    _, fields = read(tmp_path / "m.gguf")
    assert ("llama.attention.key_length" in fields) == ("head_dim" in overrides)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", attn_implementation="eager").eval()
    assert again.config.model_type == {"mistral": "llama", "llama_tied": "llama"}.get(arch, arch)  # llama.cpp's way
    assert again.config.tie_word_embeddings == (arch == "llama_tied")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "Hello there, what is 12345?<|im_end|> vpn.example"
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"] and tok.eos_token == "<|im_end|>"
    assert tok.chat_template == CHATML


def test_the_reload_check_catches_a_missing_permutation(tokenizer, tmp_path, monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(export_gguf, "permute_rotary", lambda w, n_head: w)
    write_gguf(model, tokenizer, tmp_path / "m.gguf", quant="f32")
    again = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", attn_implementation="eager").eval()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    assert (logits(again, ids) - logits(model, ids)).abs().max() > 1e-3


def rope_adjacent_pairs(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """ggml's "normal" rope (llama.cpp's llama): rotates (x[2i], x[2i+1]) by pos * theta^(-2i/d).  x: (heads, d)"""
    d = x.shape[-1]
    angle = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    even, odd = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.stack([even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()], dim=-1)
    return out.reshape(x.shape)


def test_permuted_weights_under_llama_cpp_rope_give_hf_attention_scores(tokenizer, tmp_path):
    """Independent of any loader: HF rotate-half rope on HF rows == llama.cpp pair rope on the file's rows."""
    model = tiny_model("llama").double()
    write_gguf(model, tokenizer, tmp_path / "m.gguf", quant="f32")
    tensors, _ = read(tmp_path / "m.gguf")
    attn, rotary = model.model.layers[1].self_attn, model.model.rotary_emb
    x = torch.randn(64, dtype=torch.float64)
    pos_q, pos_k, d = 7, 3, 16
    q_hf, k_hf = (attn.q_proj.weight @ x).view(1, 4, 1, d), (attn.k_proj.weight @ x).view(1, 2, 1, d)
    cos_q, sin_q = rotary(q_hf, torch.tensor([[pos_q]]))
    cos_k, sin_k = rotary(k_hf, torch.tensor([[pos_k]]))
    q_rot, _ = apply_rotary_pos_emb(q_hf, q_hf, cos_q, sin_q)
    _, k_rot = apply_rotary_pos_emb(k_hf, k_hf, cos_k, sin_k)
    wq, wk = (torch.tensor(tensors[f"blk.1.attn_{n}.weight"][0], dtype=torch.float64) for n in "qk")
    q_cpp = rope_adjacent_pairs((wq @ x).view(4, d), pos_q, 10000.0)
    k_cpp = rope_adjacent_pairs((wk @ x).view(2, d), pos_k, 10000.0)
    scores_hf = torch.einsum("hd,hd->h", q_rot[0, :, 0], k_rot[0, [0, 0, 1, 1], 0])  # GQA: 2 q heads per k head
    scores_cpp = torch.einsum("hd,hd->h", q_cpp, k_cpp[[0, 0, 1, 1]])
    torch.testing.assert_close(scores_cpp, scores_hf, rtol=1e-6, atol=1e-7)  # the file holds f32 weights
    assert not torch.allclose(torch.einsum("hd,hd->h", rope_adjacent_pairs(q_hf[0, :, 0], pos_q, 1e4),
                                           rope_adjacent_pairs(k_hf[0, [0, 0, 1, 1], 0], pos_k, 1e4)), scores_hf)


def test_rope_scaling(tokenizer, tmp_path):
    write_gguf(tiny_model(rope_scaling={"rope_type": "linear", "factor": 2.0}), tokenizer, tmp_path / "a.gguf")
    _, f = read(tmp_path / "a.gguf")
    assert f["llama.rope.scaling.type"] == "linear" and f["llama.rope.scaling.factor"] == 2.0
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    model = tiny_model(rope_scaling=llama3)
    write_gguf(model, tokenizer, tmp_path / "b.gguf")
    tensors, f = read(tmp_path / "b.gguf")
    factors, qtype = tensors["rope_freqs.weight"]
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")  # transformers' own llama3 frequencies
    plain = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    assert qtype == gguf.GGMLQuantizationType.F32 and "llama.rope.scaling.type" not in f
    np.testing.assert_allclose(factors, (plain / inv_freq).numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="rope scaling 'dynamic'"):
        write_gguf(tiny_model(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), tokenizer, tmp_path / "c.gguf")
    assert not (tmp_path / "c.gguf").exists()


def test_refusals_leave_no_file(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"model_type 'gpt2'; supported: llama, mistral, qwen2"):
        write_gguf(tiny_model("gpt2"), tokenizer, tmp_path / "g.gguf")
    with pytest.raises(ValueError, match="merge_and_unload"):
        write_gguf(get_lora_model(tiny_model(), LoraConfig(target_modules=["q_proj"])).model, tokenizer,
                   tmp_path / "l.gguf")
    with pytest.raises(ValueError, match="quant 'q4_0'"):
        write_gguf(tiny_model(), tokenizer, tmp_path / "q.gguf", quant="q4_0")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_export_leaves_the_old_file_and_no_part_file(tokenizer, tmp_path, monkeypatch):
    model = tiny_model()
    write_gguf(model, tokenizer, tmp_path / "m.gguf")
    before = (tmp_path / "m.gguf").read_bytes()
    encode, calls = export_gguf._Entry.encode, []

    def failing(entry):
        calls.append(entry.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return encode(entry)

    monkeypatch.setattr(export_gguf._Entry, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        write_gguf(tiny_model(seed=1), tokenizer, tmp_path / "m.gguf", quant="q8_0")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and (tmp_path / "m.gguf").read_bytes() == before


def test_sentencepiece_style_tokenizer_metadata(tmp_path):
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import PreTrainedTokenizerFast

    spm = SentencePieceUnigramTokenizer()
    spm.train_from_iterator(["the quick brown fox", "jumps over the lazy dog"] * 20, vocab_size=60,
                            special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=spm, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    write_gguf(tiny_model(vocab_size=len(tok) + 4), tok, tmp_path / "m.gguf", quant="f32")
    _, f = read(tmp_path / "m.gguf")
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_space_prefix"] is True
    assert f["tokenizer.ggml.token_type"][:3] == [2, 3, 3] and f["tokenizer.ggml.token_type"][-1] == 5  # UNUSED pad
    assert f["tokenizer.ggml.tokens"][-1] == f"[PAD{len(tok) + 3}]" and "tokenizer.ggml.merges" not in f
    unigram = json.loads(spm.to_str())["model"]["vocab"]  # [[piece, score], ...] in id order
    assert f["tokenizer.ggml.scores"][:len(tok)] == pytest.approx([score for _, score in unigram], rel=1e-6)


# ---------------------------------------------------------------- the adapter alone


def lora_model(arch="llama", **config):
    settings = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    settings.update(config)
    return get_lora_model(tiny_model(arch), LoraConfig(**settings))


def lora_layers(lm):
    for key, module in lm.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            yield key, module


@pytest.mark.parametrize("arch,config,alpha", [
    ("llama", {}, 8.0),
    ("qwen2", {}, 8.0),
    ("llama", {"use_rslora": True}, 8.0 * math.sqrt(4)),  # llama.cpp's alpha / r must equal alpha / sqrt(r)
    ("llama", {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}}, 8.0),  # folded into B
])
def test_lora_pairs_reproduce_the_delta_weights(arch, config, alpha, tmp_path):
    lm = lora_model(arch, **config)
    report = write_gguf_lora(lm, None, None, tmp_path / "a.gguf")
    tensors, f = read(tmp_path / "a.gguf")
    assert f["general.type"] == "adapter" and f["adapter.type"] == "lora" and f["general.architecture"] == arch
    assert f["adapter.lora.alpha"] == pytest.approx(alpha) and report["alpha"] == pytest.approx(alpha)
    layers = dict(lora_layers(lm))
    assert len(tensors) == 2 * len(layers) == report["tensors"]
    heads = {"q_proj": 4, "k_proj": 2} if arch == "llama" else {}
    for key, module in layers.items():
        _, _, layer, rest = key.split(".", 3)
        name = f"blk.{layer}.{HF_TO_GGUF[rest]}.weight"
        (a, _), (b, _) = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        r = module.r["default"]
        assert a.shape == (r, module.in_features) and b.shape == (module.out_features, r)
        delta = module.delta_weight("default")
        if rest.split(".")[-1] in heads:
            delta = interleave_rows(delta, heads[rest.split(".")[-1]])
        torch.testing.assert_close(torch.from_numpy(b @ a) * alpha / r, delta, rtol=1e-5, atol=1e-6)


def test_base_plus_lora_as_llama_cpp_applies_it_equals_the_merged_export(tokenizer, tmp_path):
    lm = lora_model()
    write_gguf(tiny_model(), tokenizer, tmp_path / "base.gguf", quant="f32")  # same seed: lm's base weights
    write_gguf_lora(lm, None, None, tmp_path / "a.gguf", quant="f16")
    write_gguf(lm.merge_and_unload(), tokenizer, tmp_path / "merged.gguf", quant="f32")
    base_t, _ = read(tmp_path / "base.gguf")
    lora_t, f = read(tmp_path / "a.gguf")
    merged_t, _ = read(tmp_path / "merged.gguf")
    assert {q for _, q in lora_t.values()} == {gguf.GGMLQuantizationType.F16}
    alpha = f["adapter.lora.alpha"]
    for name in {n.rsplit(".", 1)[0] for n in lora_t}:
        a, b = lora_t[f"{name}.lora_a"][0], lora_t[f"{name}.lora_b"][0]
        applied = base_t[name][0] + alpha / a.shape[0] * (b @ a)  # llama.cpp: W x + (alpha / r) B (A x)
        np.testing.assert_allclose(applied, merged_t[name][0], rtol=0, atol=2e-3, err_msg=name)  # f16 factors


def test_lora_from_directory_or_state_dict_matches_the_model(tmp_path):
    lm = lora_model()
    lm.save_pretrained(tmp_path / "adapter")
    write_gguf_lora(lm, None, None, tmp_path / "a.gguf")
    write_gguf_lora(tmp_path / "adapter", None, lm.model.config, tmp_path / "b.gguf")
    from lorakit import get_peft_model_state_dict

    write_gguf_lora(get_peft_model_state_dict(lm), lm.peft_config["default"], lm.model, tmp_path / "c.gguf")
    a, b, c = (read(tmp_path / f"{n}.gguf")[0] for n in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[k][0], b[k][0]) and np.array_equal(a[k][0], c[k][0]) for k in a)


@pytest.mark.parametrize("config,message", [
    ({"use_dora": True}, "DoRA"),
    ({"target_modules": ["embed_tokens", "q_proj"]}, "embedding adapter"),
    ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_lora_refusals(config, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        write_gguf_lora(lora_model(**config), None, None, tmp_path / "a.gguf")
    tied = get_lora_model(tiny_model("llama_tied"), LoraConfig(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="tied"):
        write_gguf_lora(tied, None, None, tmp_path / "a.gguf")
    with pytest.raises(ValueError, match="quant 'q8_0'"):
        write_gguf_lora(lora_model(), None, None, tmp_path / "a.gguf", quant="q8_0")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- Ollama


def render_go(template: str, messages: list[dict]) -> str:
    """Enough of Go's text/template for these TEMPLATEs: one range over .Messages using .Role and .Content."""
    head, rest = template.split("{{- range .Messages }}")
    body, tail = rest.split("{{ end }}", 1)
    assert head == "" and "{{" not in tail
    return "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])
                   for m in messages) + tail


def modelfile_parts(path) -> dict:
    text = path.read_text()
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    system = text.split('SYSTEM """', 1)[1].split('"""', 1)[0] if 'SYSTEM """' in text else None
    lines = text.splitlines()
    return {"from": lines[0], "template": template, "system": system, "lines": lines,
            "stops": [line.split(" ", 2)[2].strip('"') for line in lines if line.startswith("PARAMETER stop")]}


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "VPN address?"}]
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
DEFAULT_SYSTEM = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
                  "You are lorakit.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template,kind", [(CHATML, "chatml"), (LLAMA3, "llama3"), (DEFAULT_SYSTEM, "chatml")])
def test_modelfile_template_renders_like_the_chat_template(template, kind, tokenizer, tmp_path):
    tok = copy.copy(tokenizer)
    tok.chat_template = template
    (tmp_path / "m.gguf").write_bytes(b"")
    parts = modelfile_parts(write_modelfile(tmp_path / "m.gguf", tok))
    assert parts["from"] == "FROM ./m.gguf" and parts["template"] == ollama.CHAT_FORMATS[kind].template
    assert set(ollama.CHAT_FORMATS[kind].stops) <= set(parts["stops"]) and "<|im_end|>" in parts["stops"]
    reference = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert render_go(parts["template"], CONVERSATION) == reference.removeprefix(tok.bos_token or "")
    no_system = CONVERSATION[1:]
    if parts["system"] is not None:  # Ollama puts SYSTEM first when the request has no system message
        assert template == DEFAULT_SYSTEM and parts["system"] == "You are lorakit."
        no_system = [{"role": "system", "content": parts["system"]}] + no_system
    assert render_go(parts["template"], no_system) == tok.apply_chat_template(CONVERSATION[1:], tokenize=False,
                                                                              add_generation_prompt=True)


def test_modelfile_by_kind_with_adapter_in_another_directory(tmp_path):
    out = write_modelfile(tmp_path / "models" / "m.gguf", "generic", directory=tmp_path / "ollama",
                          adapter=tmp_path / "ollama" / "a.gguf")
    parts = modelfile_parts(out)
    assert out == tmp_path / "ollama" / "Modelfile"
    assert parts["lines"][:2] == ["FROM ../models/m.gguf", "ADAPTER ./a.gguf"] and parts["stops"] == ["\\nuser:"]
    with pytest.raises(ValueError, match="chat format 'alpaca'"):
        write_modelfile(tmp_path / "m.gguf", "alpaca")


# ---------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_smollm2_round_trip_against_the_reference_gguf(tmp_path):
    """Our f16 export of SmolLM2 matches llama.cpp's own file (metadata, q/k layout) and reloads with its logits."""
    from lorakit import models

    try:
        reference = models.default_gguf_path()
    except models.ModelError as exc:
        pytest.skip(str(exc))
    model, tok, _ = models.load_model(None, device="cpu")
    report = write_gguf(model, tok, tmp_path / "smol.gguf", quant="f16")
    assert report["tensors"] == 272 and report["bytes"] < 300e6
    ref, mine = gguf.GGUFReader(str(reference)), gguf.GGUFReader(str(tmp_path / "smol.gguf"))
    for key in ("llama.block_count", "llama.rope.freq_base", "llama.attention.head_count_kv", "tokenizer.ggml.pre",
                "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.add_bos_token", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert mine.fields[key].contents() == ref.fields[key].contents(), key
    ref_t, mine_t = {t.name: t for t in ref.tensors}, {t.name: t for t in mine.tensors}
    assert ref_t.keys() == mine_t.keys()
    for name in ("blk.0.attn_q.weight", "blk.29.attn_k.weight", "blk.7.ffn_down.weight"):  # llama.cpp's own layout
        want = gguf.quants.dequantize(ref_t[name].data, ref_t[name].tensor_type)
        np.testing.assert_allclose(np.asarray(mine_t[name].data, np.float32), want, rtol=1e-3, atol=1e-6)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="smol.gguf", dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")["input_ids"]
    torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=0.05)  # f16 weights
    parts = modelfile_parts(write_modelfile(tmp_path / "smol.gguf", tok))
    assert parts["system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
