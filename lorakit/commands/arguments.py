"""Settings of `lorakit chat | eval | merge`: one dataclass per command, filled from a YAML file, `key=value`
overrides and `--flags`, which combine freely.

    lorakit merge merge.yaml adapter_name_or_path=saves/a export_dir=out --format gguf --quant q8_0

Precedence: the YAML file, then the command line from left to right (a later setting wins), except that repeated
`--adapter DIR` flags add up to one comma list. A flag is a key with `--` in front (`--max_new_tokens 64`,
`--max-new-tokens=64`) or one of a command's short names (`--model`, `--adapter`, `--format`, ...). Values on the
command line are text, converted by the key's type, so `--prompt yes` stays the string "yes"; YAML values are
YAML's. Unknown keys are errors with a "did you mean"; every problem is reported at once (ConfigError).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path

from ..train.config import ConfigError
from ..train.options import field_docs, read_yaml

# LLaMA-Factory keys that change nothing for chat / eval / merge here: accepted and reported.
IGNORED_KEYS = frozenset({
    "trust_remote_code", "flash_attn", "use_fast_tokenizer", "cache_dir", "hf_hub_token", "low_cpu_mem_usage",
    "stage", "do_predict", "do_train", "report_to", "preprocessing_num_workers", "overwrite_cache",
    "dataloader_num_workers", "enable_thinking", "print_param_status", "use_cache",
})
HELP_FLAGS = ("-h", "--help")


def parse_command(cls: type, argv: list[str], aliases: dict[str, str] | None = None):
    """(settings of type `cls`, ignored keys present) from a command's raw arguments; raises ConfigError."""
    aliases = aliases or {}
    path, items, problems = split_argv(cls, argv, aliases)
    raw: dict[str, object] = {}
    if path:
        for key, value in read_yaml(path).items():
            raw[aliases.get(str(key), str(key))] = value
    raw.update(items)
    return from_mapping(cls, raw, aliases, problems)


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
                if _is_bool(hints.get(key)):  # --overwrite, or --overwrite false
                    explicit = i < len(argv) and argv[i].lower() in ("true", "false")
                    value, i = (argv[i], i + 1) if explicit else ("true", i)
                elif i < len(argv):
                    value, i = argv[i], i + 1
                else:
                    problems.append(f"flag {token} needs a value")
                    continue
            if name == "adapter":  # repeatable: --adapter a --adapter kb=b
                adapters.append(value)
                value = ",".join(adapters)
            items[key] = value
        elif "=" in token and not token.startswith("-"):
            key, _, value = token.partition("=")
            items[aliases.get(key.strip(), key.strip())] = value
        elif token.startswith("-"):
            problems.append(f"unknown option {token!r}")
        else:
            paths.append(token)
    if len(paths) > 1:
        problems.append(f"more than one config file given: {', '.join(paths)} (KEY=VALUE pairs need the '=')")
    return (paths[0] if paths else None), items, problems


def from_mapping(cls: type, raw: dict, aliases: dict[str, str] | None = None, problems: list[str] | None = None):
    """Build `cls` from a dict of keys (YAML values or command-line text); (settings, ignored keys present)."""
    problems = list(problems or [])
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unsupported = getattr(cls, "UNSUPPORTED", {})
    values, ignored = {}, []
    for key, value in raw.items():
        if key in fields:
            try:
                values[key] = coerce(value, hints[key])
            except ValueError as exc:
                problems.append(f"{key}: {exc}")
        elif key in IGNORED_KEYS:
            ignored.append(key)
        elif key in unsupported:
            neutral, reason = unsupported[key]
            if value not in (neutral, None, "", "null", "none", "false", False):
                problems.append(f"{key}: {reason}")
        else:
            problems.append(unknown_key(key, fields | set(aliases or {}) | set(unsupported)))
    if problems:
        raise ConfigError(problems)
    return cls(**values), ignored


