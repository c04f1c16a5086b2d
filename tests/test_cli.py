"""The `lorakit` command line: subcommands, generated help, config errors and their exit status."""

from __future__ import annotations

import dataclasses

import pytest

from lorakit.cli import COMMANDS, main
from lorakit.settings import split_argv
from lorakit.train import TrainConfig


def test_no_arguments_lists_the_working_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert set(COMMANDS) == {"train", "estimate", "chat", "eval", "merge", "export", "serve"}
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
    assert split_argv(TrainConfig, ["run.yaml", "lora_rank=4", "bf16=true"], {}) == (
        "run.yaml", {"lora_rank": "4", "bf16": "true"}, [])
    assert split_argv(TrainConfig, ["lora_rank=4"], {}) == (None, {"lora_rank": "4"}, [])
    assert "more than one config file" in split_argv(TrainConfig, ["a.yaml", "b.yaml"], {})[2][0]
    assert main(["train", "a.yaml", "b.yaml"]) == 2


def test_train_takes_llama_factory_shell_flags(capsys):
    """The flags of LLaMA-Factory's example scripts: --key value, --key=value and bare booleans, mixed with
    key=value; a bad one is a settings error (exit 2) like any other."""
    from lorakit.train import load_config

    argv = ["--model_name_or_path", "M", "--do_train", "--dataset", "d.jsonl", "--lora_target", "all",
            "--output_dir=saves/x", "--num_train_epochs", "2.0", "--learning_rate", "1e-4", "--plot_loss", "--bf16",
            "--overwrite_cache", "--overwrite_output_dir", "--preprocessing_num_workers", "16", "lora_rank=4",
            "--val_size", "0.1", "--gradient_checkpointing", "false", "--resume_from_checkpoint", "saves/x/ck"]
    config, ignored = load_config(None, argv)
    assert (config.model_name_or_path, config.dataset, config.output_dir) == ("M", "d.jsonl", "saves/x")
    assert config.do_train and config.plot_loss and config.bf16 and config.overwrite_output_dir
    assert (config.num_train_epochs, config.learning_rate, config.lora_rank, config.val_size) == (2.0, 1e-4, 4, 0.1)
    assert config.gradient_checkpointing is False and config.resume_from_checkpoint == "saves/x/ck"
    assert ignored == ["overwrite_cache", "preprocessing_num_workers"]
    assert load_config(None, ["--dataset", "d", "--resume_from_checkpoint"])[0].resume_from_checkpoint is True
    assert main(["train", "--dataset", "d.jsonl", "--lora_rank"]) == 2
    assert "flag --lora_rank needs a value" in capsys.readouterr().err
    assert main(["train", "--dataset", "d.jsonl", "--bf16", "maybe"]) == 2  # 'maybe' is taken as a config path
    assert main(["train", "--dataset", "d.jsonl", "--lora_rnak", "4", "-x"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'lora_rank'" in err and "unknown option '-x'" in err


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
