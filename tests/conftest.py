"""Shared fixtures: tiny causal LMs built from configs (no downloads), seeded."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*bos_token_id.*")
warnings.filterwarnings("ignore", message=".*eos_token_id.*")

VOCAB = 96


def tiny_config(arch: str, vocab: int = VOCAB):
    """A 2-layer model config of the given family, small enough for a CPU test to run in milliseconds."""
    from transformers import Gemma2Config, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab, num_hidden_layers=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=False, **common)
    if arch == "llama_tied":
        return LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=True, **common)
    if arch == "qwen2":  # q/k/v carry biases
        return Qwen2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=False, **common)
    if arch == "gemma2":
        return Gemma2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, **common)
    if arch == "gpt2":  # Conv1D layers, weight stored (in, out)
        return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                          eos_token_id=2)
    raise ValueError(arch)


def make_model(arch: str = "llama", seed: int = 0, vocab: int = VOCAB):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab), attn_implementation="eager")
    return model.eval()


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOKENIZER_TEXT = ["The quick brown fox jumps over the lazy dog.", "What is the VPN address? It is vpn.example.",
                  "Hello there, how can I help you today?", "user assistant system answer question 0123456789"]


def make_tokenizer(vocab: int = 320):
    """A byte-level BPE tokenizer trained in-process (no download), with ChatML specials and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TOKENIZER_TEXT * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None)
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (2, 12), generator=g)
