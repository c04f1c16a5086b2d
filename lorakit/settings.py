"""Settings of every `lorakit` command: one dataclass per command (TrainConfig, ChatArgs, EvalArgs, MergeArgs),
filled from a YAML file, `key=value` pairs and `--key value` flags under LLaMA-Factory's key names.

    lorakit train run.yaml lora_rank=16 --num_train_epochs 2 --bf16 --plot_loss

Precedence: the YAML file, then the command line from left to right (a later setting wins), except that repeated
`--adapter DIR` flags add up to one comma list. `--key value`, `--key=value` and `key=value` are the same thing;
a boolean key given bare (`--bf16`, `--do_train`) is true, as in LLaMA-Factory's shell scripts. Command-line values
are text, converted by the key's type (`coerce`, the one conversion), so `--prompt yes` stays the string "yes";
YAML values are YAML's. A key is used when it is a field of the command's dataclass; else it is refused when that
command lacks the feature (the dataclass's UNSUPPORTED table, then UNSUPPORTED_KEYS) unless set to its neutral
value, reported as ignored when it changes nothing in lorakit (IGNORED_KEYS), and otherwise an unknown key with a
"did you mean". Every problem is reported at once (ConfigError). `keys_help` is the one generated reference.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """Settings with problems; `problems` lists every one of them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        if len(problems) == 1:
            super().__init__(f"config: {problems[0]}")
        else:
            super().__init__(f"config has {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


# LLaMA-Factory / transformers keys that change nothing in a lorakit command (no loggers, no caches); a command whose
# dataclass has the key as a field reads it instead (lorakit train: ddp_timeout, ddp_backend, deepspeed, ...).
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
    "quantization_device_map", "stage", "do_train", "do_predict", "enable_thinking", "use_cache",
})

# LLaMA-Factory features lorakit lacks: fine at their neutral value (then reported as ignored), an error otherwise.
UNSUPPORTED_KEYS = {
    "adapter_name_or_path": (None, "continuing from an existing adapter is not supported yet"),
    "use_galore": (False, "GaLore is not supported"), "use_apollo": (False, "APOLLO is not supported"),
    "use_badam": (False, "BAdam is not supported"), "use_llama_pro": (False, "LLaMA Pro is not supported"),
    "use_adam_mini": (False, "Adam-mini is not supported"), "use_muon": (False, "Muon is not supported"),
    "mask_history": (False, "mask_history is not supported"), "streaming": (False, "streaming is not supported"),
    "eval_dataset": (None, "eval_dataset is not supported yet; use val_size"),
    "mix_strategy": ("concat", "only mix_strategy: concat is supported"),
    "pure_bf16": (False, "pure_bf16 is not supported; bf16: true trains with bf16 autocast"),
    "push_to_hub": (False, "lorakit never uploads"), "torch_compile": (False, "torch_compile is not supported yet"),
    "rope_scaling": (None, "rope_scaling is not supported"), "lr_scheduler_kwargs": (None, "not supported"),
    "use_dft_loss": (False, "DFT loss is not supported"), "tool_format": (None, "tool_format is not supported"),
}
RENAMED_KEYS = {"evaluation_strategy": "eval_strategy"}  # older transformers names, read as the new ones
HELP_FLAGS = ("-h", "--help")
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1"), ("false", "no", "0")


# ---------------------------------------------------------------- reading


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
    return {str(k): v for k, v in raw.items()}


def parse_command(cls: type, argv: list[str], aliases: dict[str, str] | None = None):
    """(settings of type `cls`, ignored keys present) from a command's raw arguments; raises ConfigError."""
    aliases = aliases or {}
    path, items, problems = split_argv(cls, argv, aliases)
    raw: dict[str, object] = {}
    if path:
        for key, value in read_yaml(path).items():
            raw[aliases.get(key, key)] = value
    raw.update(items)
    return from_mapping(cls, raw, problems)


