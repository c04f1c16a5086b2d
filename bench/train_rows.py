"""One training row of bench_train.py, run in its own process: lorakit or PEFT + transformers on the same examples.

Both implementations see the same 16 examples per optimizer step in the same order, start from the same LoRA
weights (A seeded per layer by name, B zero), use AdamW (lr 2e-4, no weight decay), clip at 1.0, and divide the
step's summed loss by the step's label tokens (what the HF Trainer does with `num_items_in_batch`). They differ
only in how the step is computed:

- peft: `get_peft_model`, micro-batches of 4 padded to the longest by `DataCollatorForSeq2Seq`, the model's own
  loss over full (B, T, vocab) logits; in the bf16 pair the model is loaded in bf16 as LLaMA-Factory does with
  `bf16: true` (PEFT keeps the adapters in fp32), under the same autocast.
- lorakit: `get_lora_model`, the step's examples packed into rows of <= cutoff_len tokens (one row per
  micro-batch, no padding inside a row), attention run per example inside a row (`use_cpu_attention`), the
  output head only on label tokens in chunks (`causal_lm_loss`), and under bf16 autocast the frozen base weights
  kept in bf16 (`store_frozen_base`), and token counts rounded up to a few sizes (`shape_bucket`).
"""

from __future__ import annotations

import contextlib
import json
import time
import zlib

import torch
from common import TARGETS, alpaca_en_demo, peak_rss_mb

IGNORE = -100
LR = 2e-4


# ---------------------------------------------------------------- model and data


def tiny_model_and_tokenizer():
    """A 2-layer Llama and a word-level tokenizer built in-process, for --smoke (no download)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = 256
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<pad>")),
                                        pad_token="<pad>", eos_token="</s>")
    return model, tokenizer


def synthetic_examples(n: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(8, 48, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * (length // 2) + ids[length // 2:]})
    return out


def dataset_examples(name: str, tokenizer, cutoff_len: int) -> list[dict]:
    from lorakit.data.encode import encode_records
    from lorakit.data.formats import detect_format, normalize
    from lorakit.data.templates import get_template

    path = "demo/data/kb_train.json" if name == "demo" else str(alpaca_en_demo())
    records = json.loads(open(path).read())
    fmt = detect_format(records[0], "sft", path)
    records = [normalize(r, fmt, path) for r in records]
    examples, _ = encode_records(records, tokenizer, get_template(None, tokenizer), cutoff_len=cutoff_len,
                                 train_on_prompt=False, stage="sft")
    return examples


def split(examples: list[dict], n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle: the first n_train train, the next n_eval evaluate (the same in every row)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(1234)).tolist()
    picked = [examples[i] for i in order]
    return picked[:n_train], picked[n_train:n_train + n_eval]


def seed_lora_weights(model: torch.nn.Module) -> None:
    """Kaiming-uniform A from a generator seeded by the layer's name, B zero: the same start in both rows."""
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        key = name.removeprefix("base_model.model.")
        with torch.no_grad():
            if "lora_A" in key:
                bound = 1 / p.shape[1] ** 0.5  # kaiming_uniform_(a=sqrt(5)) on an (r, in) weight
                g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
            else:
                p.zero_()


def model_flops(model: torch.nn.Module, examples: list[dict]) -> float:
    """Model FLOPs of one training pass over `examples`, the same formula for both rows (DESIGN.md):
    per token 4 N_body + 6 N_lora + 12 L S H (frozen base, S the example's own length), plus the output head
    4 V H at label tokens only (the only positions whose logits the loss needs)."""
    cfg = model.config
    n_body = n_lora = 0
    for name, p in model.named_parameters():
        if p.dim() != 2 or "embed" in name or "lm_head" in name:
            continue
        if "lora_" in name:
            n_lora += p.numel()
        else:
            n_body += p.numel()
    L, H, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    total = 0.0
    for e in examples:
        n = len(e["input_ids"])
        labels = sum(1 for t in e["labels"][1:] if t != IGNORE)
        total += n * (4 * n_body + 6 * n_lora) + 12 * L * H * n * n + labels * 4 * V * H
    return total


def label_count(examples: list[dict]) -> int:
    return sum(sum(1 for t in e["labels"][1:] if t != IGNORE) for e in examples)


# ---------------------------------------------------------------- the two implementations


class PeftImpl:
    def __init__(self, model, tokenizer, spec: dict) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import DataCollatorForSeq2Seq

        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
        self.model = get_peft_model(model, config)
        self.collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE,
                                               return_tensors="pt")
        self.micro = spec["micro_batch"]

    def micro_batches(self, examples: list[dict]):
        for i in range(0, len(examples), self.micro):
            yield self.collator([{"input_ids": e["input_ids"], "labels": e["labels"]}
                                 for e in examples[i:i + self.micro]])

    def step_loss(self, batch: dict, n_labels: int) -> torch.Tensor:
        return self.model(**batch, num_items_in_batch=torch.tensor(n_labels)).loss

    def eval_loss_sum(self, examples: list[dict]) -> float:
        batch = self.collator([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        logits = self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, T, V)
        return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                       batch["labels"][:, 1:].flatten(), reduction="sum"))


