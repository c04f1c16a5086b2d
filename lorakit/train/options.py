"""Reading `lorakit train` settings: a TrainConfig from a YAML file and command-line settings, through the settings
layer every command shares (`lorakit.settings`: one conversion of values, one table of ignored and unsupported
LLaMA-Factory keys, one generated reference).

A LLaMA-Factory SFT YAML runs as it is: keys that mean the same are used, keys that change nothing here (caching,
workers, loggers) are reported as ignored, keys for features lorakit lacks are errors unless set to their neutral
value, and anything else is a typo, reported with a "did you mean". Every problem is reported at once.
"""

from __future__ import annotations

from pathlib import Path

from .. import settings
from ..settings import IGNORED_KEYS, read_yaml
from .config import TrainConfig

__all__ = ["IGNORED_KEYS", "config_help", "field_docs", "from_mapping", "load_config", "read_yaml"]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> tuple[TrainConfig, list[str]]:
    """Build a TrainConfig from a YAML file and command-line settings (`key=value`, `--key value`, `--flag`):
    (config, ignored keys present).

    Raises ConfigError listing every problem: unknown keys (with a suggestion), unsupported features,
    wrong types and out-of-range values.
    """
    return settings.parse_command(TrainConfig, ([str(path)] if path else []) + list(overrides or []))


def from_mapping(raw: dict, problems: list[str] | None = None) -> tuple[TrainConfig, list[str]]:
    """TrainConfig from a plain dict of LLaMA-Factory-style keys (see `load_config`)."""
    return settings.from_mapping(TrainConfig, raw, problems)


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Field name -> its one-line docstring (`lorakit.settings.field_docs`), TrainConfig's by default."""
    return settings.field_docs(cls)


def config_help(width: int = 100) -> str:
    """Every key with its default and meaning, grouped by section (the text of `lorakit train --help`)."""
    return settings.keys_help(TrainConfig, width=width)