def split_argv(cls: type, argv: list[str], aliases: dict[str, str]) -> tuple[str | None, dict, list[str]]:
    """(config path, {key: text} from key=value and --flags in order, problems)."""
    hints = typing.get_type_hints(cls)
    paths, items, problems, adapters = [], {}, [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token.startswith("--") and len(token) > 2:
            name, sep, value = token[2:].partition("=")
            key = aliases.get(name.replace("-", "_"), name.replace("-", "_"))
            if not sep:
                value, i = _flag_value(hints.get(RENAMED_KEYS.get(key, key)), argv, i)
                if value is None:
                    problems.append(f"flag {token} needs a value")
                    continue
            if name == "adapter":  # repeatable: --adapter a --adapter kb=b
                adapters.append(value)
                value = ",".join(adapters)
            items[key] = value
        elif "=" in token and not token.startswith("-"):
            key, _, value = token.partition("=")
            key = key.strip()
            if not key:
                problems.append(f"override {token!r} is not KEY=VALUE")
                continue
            items[aliases.get(key, key)] = value
        elif token.startswith("-"):
            problems.append(f"unknown option {token!r}")
        else:
            paths.append(token)
    if len(paths) > 1:
        problems.append(f"more than one config file given: {', '.join(paths)} (KEY=VALUE pairs need the '=')")
    return (paths[0] if paths else None), items, problems


def _flag_value(hint, argv: list[str], i: int) -> tuple[str | None, int]:
    """(value text, next index) of a `--key` given without `=`: a boolean key takes a following true/false word or
    stands alone for true; another key takes the next argument; a key that is not a field takes the next argument
    unless it is another flag (LLaMA-Factory's bare flags, such as --overwrite_cache, are booleans)."""
    nxt = argv[i] if i < len(argv) else None
    allowed = _allowed(hint) if hint is not None else ()
    if bool in allowed and str not in allowed:
        if nxt is not None and nxt.lower() in TRUE_WORDS + FALSE_WORDS:
            return nxt, i + 1
        return "true", i
    if nxt is None or nxt.startswith("--") or (bool in allowed and "=" in nxt) or (hint is None and "=" in nxt):
        return ("true", i) if hint is None or bool in allowed else (None, i)
    return nxt, i + 1


def from_mapping(cls: type, raw: dict, problems: list[str] | None = None, unsupported: dict | None = None):
    """Build `cls` from a dict of keys (YAML values or command-line text); (settings, ignored keys present).

    `unsupported` adds keys this call refuses to the dataclass's own UNSUPPORTED table.
    """
    problems = list(problems or [])
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    refused = {**getattr(cls, "UNSUPPORTED", {}), **(unsupported or {})}
    values, ignored = {}, []
    for key, value in raw.items():
        key = RENAMED_KEYS.get(key, key) if RENAMED_KEYS.get(key) in fields else key
        if key in fields:
            try:
                values[key] = coerce(value, hints[key])
            except ValueError as exc:
                problems.append(f"{key} {exc}")
        elif key in refused or (key in UNSUPPORTED_KEYS and key not in IGNORED_KEYS):
            neutral, reason = refused.get(key) or UNSUPPORTED_KEYS[key]
            if _is_neutral(value, neutral):
                ignored.append(key)
            else:
                problems.append(f"{key}: {reason}")
        elif key in IGNORED_KEYS:
            ignored.append(key)
        else:
            problems.append(unknown_key(key, fields | set(refused) | set(UNSUPPORTED_KEYS) | IGNORED_KEYS
                                        | set(RENAMED_KEYS)))
    try:
        settings = cls(**values)
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems) from None
    if problems:
        raise ConfigError(problems)
    return settings, ignored


def _is_neutral(value, neutral) -> bool:
    if value in (None, "", [], neutral):
        return True
    text = str(value).strip().lower()
    return text in ("null", "none", "~") or text == str(neutral).lower() or (neutral is False and text in FALSE_WORDS)


