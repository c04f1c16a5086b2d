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


def tiny_config(arch: str):
    """A 2-layer model config of the given family, small enough for a CPU test to run in milliseconds."""
    from transformers import Gemma2Config, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, num_hidden_layers=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
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
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                          eos_token_id=2)
    raise ValueError(arch)


def make_model(arch: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="eager")
    return model.eval()


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (2, 12), generator=g)
