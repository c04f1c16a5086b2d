"""The frame every `lorakit JOB` shares (train, chat, eval, merge/export): --help, settings parsed and checked, the
work, and one way to fail. The settings themselves (YAML + `key=value` + `--key value` + bare boolean flags, one
conversion, one table of ignored and unsupported keys, the generated reference) are `lorakit.settings`.

    --help                       usage + every key, its default and meaning (settings.keys_help)     exit 0
    bad settings                 `lorakit JOB: error: ...` (one line, or the list of every problem)  exit 2
    bad input (files, models)    `lorakit JOB: error: ...` one line (LORAKIT_DEBUG=1: the traceback)  exit 1
    Ctrl-C                       `lorakit JOB: aborted`                                               exit 130
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from ..settings import ConfigError, keys_help, parse_command, wants_help

__all__ = ["ConfigError", "fail", "parse_command", "run_command", "say"]


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
    """The frame: --help; settings parsed and checked (exit 2 when bad); `work(args)` -> its exit status, with bad
    files/models as a one-line error (exit 1; LORAKIT_DEBUG=1 shows the traceback) and Ctrl-C as 130."""
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
    except (ValueError, OSError) as exc:  # ModelError, DataError, ConfigError, TrainError are ValueErrors
        if os.environ.get("LORAKIT_DEBUG"):
            raise
        return fail(job, exc, 1)