class LorakitImpl:
    def __init__(self, model, tokenizer, spec: dict) -> None:
        from lorakit import LoraConfig, get_lora_model
        from lorakit.device import shape_bucket

        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
        self.model = get_lora_model(model, config).get_base_model()
        self.pad_id = tokenizer.pad_token_id
        self.cutoff, self.packing, self.micro = spec["cutoff_len"], spec.get("packing", True), spec["micro_batch"]
        # CPU: one packed row per micro-batch (more rows add memory, not speed); GPU: as many rows as PEFT's
        # micro-batch has sequences, since a small model there is bound by kernel launches per forward
        self.rows_per_batch = spec["micro_batch"] if spec.get("device", "cpu") != "cpu" else 1
        # as the trainer does: on a CPU in bf16, token counts rounded up to few shapes (see lorakit.device)
        amp = torch.bfloat16 if spec["precision"] == "bf16" else None
        self.round_width = shape_bucket(spec.get("device", "cpu"), amp)
        if self.packing and spec.get("packed_attention", True):
            from lorakit.train.attention import use_cpu_attention

            use_cpu_attention(self.model)

    def micro_batches(self, examples: list[dict]):
        from lorakit.data import collate_packed, pack_examples, pad_collate

        if not self.packing:
            for i in range(0, len(examples), self.micro):
                yield pad_collate(examples[i:i + self.micro], self.pad_id, round_width=self.round_width)
            return
        rows = pack_examples(examples, self.cutoff)
        for i in range(0, len(rows), self.rows_per_batch):
            yield collate_packed(rows[i:i + self.rows_per_batch], self.pad_id, round_width=self.round_width)

    def step_loss(self, batch: dict, n_labels: int) -> torch.Tensor:
        from lorakit.train.loss import causal_lm_loss

        loss_sum, _ = causal_lm_loss(self.model, batch)
        return loss_sum / n_labels

    def eval_loss_sum(self, examples: list[dict]) -> float:
        from lorakit.data import pad_collate
        from lorakit.train.loss import causal_lm_loss

        batch = pad_collate(examples, self.pad_id, round_width=self.round_width)
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        return float(causal_lm_loss(self.model, batch)[0])


# ---------------------------------------------------------------- the row


def run(spec: dict, t_start: float) -> dict:
    """Train spec["steps"] optimizer steps of spec["seqs_per_step"] examples; measure and evaluate."""
    torch.manual_seed(0)
    device = torch.device(spec.get("device", "cpu"))
    if spec["smoke"]:
        model, tokenizer = tiny_model_and_tokenizer()
        examples = synthetic_examples(200, model.config.vocab_size)
    elif spec.get("random_init"):  # the architecture and tokenizer of a model folder, weights drawn at random
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(spec["random_init"])
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(spec["random_init"])
        examples = dataset_examples(spec["data"], tokenizer, spec["cutoff_len"])
    else:
        from lorakit.models import load_model

        model, tokenizer, _ = load_model(None, dtype="float32")
        examples = dataset_examples(spec["data"], tokenizer, spec["cutoff_len"])
    model.to(device)
    per_step, steps = spec["seqs_per_step"], spec["steps"]
    train_ex, eval_ex = split(examples, per_step * steps, spec["eval_examples"])
    if spec["impl"] == "peft" and spec["precision"] == "bf16":
        model.to(torch.bfloat16)  # LLaMA-Factory loads the model in its compute dtype; PEFT keeps adapters fp32
    impl = (LorakitImpl if spec["impl"] == "lorakit" else PeftImpl)(model, tokenizer, spec)  # peft, peft_fp32base
    seed_lora_weights(impl.model)
    amp = torch.bfloat16 if spec["precision"] == "bf16" else None
    if spec["impl"] == "lorakit" and amp is not None and spec.get("bf16_base", True):
        from lorakit.train.precision import store_frozen_base

        store_frozen_base(impl.model, amp)
    model.train()
    params = [p for p in impl.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else contextlib.nullcontext
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, losses, first_step = [], [], None
    for step in range(steps):
        group = train_ex[step * per_step:(step + 1) * per_step]
        n_labels = label_count(group)
        t0 = time.perf_counter()
        total = 0.0
        for batch in impl.micro_batches(group):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                loss = impl.step_loss(batch, n_labels)
            loss.backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(total)
        if first_step is None:
            first_step = time.perf_counter() - t_start
    model.eval()
    with torch.no_grad(), autocast():
        eval_sum = sum(impl.eval_loss_sum(eval_ex[i:i + 8]) for i in range(0, len(eval_ex), 8))
    measured = range(1, steps) if steps > 1 else range(steps)  # the first step warms up allocator and caches
    seconds = sum(times[i] for i in measured)
    tokens = sum(len(e["input_ids"]) for i in measured for e in train_ex[i * per_step:(i + 1) * per_step])
    flops = sum(model_flops(impl.model, train_ex[i * per_step:(i + 1) * per_step]) for i in measured)
    gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {**spec, "tokens_per_s": tokens / seconds, "step_s": [round(t, 3) for t in times],
            "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": gpu_mb, "first_step_s": first_step, "train_losses": losses,
            "eval_loss": eval_sum / label_count(eval_ex), "model_gflops_per_s": flops / seconds / 1e9,
            "threads": torch.get_num_threads()}
