"""lorakit.settings: the one conversion of values, flags, key tables and generated help that every command uses."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest

from lorakit.settings import IGNORED_KEYS, ConfigError, coerce, from_mapping, keys_help, parse_command


@pytest.mark.parametrize("value,hint,expected", [
    ("1e-4", float, 1e-4), (3, float, 3.0), ("3", int, 3), (3.0, int, 3), ("2", float | None, 2.0),
    ("true", bool, True), ("False", bool, False), ("yes", bool, True), ("0", bool, False), (True, bool, True),
    ("null", int | None, None), ("", str | None, None), ("~", bool | None, None), (None, float | None, None),
    (["q_proj", "v_proj"], str, "q_proj,v_proj"), ("yes", str | None, "yes"), (7, str, "7"),
    ("true", str | bool | None, True), ("saves/ck", str | bool | None, "saves/ck"), ("", str, ""),
])
def test_coerce_converts_by_the_keys_type(value, hint, expected):
    got = coerce(value, hint)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value,hint,message", [
    ("abc", float, "must be float, got 'abc'"), ("nan", float, "must be float"), (3.5, int, "must be int, got 3.5"),
    (True, int, "must be int, got True"), ("maybe", bool, "must be true or false"), (None, int, "got empty"),
    ({"a": 1}, str, "must be str"), ("x", int | None, "must be int or empty, got 'x'"),
])
def test_coerce_refuses_with_the_type_named(value, hint, message):
    with pytest.raises(ValueError, match=message):
        coerce(value, hint)


@dataclasses.dataclass
class Toy:
    UNSUPPORTED: ClassVar[dict] = {"quantization_bit": (None, "not here")}

    # --- first
    name: str | None = None
    """A name."""
    flag: bool = False
    """A switch."""
    # --- second
    count: int = 1
    """How many."""


def test_flags_bare_booleans_and_key_value_combine(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("name: from-yaml\ncount: 5\nreport_to: none\n")
    argv = [str(path), "--flag", "--count=2", "name=a", "--name", "b"]
    assert parse_command(Toy, argv) == (Toy(name="b", flag=True, count=2), ["report_to"])
    assert parse_command(Toy, ["--flag", "false", "--count", "3"])[0] == Toy(flag=False, count=3)
    assert parse_command(Toy, ["--do-train", "--flag"]) == (Toy(flag=True), ["do_train"])  # - reads as _
    with pytest.raises(ConfigError) as info:
        parse_command(Toy, ["--count", "x", "--quantization_bit", "4", "--cuont", "2", "--name"])
    assert info.value.problems == ["flag --name needs a value", "count must be int, got 'x'",
                                   "quantization_bit: not here", "unknown key 'cuont'; did you mean 'count'?"]


def test_unsupported_keys_at_their_neutral_value_are_ignored():
    assert from_mapping(Toy, {"use_galore": "false", "quantization_bit": "null"}) == (
        Toy(), ["use_galore", "quantization_bit"])
    with pytest.raises(ConfigError, match="GaLore is not supported"):
        from_mapping(Toy, {"use_galore": True})


def test_one_help_generator_with_sections_and_the_ignored_list():
    text = keys_help(Toy, {"--n": "name"})
    assert "first:\n    name = (empty)   [--n]\n" in text and "second:\n    count = 1\n" in text
    assert "A switch." in text and all(key in text for key in IGNORED_KEYS)