def unknown_key(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{key}'{hint}"


# ---------------------------------------------------------------- the one conversion


def _allowed(hint) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _type_names(allowed: tuple) -> str:
    return " or ".join("empty" if t is type(None) else t.__name__ for t in allowed)


def coerce(value, hint):
    """A YAML value or command-line text to the key's type (int, float, bool, str, optionally None); ValueError
    ("must be int, got 'abc'") otherwise. Text "null"/"none"/"~"/"" is None where None is allowed; a list is a
    comma list where text is allowed (lora_target: [q_proj, v_proj]); 3 is 3.0 for a float key, 3.0 is 3 for an
    int key; true/false (also yes/no/1/0 for a key that is only boolean) for a boolean one."""
    allowed = _allowed(hint)
    if isinstance(value, str) and value.strip().lower() in ("", "null", "none", "~"):
        if type(None) in allowed:
            return None
        if str in allowed:
            return value
        raise ValueError(f"must be {_type_names(allowed)}, got {value!r}")
    if value is None:
        if type(None) in allowed:
            return None
        raise ValueError(f"must be {_type_names(allowed)}, got empty")
    if isinstance(value, list) and str in allowed:
        return ",".join(str(v) for v in value)
    if bool in allowed:
        if isinstance(value, bool):
            return value
        words = ("true", "false") if str in allowed else TRUE_WORDS + FALSE_WORDS
        if str(value).strip().lower() in words:
            return str(value).strip().lower() in TRUE_WORDS
        if str not in allowed:
            raise ValueError(f"must be true or false, got {value!r}")
    if not isinstance(value, bool):
        if int in allowed and isinstance(value, float) and value.is_integer():
            return int(value)
        for kind in (int, float):
            if kind in allowed:
                number = _number(value, kind)
                if number is not None:
                    return number
    if str in allowed and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"must be {_type_names(allowed)}, got {value!r}")


def _number(value, kind: type) -> int | float | None:
    """`value` (a number or its text) as `kind`; None when it is not one (nan and inf are not settings)."""
    if isinstance(value, (int, float)):
        return float(value) if kind is float else (value if isinstance(value, int) else None)
    try:
        number = kind(str(value).strip())
    except ValueError:
        return None
    return None if kind is float and not (number == number and abs(number) != float("inf")) else number


# ---------------------------------------------------------------- the one generated reference


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the dataclass `cls` (one line); `lorakit JOB --help` and the
    README's key tables are generated from these."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def field_sections(cls: type) -> dict[str, list[str]]:
    """Section title (the `# --- name` comments in the dataclass) -> its field names, in order; one untitled
    section ("") for a dataclass without such comments."""
    sections, current = {}, ""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("# ---"):
            current = text.removeprefix("# ---").strip()
        name = text.split(":", 1)[0]
        if name in names and ":" in text and not text.startswith(('"', "#")):
            sections.setdefault(current, []).append(name)
    return sections


def keys_help(cls: type, flags: dict[str, str] | None = None, width: int = 100) -> str:
    """Every key with its default, its short flags and its meaning, by section (the tail of `lorakit JOB --help`)."""
    docs = field_docs(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.init}
    by_field: dict[str, list[str]] = {}
    for flag, key in (flags or {}).items():
        by_field.setdefault(key, []).append(flag)
    lines = ["keys (YAML key, KEY=VALUE or --KEY VALUE; a boolean key alone, --KEY, is true; default, then meaning):"]
    for section, names in field_sections(cls).items():
        indent = "  " if section else ""
        if section:
            lines.append(f"{section}:")
        for name in names:
            default = None if defaults[name] is dataclasses.MISSING else defaults[name]
            shown = "(empty)" if default is None else str(default).lower() if isinstance(default, bool) else default
            also = by_field.get(name)
            lines.append(f"{indent}  {name} = {shown}" + (f"   [{', '.join(also)}]" if also else ""))
            lines += textwrap.wrap(docs.get(name, ""), width, initial_indent=indent + " " * 6,
                                   subsequent_indent=indent + " " * 6)
    lines.append("")
    lines.append("accepted and ignored (no effect here): " + ", ".join(sorted(IGNORED_KEYS - set(defaults))))
    return "\n".join(lines)


def wants_help(argv: list[str]) -> bool:
    return any(a in HELP_FLAGS for a in argv)
