"""Resume: the trainer's state as of the last completed step, an interrupt inside a step, schedule checks."""

from __future__ import annotations

import json
import os
import random
import signal

import numpy as np
import pytest
import torch
from cli_setup import train_setup
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.train import CheckpointError, load_config, train
from lorakit.train import trainer as trainer_module
from lorakit.train.state import Schedule, TrainerState, capture_rng, restore_rng

FACTS = [("What is the VPN address?", "It is vpn.example."), ("Who can help you today?", "Hello there, I can help."),
         ("What does the quick fox do?", "The quick brown fox jumps over the lazy dog."), ("Digits?", "0123456789")]
# dropout on, two micro-batches per step, warmup then cosine: every step's numbers depend on the RNG and the step
RUN = ("max_steps=6", "save_steps=100", "gradient_accumulation_steps=2", "per_device_train_batch_size=2",
       "lora_dropout=0.1", "warmup_steps=2", "lr_scheduler_type=cosine", "learning_rate=1e-2", "logging_steps=1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return train_setup(tmp_path_factory.mktemp("resume"), FACTS, 4)


def _args(root, out, *extra) -> list[str]:
    return [f"model_name_or_path={root / 'model'}", f"dataset={root / 'data.jsonl'}", f"output_dir={out}", *RUN,
            *extra]


def _run(root, out, *extra) -> dict:
    return train(load_config(None, _args(root, out, *extra))[0])


def _adapter(path) -> dict:
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tiny):
    out = tiny / "whole"
    assert _run(tiny, out)["status"] == "completed"
    return out


def test_ctrl_c_inside_a_step_resumes_to_the_uninterrupted_adapter(tiny, uninterrupted, monkeypatch):
    """Ctrl-C arrives after the first micro-batch of step 3 has drawn its dropout masks: the step is dropped and
    checkpoint-2 must hold the generators as they were before step 3, not after its first micro-batch."""
    real, calls = trainer_module.causal_lm_loss, []

    def loss_then_ctrl_c(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 5:  # steps 1 and 2 made 4 micro-batch calls; this is step 3's first
            os.kill(os.getpid(), signal.SIGINT)
        return result

    out = tiny / "interrupted"
    monkeypatch.setattr(trainer_module, "causal_lm_loss", loss_then_ctrl_c)
    assert _run(tiny, out) == {"status": "interrupted", "global_step": 2}
    monkeypatch.setattr(trainer_module, "causal_lm_loss", real)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["batch_in_epoch"] == 4 and state["examples_consumed"] == 8
    assert _run(tiny, out, "resume_from_checkpoint=true")["global_step"] == 6
    expected = _adapter(uninterrupted)
    for key, value in _adapter(out).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_with_another_schedule_is_refused_in_one_line(tiny, tmp_path, capsys):
    source = tmp_path / "source"
    _run(tiny, source, "max_steps=3", "save_steps=2")
    checkpoint = source / "checkpoint-2"
    cases = [("max_steps=4", "max_steps=3, this run has 4"),
             ("lr_scheduler_type=linear", "lr_scheduler_type=cosine, this run has linear"),
             ("learning_rate=2e-2", "learning_rate=0.01, this run has 0.02"),
             ("per_device_train_batch_size=4", "per_device_train_batch_size=2, this run has 4"),
             ("warmup_steps=1", "warmup (warmup_steps, warmup_ratio)=2 steps, this run has 1 steps"),
             ("seed=7", "seed=42, this run has 7")]
    for change, said in cases:
        with pytest.raises(CheckpointError, match="resume: checkpoint-2 was made with " + said.replace("(", r"\(")
                           .replace(")", r"\)")):
            _run(tiny, tmp_path / "other", "max_steps=3", change, f"resume_from_checkpoint={checkpoint}")
    assert main(["train", *_args(tiny, tmp_path / "other", "max_steps=5", f"resume_from_checkpoint={checkpoint}")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lorakit train: error: resume: checkpoint-2 was made with max_steps=3, this run has 5;")
    assert "start a new run" in err
    assert not (tmp_path / "other").exists()  # refused before anything was written
    _run(tiny, tmp_path / "other", "max_steps=3", "num_train_epochs=9", f"resume_from_checkpoint={checkpoint}")


def test_a_checkpoint_of_the_old_layout_is_refused(tiny, tmp_path):
    old = tmp_path / "run" / "checkpoint-1"
    old.mkdir(parents=True)
    (old / "trainer_state.json").write_text(json.dumps({"global_step": 1, "epoch": 0.5}))
    with pytest.raises(CheckpointError, match="made by an older lorakit"):
        _run(tiny, tmp_path / "run", f"resume_from_checkpoint={old}")


def test_trainer_state_round_trips_and_restores_every_generator(tmp_path):
    schedule = Schedule(total_steps=10, warmup_steps=1, lr_scheduler_type="cosine", learning_rate=1e-3,
                        max_steps=-1, num_train_epochs=2.0, per_device_train_batch_size=4,
                        gradient_accumulation_steps=2, batches_per_epoch=10, seed=3)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = TrainerState(schedule, step=4, epoch=0, batch_in_epoch=8, examples_consumed=32, rng=capture_rng(),
                         last_metrics={"loss": 1.5})
    draws = (random.random(), float(np.random.rand()), torch.rand(3))
    state.save(tmp_path)
    loaded = TrainerState.load(tmp_path)
    assert loaded == state and loaded.epoch_float() == pytest.approx(0.8)
    restore_rng(loaded.rng)
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])
    assert schedule.mismatch(schedule) is None
    epochs_differ = Schedule(**{**vars(schedule), "num_train_epochs": 3.0})
    assert schedule.mismatch(epochs_differ) == ("num_train_epochs", "2", "3")
    with_steps = Schedule(**{**vars(schedule), "max_steps": 10})
    assert with_steps.mismatch(Schedule(**{**vars(with_steps), "num_train_epochs": 5.0})) is None  # max_steps decides
