"""`lorakit eval`: score the base model and each adapter side by side on one data set.

    lorakit eval --adapter saves/kb --dataset data/heldout.jsonl --output results.json

Per model: the loss and perplexity of the reference answers (teacher forcing, every assistant turn) and scores of
greedy answers to the prompts: exact match, contains-the-answer (a record's "answer" field, a string or a list;
else the reference itself), ROUGE-L F1. Per adapter also, on general probes (`lorakit.retention`): retention, the
share of the probes the base answers right that the adapter still answers right, and the mean KL(base || adapter)
of the next-token distributions over the first 16 positions of the base's own greedy answers, teacher-forced.
The table goes to stdout (markdown), the details to the JSON file. The data set and the probe file are read before
any model loads, the data set in any format `lorakit train` reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..dtypes import DTYPE_NAMES, canonical_name
from ..files import write_file
from .arguments import ConfigError, run_command, say

USAGE = """usage: lorakit eval [CONFIG.yaml] [KEY=VALUE ...] [--adapter DIR | --adapter NAME=DIR ...] [--model M]
                    --dataset DATA [--dataset_dir DIR] [--max_samples N] [--output results.json]

Score the base model and each adapter on a data set: loss and perplexity of the reference answers, and greedy
answers scored by exact match, contains-the-answer and ROUGE-L. A markdown table goes to stdout; --output writes
everything (scores, answers, references) as JSON. Records may carry an "answer" field: the fact an answer must
contain (a string or a list of acceptable ones); without it the whole reference answer must appear.
With adapters, retention and KL against the base on 181 general probes are scored too (retention=false skips
them; retention_probes=FILE uses your own probes).

examples:
  lorakit eval --adapter saves/kb --dataset data/heldout.jsonl
  lorakit eval --adapter a=saves/a --adapter b=saves/b --dataset identity --dataset_dir data --max_samples 50 \\
      --output results.json

