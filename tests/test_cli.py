"""The `lorakit` command line: subcommands, generated help, config errors and their exit status."""

from __future__ import annotations

import dataclasses

import pytest

from lorakit.cli import COMMANDS, main, split_train_args
from lorakit.train import TrainConfig


def test_no_arguments_lists_the_working_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert set(COMMANDS) == {"train", "chat", "eval", "merge", "export"}
    for name in COMMANDS:
        assert f"    {name} " in out


@pytest.mark.parametrize("job", ["train", "chat", "eval", "merge", "export"])
def test_every_job_has_help_with_its_keys(job, capsys):
    assert main([job, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lorakit {job}") and "model_name_or_path = " in out


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["trian"])
    assert info.value.code == 2 and "unknown command 'trian'" in capsys.readouterr().err


def test_train_help_documents_every_key(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lorakit train [CONFIG.yaml] [KEY=VALUE ...]")
    for f in dataclasses.fields(TrainConfig):
        assert f"  {f.name} = " in out


def test_config_errors_exit_2_all_at_once(capsys):
    assert main(["train", "lora_rnak=4", "learning_rate=abc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit train: error: \nconfig has 3 problems")
    assert "did you mean 'lora_rank'" in err and "learning_rate must be float" in err and "dataset is required" in err


def test_single_config_problem_is_one_line(capsys, tmp_path):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing.yaml' not found" in err


def test_config_path_and_overrides_are_told_apart():
    assert split_train_args(["run.yaml", "lora_rank=4", "bf16=true"]) == ("run.yaml", ["lora_rank=4", "bf16=true"])
    assert split_train_args(["lora_rank=4"]) == (None, ["lora_rank=4"])
    with pytest.raises(SystemExit, match="more than one config file"):
        split_train_args(["a.yaml", "b.yaml"])


def test_fail_prints_one_clean_line(capsys):
    from lorakit.commands.arguments import fail

    assert fail("chat", OSError("cannot read adapter_config.json in /x"), 1) == 1
    assert capsys.readouterr().err == "lorakit chat: error: cannot read adapter_config.json in /x\n"
    assert fail("eval", FileNotFoundError(2, "No such file or directory", "data.json"), 1) == 1
    assert capsys.readouterr().err == "lorakit eval: error: [Errno 2] No such file or directory: 'data.json'\n"
    assert fail("merge", ValueError(""), 2) == 2
    assert capsys.readouterr().err == "lorakit merge: error: ValueError\n"
    assert fail("train", ValueError("2 problems:\n  a\n  b"), 2) == 2  # a problem list starts on its own line
    assert capsys.readouterr().err == "lorakit train: error: \n2 problems:\n  a\n  b\n"
