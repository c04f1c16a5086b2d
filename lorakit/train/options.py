"""Reading `lorakit train` settings: YAML files and key=value overrides under LLaMA-Factory's key names, the
tables of LLaMA-Factory keys that lorakit ignores or lacks, and the reference text generated from TrainConfig.

A LLaMA-Factory SFT YAML runs as it is: keys that mean the same are used, keys that change nothing here (caching,
workers, loggers) are reported as ignored, keys for features lorakit lacks are errors unless set to their neutral
value, and anything else is a typo, reported with a "did you mean". Every problem is reported at once.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import typing
from pathlib import Path

import yaml

from .config import ConfigError, TrainConfig

# LLaMA-Factory / transformers keys that have no effect on a single-process lorakit run.
IGNORED_KEYS = frozenset({
    "overwrite_cache", "preprocessing_num_workers", "preprocessing_batch_size", "dataloader_num_workers",
    "dataloader_pin_memory", "dataloader_persistent_workers", "report_to", "ddp_timeout", "ddp_backend",
    "ddp_find_unused_parameters", "deepspeed", "trust_remote_code", "logging_dir", "logging_strategy", "run_name",
    "save_only_model", "save_safetensors", "include_effective_tokens_per_second", "include_num_input_tokens_seen",
    "flash_attn", "use_fast_tokenizer", "cache_dir", "hf_hub_token", "do_eval", "pissa_convert", "upcast_layernorm",
    "upcast_lmhead_output", "create_new_adapter", "enable_liger_kernel", "use_unsloth_gc", "low_cpu_mem_usage",
    "print_param_status", "tokenized_path", "ignore_pad_token_for_loss", "remove_unused_columns", "tf32",
    "disable_tqdm", "log_level", "freeze_vision_tower", "freeze_multi_modal_projector", "image_max_pixels",
    "video_max_pixels", "media_dir", "swanlab_project", "use_swanlab", "hub_model_id", "push_to_hub_organization",
    "quantization_device_map",
})

# Keys for features lorakit lacks: fine at their neutral value, an error otherwise.
UNSUPPORTED_KEYS = {
    "adapter_name_or_path": (None, "continuing from an existing adapter is not supported yet"),
    "use_galore": (False, "GaLore is not supported"), "use_apollo": (False, "APOLLO is not supported"),
    "use_badam": (False, "BAdam is not supported"), "use_llama_pro": (False, "LLaMA Pro is not supported"),
    "use_adam_mini": (False, "Adam-mini is not supported"), "use_muon": (False, "Muon is not supported"),
    "mask_history": (False, "mask_history is not supported"), "streaming": (False, "streaming is not supported"),
    "eval_dataset": (None, "eval_dataset is not supported yet; use val_size"),
    "mix_strategy": ("concat", "only mix_strategy: concat is supported"),
    "pure_bf16": (False, "pure_bf16 is not supported; bf16: true trains with bf16 autocast"),
    "do_predict": (False, "prediction is not part of lorakit train; use lorakit eval"),
    "push_to_hub": (False, "lorakit never uploads"), "torch_compile": (False, "torch_compile is not supported yet"),
    "rope_scaling": (None, "rope_scaling is not supported"), "lr_scheduler_kwargs": (None, "not supported"),
    "use_dft_loss": (False, "DFT loss is not supported"), "tool_format": (None, "tool_format is not supported"),
}
RENAMED_KEYS = {"evaluation_strategy": "eval_strategy"}  # older transformers names, accepted as the new ones


# ---------------------------------------------------------------- reading YAML and key=value overrides


def parse_overrides(items: list[str]) -> tuple[dict, list[str]]:
    """["lora_rank=16", "bf16=true"] -> ({...}, problems); values are read as YAML scalars."""
    values, problems = {}, []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r} is not KEY=VALUE")
            continue
        try:
            values[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            values[key.strip()] = text
    return values, problems


def read_yaml(path: str | Path) -> dict:
    """A YAML file's top-level mapping; a one-line ConfigError when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file '{path}' not found"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError([f"'{path}'{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"'{path}' must hold a mapping of key: value, got {type(raw).__name__}"])
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> tuple[TrainConfig, list[str]]:
    """Build a TrainConfig from a YAML file and key=value overrides: (config, ignored keys present).

    Raises ConfigError listing every problem: unknown keys (with a suggestion), unsupported features,
    wrong types and out-of-range values.
    """
    raw = read_yaml(path) if path else {}
    extra, problems = parse_overrides(overrides or [])
    raw = {**raw, **extra}
    return from_mapping(raw, problems)