"""

FLAGS = {"--adapter": "adapter_name_or_path", "--adapters": "adapter_name_or_path", "--model": "model_name_or_path",
         "--output": "output", "--dtype": "infer_dtype"}
ALIASES = {k.removeprefix("--"): v for k, v in FLAGS.items()} | {
    "output_file": "output", "save_path": "output", "per_device_eval_batch_size": "batch_size",
    "eval_dataset": "dataset"}
DTYPES = ("auto", *DTYPE_NAMES)


@dataclass
class EvalArgs:
    """Settings of `lorakit eval`."""

    model_name_or_path: str | None = None
    """Base model (local HF directory, GGUF file, cached hub id). Empty: the adapters' base, else the default."""
    adapter_name_or_path: str | None = None
    """Adapters to score: a comma list of DIR or NAME=DIR (--adapter, repeatable)."""
    dataset: str | None = None
    """Data set(s) to score on, comma-separated: names in dataset_dir/dataset_info.json or file paths."""
    dataset_dir: str = "data"
    """Folder of dataset_info.json and of relative data paths."""
    max_samples: int | None = None
    """Use only the first N records of each data set."""
    template: str | None = None
    """Chat template: empty uses the adapter's training template, else the tokenizer's own; or a built-in name."""
    include_base: bool = True
    """Score the base model (no adapter) too, as the first row."""
    cutoff_len: int = 1024
    """Longest example (tokens) for the reference loss."""
    max_new_tokens: int = 64
    """Longest generated answer (greedy decoding)."""
    batch_size: int = 16
    """Prompts generated (and examples scored) at once."""
    output: str | None = None
    """Write the results here as JSON (scores per model, every answer, the references)."""
    infer_dtype: str = "float32"
    """Weights dtype: float32, bfloat16, float16, or auto."""
    device: str | None = None
    """cpu, cuda, ...; empty picks CUDA when present."""
    retention: bool = True
    """With adapters: also score, on general probes, the share of the probes the base answers right that each
    adapter still answers right, and the mean KL(base || adapter) over the first 16 positions of the base's answers
    (teacher-forced)."""
    retention_probes: str | None = None
    """Probe file for retention: a JSON list of {"prompt", "answer": keyword or [keywords]}; empty: lorakit's 181
    shipped probes (facts, arithmetic, language, simple instructions)."""

    def __post_init__(self) -> None:
        from ..data import DataError, check_template

        problems = []
        if not self.dataset:
            problems.append("dataset is required (--dataset FILE or a name in dataset_info.json)")
        for key in ("max_new_tokens", "batch_size", "cutoff_len"):
            if getattr(self, key) < 1:
                problems.append(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_samples is not None and self.max_samples < 1:
            problems.append(f"max_samples must be >= 1, got {self.max_samples}")
        if self.infer_dtype not in DTYPES:
            problems.append(f"infer_dtype must be one of {', '.join(DTYPES)}, got '{self.infer_dtype}'")
        if self.output and Path(self.output).is_dir():
            problems.append(f"output '{self.output}' is a directory; give a file name such as results.json")
        if not self.adapter_name_or_path and not self.include_base:
            problems.append("nothing to score: no adapter given and include_base is false")
        try:
            check_template(self.template)
        except DataError as exc:
            problems.append(f"template: {exc}")
        if problems:
            raise ConfigError(problems)


def run_eval(argv: list[str]) -> int:
    """`lorakit eval`: exit status 0 done, 1 bad input (data, files, model), 2 bad settings, 130 interrupted."""
    return run_command("eval", argv, EvalArgs, USAGE, FLAGS, ALIASES, evaluate_and_report, "aborted; nothing written")


def evaluate_and_report(args: EvalArgs) -> int:
    from ..evaluate import format_table

    report = evaluate(args)
    print(format_table(report["models"]))
    if args.output:
        write_file(Path(args.output), json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        say("eval", f"results written to {args.output}")
    return 0


def evaluate(args: EvalArgs) -> dict:
    """Read the data, load the model and adapters, score every model; returns the JSON report."""
    from ..data import DataError, encode_records, load_records
    from ..evaluate import evaluate_models, items_from_records
    from ..retention import load_probes
    from .chat import load_for_inference

    records = load_records(args.dataset, args.dataset_dir, "sft", args.max_samples)
    probes = load_probes(args.retention_probes) if args.retention else None  # checked before the model loads
    if not any("messages" in r for r in records):
        raise DataError(f"dataset {args.dataset!r} holds plain text; lorakit eval needs conversations "
                        f"(prompts with reference answers)")
    items = items_from_records([r for r in records if "messages" in r])
    if not items:
        raise DataError(f"dataset {args.dataset!r}: no record ends with an assistant answer to score")
    dtype = canonical_name(args.infer_dtype)
    model, tokenizer, template, stop_ids, plan = load_for_inference(
        "eval", args.adapter_name_or_path, args.model_name_or_path, args.template, dtype, args.device)
    examples, _ = encode_records([r for r in records if "messages" in r], tokenizer, template, args.cutoff_len)
    names = (["__base__"] if args.include_base or not plan.names else []) + plan.names
    rows = evaluate_models(model, tokenizer, names, items, examples, args.max_new_tokens, args.batch_size,
                           render=template.prompt_ids, stop_ids=stop_ids,
                           on_model=lambda name: say("eval", f"scoring {name} on {len(items)} prompts"))
    if probes and plan.names:
        add_retention(rows, model, tokenizer, probes, template, stop_ids, args)
    dirs = {name: str(path) for name, path in plan.pairs}
    for row in rows:
        row["adapter_dir"] = dirs.get(row["model"])
    return {"dataset": args.dataset, "base_model": plan.base or "default", "template": plan.template or "default",
            "n": len(items), "max_new_tokens": args.max_new_tokens, "models": rows,
            "items": [{"prompt": it.prompt[-1]["content"] if it.prompt else "", "reference": it.reference,
                       "expected": it.answers} for it in items]}


def add_retention(rows: list[dict], model, tokenizer, probes, template, stop_ids: set[int], args: EvalArgs) -> None:
    """Retention and KL of every adapter row against the base's greedy answers to the probes (computed once)."""
    from ..retention import ask, retention_of

    say("eval", f"retention: the base answers {len(probes)} general probes")
    base = ask(model, tokenizer, probes, "__base__", template.prompt_ids, stop_ids, batch_size=args.batch_size)
    for row in rows:
        if row["model"] == "__base__":
            row["probe_score"] = base.score
            continue
        say("eval", f"retention: {row['model']} answers them")
        kept, answers = retention_of(model, tokenizer, row["model"], base, probes, template.prompt_ids, stop_ids,
                                     batch_size=args.batch_size)
        row.update(kept)
        row["probe_answers"] = answers.texts
