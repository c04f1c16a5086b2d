"""The model directory, adapters and prompts that bench_generate.py and bench_load.py share.

The full benchmark uses the default model (SmolLM2-135M-Instruct, converted once and cached by lorakit) and eight
LoRA r=16 all-linear adapters with random (non-zero) B, saved in the PEFT format under the bench cache. --smoke
uses a 2-layer Llama saved from a config and a word-level tokenizer, so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from common import TARGETS, cache_dir

N_ADAPTERS = 8


def model_dir(smoke: bool) -> Path:
    if not smoke:
        from lorakit.models import resolve_model

        return Path(resolve_model(None))
    out = cache_dir() / "smoke-model"
    if (out / "config.json").is_file():
        return out
    from train_rows import tiny_model_and_tokenizer

    model, tokenizer = tiny_model_and_tokenizer()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def adapter_dirs(smoke: bool) -> list[Path]:
    """N_ADAPTERS adapters for the model of `model_dir(smoke)`, created once (seeded) and cached."""
    root = cache_dir() / ("smoke-adapters" if smoke else "adapters-r16")
    dirs = [root / f"a{i}" for i in range(N_ADAPTERS)]
    if all((d / "adapter_model.safetensors").is_file() for d in dirs):
        return dirs
    from lorakit import LoraConfig, get_lora_model
    from lorakit.models import load_model

    model, _, _ = load_model(str(model_dir(smoke)) if smoke else None, dtype="float32", device="cpu")
    lora = get_lora_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    for i, d in enumerate(dirs):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        lora.save_pretrained(d)
    return dirs


def prompts(tokenizer, smoke: bool, n: int = N_ADAPTERS) -> list[list[int]]:
    """n chat prompts from the demo's held-out questions (random ids for --smoke)."""
    if smoke:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(3, 200, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
                for _ in range(n)]
    records = json.loads(Path("demo/data/kb_heldout.json").read_text())[:n]
    return [tokenizer.apply_chat_template([{"role": "user", "content": r["instruction"]}], tokenize=True,
                                          add_generation_prompt=True, return_dict=False) for r in records]