def from_mapping(raw: dict, problems: list[str] | None = None) -> tuple[TrainConfig, list[str]]:
    """TrainConfig from a plain dict of LLaMA-Factory-style keys (see `load_config`)."""
    problems = list(problems or [])
    hints = typing.get_type_hints(TrainConfig)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values, ignored = {}, []
    for key, value in raw.items():
        key = RENAMED_KEYS.get(key, key)
        if key in known:
            values[key] = _coerce(value, hints[key])
        elif key in IGNORED_KEYS:
            ignored.append(key)
        elif key in UNSUPPORTED_KEYS:
            neutral, reason = UNSUPPORTED_KEYS[key]
            if value != neutral and value not in (None, "", []):
                problems.append(f"{key}: {reason}")
            else:
                ignored.append(key)
        else:
            problems.append(_unknown(key, known))
    try:
        config = TrainConfig(**values)
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems) from None
    if problems:
        raise ConfigError(problems)
    return config, ignored


def _unknown(key: str, known: set[str]) -> str:
    candidates = sorted(known | IGNORED_KEYS | set(UNSUPPORTED_KEYS) | set(RENAMED_KEYS))
    close = difflib.get_close_matches(str(key), candidates, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{key}'{hint}"


def _coerce(value, hint):
    """YAML and the command line give strings and ints where floats are meant ("1e-4", 3): convert those."""
    allowed = typing.get_args(hint) or (hint,)
    if isinstance(value, list) and str in allowed:
        return ",".join(str(v) for v in value)  # lora_target: [q_proj, v_proj]
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "null", "none", "~") and type(None) in allowed:
            return None
        for t in (int, float):
            if t in allowed and str not in allowed:
                try:
                    return t(text) if t is float else int(text)
                except ValueError:
                    pass
        if bool in allowed and text.lower() in ("true", "false"):
            return text.lower() == "true"
    if isinstance(value, int) and not isinstance(value, bool) and float in allowed and int not in allowed:
        return float(value)
    if isinstance(value, float) and int in allowed and float not in allowed and value.is_integer():
        return int(value)
    return value


# ---------------------------------------------------------------- generated reference


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Field name -> the docstring written under it in the dataclass `cls` (one line); `lorakit JOB --help` and the
    README's key tables are generated from these."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def field_sections() -> dict[str, list[str]]:
    """Section title (the `# --- name` comments in TrainConfig) -> its field names, in order."""
    sections, current = {}, "settings"
    source = inspect.getsource(TrainConfig)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for line in source.splitlines():
        text = line.strip()
        if text.startswith("# ---"):
            current = text.removeprefix("# ---").strip()
        name = text.split(":", 1)[0]
        if name in names and ":" in text and not text.startswith(('"', "#")):
            sections.setdefault(current, []).append(name)
    return sections


def config_help(width: int = 100) -> str:
    """Every key with its default and meaning, grouped by section (the text of `lorakit train --help`)."""
    docs, defaults = field_docs(), {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    lines = []
    for section, names in field_sections().items():
        lines.append(f"{section}:")
        for name in names:
            default = defaults[name]
            shown = "(empty)" if default is None else str(default).lower() if isinstance(default, bool) else default
            lines.append(f"  {name} = {shown}")
            lines += textwrap.wrap(docs.get(name, ""), width, initial_indent=" " * 6, subsequent_indent=" " * 6)
        lines.append("")
    lines.append("ignored (no effect here): " + ", ".join(sorted(IGNORED_KEYS)))
    return "\n".join(lines)
