"""Tiny models and trained adapters on disk, shared by the chat / eval / merge command tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import make_tokenizer, tiny_config

FACTS = [("What is the VPN address?", "It is vpn.example.", "vpn.example"),
         ("Who can help you today?", "Hello there, I can help you today.", "help you today"),
         ("Say some digits.", "0123456789", "0123456789")]


def save_tiny_model(directory: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """A 2-layer model of `arch` with the test tokenizer, saved with save_pretrained (as a user's base would be)."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer()
    config = tiny_config(arch, vocab=len(tokenizer))
    for key, value in overrides.items():
        setattr(config, key, value)
    config.pad_token_id, config.eos_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, None
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def train_setup(root: Path, facts: list[tuple[str, str]], repeat: int) -> Path:
    """`root/model` (a tiny Llama saved as a user's base would be) and `root/data.jsonl`: the question/answer pairs
    as alpaca records, `repeat` times over; returns root."""
    save_tiny_model(root / "model")
    records = [{"instruction": q, "input": "", "output": a} for q, a in facts * repeat]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def write_facts(path: Path, with_answer: bool = True) -> Path:
    """The facts as alpaca records; `answer` holds the fact an answer must contain."""
    rows = [{"instruction": q, "input": "", "output": a, **({"answer": f} if with_answer else {})}
            for q, a, f in FACTS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_adapter(model_dir: Path, data: Path, out: Path, *extra: str) -> Path:
    """`lorakit train` on the tiny model (Python API): a real output dir with training_args.yaml."""
    from lorakit.train import load_config, train

    config, _ = load_config(None, [f"model_name_or_path={model_dir}", f"dataset={data}", f"output_dir={out}",
                                   "learning_rate=2e-2", "per_device_train_batch_size=3", "logging_steps=100",
                                   "lora_target=all", "plot_loss=false", *extra])
    train(config)
    return out


def random_adapter(model_dir: Path, out: Path, seed: int = 0, scale: float = 0.05, **config) -> tuple[Path, object]:
    """An adapter made with lorakit's API and moved away from its initial value (a stand-in for training), saved
    to `out`; returns (out, the LoraModel it came from)."""
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, get_lora_model

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    settings = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "base_model_name_or_path": str(model_dir)}
    lm = get_lora_model(base, LoraConfig(**{**settings, **config}))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * scale)
    lm.save_pretrained(out)
    return out, lm