def unknown_key(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{key}'{hint}"


def _allowed(hint) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _is_bool(hint) -> bool:
    return hint is not None and bool in _allowed(hint)


def coerce(value, hint):
    """A YAML value or command-line text to the key's type (int, float, bool, str, optionally None)."""
    allowed = _allowed(hint)
    if isinstance(value, str) and (value.strip().lower() in ("null", "none", "~") or not value.strip()):
        if type(None) in allowed:
            return None
        if str in allowed:
            return value
        raise ValueError(f"a value is required, got {value!r}")
    if value is None:
        if type(None) in allowed:
            return None
        raise ValueError("a value is required")
    if isinstance(value, list) and str in allowed:
        return ",".join(str(v) for v in value)  # adapter_name_or_path: [a, b]
    if bool in allowed:
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return str(value).strip().lower() in ("true", "yes", "1")
        raise ValueError(f"expected true or false, got {value!r}")
    for kind in (int, float):
        if kind in allowed and not isinstance(value, bool):
            try:
                number = float(value) if kind is float else int(str(value).strip())
            except ValueError:
                continue
            if kind is float and isinstance(value, str) and not _looks_numeric(value):
                continue
            return number
    if str in allowed and isinstance(value, (str, int, float)):
        return str(value)
    names = " or ".join(t.__name__ for t in allowed if t is not type(None))
    raise ValueError(f"expected {names}, got {value!r}")


def _looks_numeric(text: str) -> bool:
    return text.strip().lower() not in ("nan", "inf", "-inf", "infinity", "-infinity", "+inf")


def keys_help(cls: type, flags: dict[str, str] | None = None, width: int = 100) -> str:
    """Every key with its default, its short flags and its meaning (the tail of `lorakit JOB --help`)."""
    docs = field_docs(cls)
    by_field: dict[str, list[str]] = {}
    for flag, key in (flags or {}).items():
        by_field.setdefault(key, []).append(flag)
    lines = ["keys (YAML key, KEY=VALUE or --KEY VALUE; default, then meaning):"]
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "(empty)" if default is None else str(default).lower() if isinstance(default, bool) else default
        also = by_field.get(f.name)
        lines.append(f"  {f.name} = {shown}" + (f"   [{', '.join(also)}]" if also else ""))
        lines += textwrap.wrap(docs.get(f.name, ""), width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    lines.append("")
    lines.append("accepted and ignored (no effect here): " + ", ".join(sorted(IGNORED_KEYS)))
    return "\n".join(lines)


def wants_help(argv: list[str]) -> bool:
    return any(a in HELP_FLAGS for a in argv)


def existing_file(path: str | Path | None, key: str) -> str | None:
    """A problem line when `path` is set but is not an existing file or directory."""
    if path and not Path(path).expanduser().exists():
        return f"{key}: '{path}' does not exist"
    return None


def say(job: str, text: str) -> None:
    """Progress and choices, on stderr so that stdout carries only answers and tables."""
    print(f"lorakit {job}: {text}", file=sys.stderr, flush=True)


def fail(job: str, exc: BaseException, status: int) -> int:
    """Print `lorakit JOB: error: ...` (one line, or the problem list) and return the exit status."""
    text = str(exc).strip() or type(exc).__name__
    joiner = "\n" if "\n" in text else ""
    print(f"lorakit {job}: error: {joiner}{text}", file=sys.stderr)
    return status


def run_command(job: str, argv: list[str], cls: type, usage: str, flags: dict[str, str], aliases: dict[str, str],
                work: Callable[[object], int], aborted: str = "aborted") -> int:
    """The frame every `lorakit JOB` shares: --help; settings parsed and checked (exit 2 when bad); `work(args)`
    with bad files/models as a one-line error (exit 1; LORAKIT_DEBUG=1 shows the traceback) and Ctrl-C as 130."""
    if wants_help(argv):
        print(usage + keys_help(cls, flags))
        return 0
    try:
        args, ignored = parse_command(cls, argv, aliases)
    except ConfigError as exc:
        return fail(job, exc, 2)
    if ignored:
        say(job, f"ignoring keys that change nothing here: {', '.join(ignored)}")
    try:
        return work(args)
    except KeyboardInterrupt:
        print(f"lorakit {job}: {aborted}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:  # ModelError, DataError, ConfigError are ValueErrors
        if os.environ.get("LORAKIT_DEBUG"):
            raise
        return fail(job, exc, 1)
