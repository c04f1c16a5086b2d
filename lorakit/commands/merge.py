"""`lorakit merge` (alias `export`): adapters folded into their base, written as a standalone model.

    lorakit export merge.yaml adapter_name_or_path=saves/kb output_dir=saves/merged     # seed 000's line
    lorakit merge --adapter saves/kb --export_dir out --format gguf --quant q8_0
    lorakit merge --adapters a=saves/a,b=saves/b --weights 0.7,0.3 --combination svd --export_dir out

Formats: `hf` (safetensors shards + config + tokenizer + generation config; reloaded after writing and its logits
compared with the adapter model), `gguf` (one llama.cpp / Ollama file + Modelfile), `gguf-lora` (the adapter
alone for `llama-cli --lora`, + a Modelfile with FROM base and ADAPTER). Several adapters are combined into one
first (`weights`, `combination_type`; without weights each counts 1, i.e. their deltas add up, which is what
merging them one after another gives). Every check runs before the model loads; the export directory appears
only when complete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..dtypes import DTYPE_NAMES
from ..lora.combine import COMBINATIONS, FACTORED
from .arguments import ConfigError, run_command, say

USAGE = """usage: lorakit merge [CONFIG.yaml] [KEY=VALUE ...] [--adapter DIR | --adapter NAME=DIR ...] [--model M]
                     --export_dir DIR [--format hf|gguf|gguf-lora] [--quant f32|f16|bf16|q8_0]
                     [--weights W1,W2 --combination linear|cat|svd|ties|dare_linear|dare_ties|magnitude_prune
                      --density D --svd_rank R] [--export_dtype fp32|bf16|fp16] [--export_size GB] [--overwrite]
       lorakit export ...   (the same command, LLaMA-Factory's name)

Merge adapters into their base model and write a standalone model that needs no lorakit:
  hf         safetensors shards, config, tokenizer (with chat template), generation config; reloaded with plain
             transformers and its logits compared with the adapter model (fails above export_tolerance)
  gguf       one GGUF file for llama.cpp / Ollama (Llama, SmolLM, Mistral, Qwen2) and an Ollama Modelfile
  gguf-lora  the adapter alone as a llama.cpp LoRA GGUF (llama-cli -m base.gguf --lora adapter.gguf) and a
             Modelfile (FROM the base, ADAPTER the file)
A non-empty export_dir is refused unless overwrite_output_dir=true (--overwrite).

examples:
  lorakit export merge.yaml adapter_name_or_path=saves/kb output_dir=saves/merged
  lorakit merge --adapter saves/kb --export_dir out/kb-gguf --format gguf --quant q8_0
  lorakit merge --adapters a=saves/a,b=saves/b --weights 0.7,0.3 --combination svd --svd_rank 16 --export_dir out

"""

FLAGS = {"--adapter": "adapter_name_or_path", "--adapters": "adapter_name_or_path", "--model": "model_name_or_path",
         "--format": "export_format", "--quant": "export_quant", "--combination": "combination_type",
         "--dtype": "export_dtype", "--overwrite": "overwrite_output_dir", "--output_dir": "export_dir"}
ALIASES = {k.removeprefix("--"): v for k, v in FLAGS.items()}
FORMATS = ("hf", "gguf", "gguf-lora")
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0")
DTYPES = tuple(DTYPE_NAMES)
DENSITY_TYPES = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
MERGED = "merged"  # name of the combined adapter
# fp32 rounding alone moves SmolLM2-135M's logits by ~1e-4 between W x + s B A x and (W + s B A) x over 30 layers
# (tiny test models: ~1e-6); a wrong merge moves them by 1e-1 and more.
FP32_TOLERANCE = 1e-3


@dataclass
class MergeArgs:
    """Settings of `lorakit merge` / `lorakit export` (LLaMA-Factory's export keys where they exist)."""

    UNSUPPORTED: ClassVar[dict] = {
        "export_quantization_bit": (None, "GPTQ export is not supported; use --format gguf --quant q8_0"),
        "export_quantization_dataset": (None, "GPTQ export is not supported"),
        "export_hub_model_id": (None, "lorakit never uploads; push the export_dir yourself"),
        "quantization_bit": (None, "merge onto the unquantized base: drop quantization_bit"),
    }

    model_name_or_path: str | None = None
    """Base model. Empty: the adapters' base (adapter_config.json / training_args.yaml), else the default."""
    adapter_name_or_path: str | None = None
    """Adapter directories: a comma list of DIR or NAME=DIR (--adapter repeatable, --adapters a,b)."""
    template: str | None = None
    """Chat template the model was tuned with (empty: the adapter's training_args.yaml template, else the
    tokenizer's own). A built-in name (chatml, llama3, ...) becomes the exported tokenizer's chat template."""
    export_dir: str | None = None
    """Where to write (alias output_dir). Required."""
    export_format: str = "hf"
    """hf, gguf or gguf-lora (--format)."""
    export_quant: str | None = None
    """GGUF tensor type (--quant): f32, f16, bf16, q8_0; default f16 (gguf) or f32 (gguf-lora: f32 or f16)."""
    export_size: float = 5.0
    """Largest safetensors shard, in GB (hf)."""
    export_dtype: str = "float32"
    """Weights dtype of the hf export: float32, bfloat16, float16 (also fp32, bf16, fp16)."""
    export_device: str = "cpu"
    """Device to merge on: cpu, cuda, or auto (CUDA when present)."""
    export_legacy_format: bool = False
    """true would mean .bin weights; lorakit writes safetensors only, so only false is accepted."""
    export_tolerance: float | None = None
    """Largest max |logits diff| between the written hf model and the adapter model before the export is
    refused; default 1e-3 for float32 (rounding alone gives ~1e-4 on a 30-layer model), report only for
    bfloat16/float16."""
    weights: str | None = None
    """Weight of each adapter, comma list in adapter order (default 1 each)."""
    combination_type: str = "cat"
    """How several adapters combine (PEFT's add_weighted_adapter): cat (exact weighted sum of deltas), linear,
    svd, ties, dare_linear, dare_ties, magnitude_prune, and *_svd variants."""
    density: float | None = None
    """Share of entries kept, in (0, 1]: needed by ties, dare_*, magnitude_prune."""
    svd_rank: int | None = None
    """Rank of an svd combination (default: the largest adapter rank)."""
    seed: int = 0
    """Seed for the random drops of dare_* combinations."""
    overwrite_output_dir: bool = False
    """Replace a non-empty export_dir (--overwrite)."""

    def __post_init__(self) -> None:
        problems = self._format_problems() + self._combination_problems()
        if not self.export_dir:
            problems.append("export_dir is required (alias output_dir): where to write the merged model")
        if self.export_size <= 0:
            problems.append(f"export_size must be > 0 (GB per shard), got {self.export_size}")
        if self.export_dtype not in DTYPES:
            problems.append(f"export_dtype must be one of {', '.join(DTYPES)}, got '{self.export_dtype}'")
        if self.export_legacy_format:
            problems.append("export_legacy_format: .bin weights are not supported; lorakit writes safetensors, "
                            "which every current loader reads (set export_legacy_format: false)")
        if not (self.export_device in ("cpu", "auto") or self.export_device.startswith("cuda")):
            problems.append(f"export_device must be cpu, cuda or auto, got '{self.export_device}'")
        if problems:
            raise ConfigError(problems)

    def _format_problems(self) -> list[str]:
        problems = []
        if self.export_format not in FORMATS:
            return [f"export_format must be one of {', '.join(FORMATS)}, got '{self.export_format}'"]
        quants = {"hf": (), "gguf": GGUF_QUANTS, "gguf-lora": ("f32", "f16")}[self.export_format]
        if self.export_quant is not None and self.export_quant not in quants:
            allowed = f"one of {', '.join(quants)}" if quants else "not used (it is for gguf); use export_dtype"
            problems.append(f"export_quant for {self.export_format} is {allowed}, got '{self.export_quant}'")
        if self.export_format == "gguf-lora" and not self.adapter_name_or_path:
            problems.append("gguf-lora exports an adapter: adapter_name_or_path is required")
        return problems

    def _combination_problems(self) -> list[str]:
        problems = []
        kind = self.combination_type
        if kind not in COMBINATIONS:
            problems.append(f"combination_type '{kind}' is unknown; choose from {', '.join(COMBINATIONS)}")
        if kind.removesuffix("_svd") in DENSITY_TYPES and (self.density is None or not 0 < self.density <= 1):
            problems.append(f"combination_type {kind} needs density in (0, 1], got {self.density}")
        if self.svd_rank is not None and self.svd_rank < 1:
            problems.append(f"svd_rank must be >= 1, got {self.svd_rank}")
        if self.weights is None:
            return problems
        try:
            weights = self.weight_values()
        except ValueError:
            return problems + [f"weights must be a comma list of numbers, got '{self.weights}'"]
        n = len(self.adapter_specs())
        if len(weights) != n:
            problems.append(f"weights: {len(weights)} weight(s) for {n} adapter(s) in adapter_name_or_path")
        elif not all(math.isfinite(w) for w in weights) or sum(weights) <= 0:
            problems.append(f"weights {self.weights} must be finite with a positive sum (all zero or a negative "
                            f"sum would remove the adapters rather than merge them)")
        return problems

    def adapter_specs(self) -> list[str]:
        return [s.strip() for s in (self.adapter_name_or_path or "").split(",") if s.strip()]

    def weight_values(self) -> list[float]:
        if self.weights is None:
            return [1.0] * len(self.adapter_specs())
        return [float(w) for w in str(self.weights).split(",") if w.strip()]

    @property
    def quant(self) -> str:
        return self.export_quant or ("f32" if self.export_format == "gguf-lora" else "f16")


def run_merge(argv: list[str], job: str = "merge") -> int:
    """`lorakit merge`: exit status 0 done, 1 bad input (files, model, export), 2 bad settings, 130 interrupted."""
    usage = USAGE.replace("lorakit merge", f"lorakit {job}", 1)
    return run_command(job, argv, MergeArgs, usage, FLAGS, ALIASES, lambda args: merge_and_report(args, job),
                       "aborted; nothing written")


def merge_and_report(args: MergeArgs, job: str) -> int:
    say(job, describe(merge(args, job)))
    return 0


def merge(args: MergeArgs, job: str = "merge") -> dict:
    """Check everything, load, combine, merge and write; returns a report of what was written."""
    from ..adapters import load_adapters, plan_adapters
    from ..export.staging import check_destination
    from ..models import load_model, resolve_model

    plan = plan_adapters(args.adapter_specs(), args.model_name_or_path, args.template)
    if len(plan.names) > 1 and any(c.use_dora for c in plan.configs.values()):
        raise ValueError("DoRA adapters cannot be combined with others (their magnitude vectors do not add); "
                         "merge one DoRA adapter at a time")
    _check_ranks(plan.configs, args)
    check_destination(args.export_dir, args.overwrite_output_dir)
    path = resolve_model(plan.base)
    if args.export_format != "hf":
        _check_gguf_architecture(path)
    device = _device(args.export_device)
    say(job, f"loading {plan.base or 'the default model'} ({path}) on {device}")
    model, tokenizer, _ = load_model(plan.base, dtype="float32", device=device)
    _use_template(tokenizer, plan.template, job)
    lora = load_adapters(model, plan.pairs)
    name = combine(lora, plan.names, args, job)
    if args.export_format == "gguf-lora":
        return export_gguf_lora(lora, name, tokenizer, plan, path, args)
    return export_merged(lora, name, tokenizer, plan, args)


def _check_ranks(configs: dict, args: MergeArgs) -> None:
    """linear / ties / dare_* / magnitude_prune combine A's and B's entry by entry: equal ranks needed."""
    ranks = {name: max([c.r, *c.rank_pattern.values()]) for name, c in configs.items()}
    needs_combining = len(ranks) > 1 or args.weights is not None
    if needs_combining and args.combination_type in FACTORED and len(set(ranks.values())) > 1:
        shown = ", ".join(f"{n}: r={r}" for n, r in ranks.items())
        raise ValueError(f"combination_type {args.combination_type} needs adapters of equal rank ({shown}); "
                         f"use cat or svd")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"export_device '{name}': CUDA is not available here; use export_device=cpu")
    return name


def _check_gguf_architecture(path: Path) -> None:
    """An unsupported architecture fails here, before any weight loads."""
    from transformers import AutoConfig

    from ..export.gguf import Hparams

    Hparams.from_config(AutoConfig.from_pretrained(path, local_files_only=True))


def combine(lora, names: list[str], args: MergeArgs, job: str) -> str | None:
    """The adapter to merge: the only one, or the weighted combination of several (None: no adapter)."""
    import torch

    if not names:
        return None
    weights = args.weight_values()
    if len(names) == 1 and weights == [1.0]:
        return names[0]
    torch.manual_seed(args.seed)  # dare_* drop entries at random
    lora.add_weighted_adapter(names, weights, MERGED, combination_type=args.combination_type,
                              svd_rank=args.svd_rank, density=args.density)
    lora.set_adapter(MERGED)
    shown = ", ".join(f"{n} x {w:g}" for n, w in zip(names, weights))
    say(job, f"combined {shown} ({args.combination_type}) into one adapter")
    return MERGED


def export_merged(lora, name: str | None, tokenizer, plan, args: MergeArgs) -> dict:
    """hf or gguf: merge the adapter into the base, then write."""
    from ..export.hf import export_hf, logits_on, parse_dtype, probe_ids

    model = lora
    probe, reference = None, None
    if args.export_format == "hf":
        probe = probe_ids(lora.get_input_embeddings().weight.shape[0])
        reference = logits_on(lora, probe)  # the adapter model, unmerged
    if name is not None:
        model = lora.merge_and_unload(adapter_names=[name])
    model.name_or_path = model.config.name_or_path = str(plan.base or "default")
    if args.export_format == "gguf":
        return export_gguf_model(model, tokenizer, plan, args)
    dtype = parse_dtype(args.export_dtype)
    tolerance = args.export_tolerance
    if tolerance is None and dtype == parse_dtype("float32"):
        tolerance = FP32_TOLERANCE
    report = export_hf(model, tokenizer, args.export_dir, dtype, args.export_size, reference, probe,
                       overwrite=args.overwrite_output_dir, tolerance=tolerance)
    return {**report, "format": "hf", "adapters": plan.names, "tolerance": tolerance}


def _use_template(tokenizer, template: str | None, job: str) -> None:
    """A model tuned with a built-in template is exported with that template as its tokenizer's chat template."""
    from ..data import check_template, get_template
    from ..export.chat_template import builtin_chat_template

    if check_template(template) is None:
        return
    tokenizer.chat_template = builtin_chat_template(get_template(template, tokenizer))
    say(job, f"chat template: built-in '{template}' (the one the adapter was tuned with)")


def export_gguf_model(model, tokenizer, plan, args: MergeArgs) -> dict:
    from ..export.gguf import write_gguf
    from ..export.ollama import write_modelfile
    from ..export.staging import staged_directory

    out = Path(args.export_dir)
    with staged_directory(out, args.overwrite_output_dir) as tmp:
        report = write_gguf(model, tokenizer, tmp / "model.gguf", quant=args.quant, name=out.name)
        write_modelfile(tmp / "model.gguf", tokenizer, directory=tmp)
    return {**report, "path": str(out / "model.gguf"), "format": "gguf", "adapters": plan.names,
            "export_dir": str(out), "files": ["Modelfile", "model.gguf"]}


def export_gguf_lora(lora, name: str, tokenizer, plan, base_path: Path, args: MergeArgs) -> dict:
    """The adapter alone + a Modelfile whose FROM is the base (its GGUF when it came as one, else its directory)."""
    from ..export.gguf import write_gguf_lora
    from ..export.ollama import write_modelfile
    from ..export.staging import staged_directory

    out = Path(args.export_dir)
    base_file = _base_gguf(plan.base) or base_path
    with staged_directory(out, args.overwrite_output_dir) as tmp:
        report = write_gguf_lora(lora, None, None, tmp / "adapter.gguf", adapter_name=name, quant=args.quant)
        modelfile = write_modelfile(base_file, tokenizer, directory=tmp,
                                    adapter=tmp / "adapter.gguf")
        text = modelfile.read_text().splitlines()
        text[0] = f"FROM {Path(base_file).resolve()}"  # absolute: the base does not move with export_dir
        modelfile.write_text("\n".join(text) + "\n")
    return {**report, "path": str(out / "adapter.gguf"), "format": "gguf-lora", "adapters": plan.names,
            "export_dir": str(out), "files": ["Modelfile", "adapter.gguf"], "base": str(base_file)}


def _base_gguf(base: str | None) -> Path | None:
    from ..models import DEFAULT_MODEL, ModelError, default_gguf_path

    if base is None or base.lower() in ("default", DEFAULT_MODEL.lower()):
        try:
            return default_gguf_path()
        except ModelError:
            return None
    path = Path(base).expanduser()
    return path if path.suffix.lower() == ".gguf" and path.is_file() else None


def describe(report: dict) -> str:
    size = report.get("bytes", 0) / 1e6
    where = report.get("export_dir") or report.get("path")
    text = f"wrote {report['format']} ({size:.1f} MB) to {where}"
    if report.get("adapters"):
        text += f" from adapter(s) {', '.join(report['adapters'])}"
    if "max_abs_diff" in report:
        limit = report.get("tolerance")
        bound = f" (tolerance {limit:.0e})" if limit is not None else ""
        text += f"; max |logits diff| vs the adapter model: {report['max_abs_diff']:.2e}{bound}"
    if report["format"] != "hf":
        text += f"; quant {report['quant']}; ollama: cd {where} && ollama create NAME -f Modelfile"
    return text
