"""replay_null_space: every LoRA A is kept outside the input directions that hold a share of the replay rows' input
energy. The kept directions are orthonormal and complete the removed ones; after a run, every A is orthogonal to the
removed directions, so the adapted layer gives the base's output on inputs in their span and still learns outside
it; layers that read the same input share one measurement; a resumed run equals an uninterrupted one; bad settings
are one-line errors before the model loads; a measurement over its memory limit is refused in one line.

replay_task_directions: every LoRA A is kept inside the k directions where the task rows' input energy is largest
relative to the replay rows' (generalized eigenvectors): the basis is orthonormal and finds the direction only the
task uses; after a run every A lies in it; the first projection keeps A's row norms; bad settings are one-line
errors."""

from __future__ import annotations

import json

import pytest
import torch
from cli_setup import save_tiny_model, write_facts
from safetensors.torch import load_file

from lorakit.train import ConfigError, load_config, train
from lorakit.train.null_space import NullSpace, kept_directions, task_directions

GENERAL = [("Say hello.", "Hello there, how can I help?"), ("Count to three.", "One, two, three."),
           ("Name a colour.", "Blue is a colour."), ("What comes after Monday?", "Tuesday comes after Monday."),
           ("Spell cat.", "C, A, T."), ("Is ice cold?", "Yes, ice is cold.")]


def test_kept_directions_are_the_orthonormal_rest_of_the_top_energy():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]
    spectrum = torch.tensor([50.0, 30.0, 15.0, 4.0, 0.5, 0.3, 0.15, 0.05], dtype=torch.float64)  # sums to 100
    c = basis @ torch.diag(spectrum) @ basis.T
    v = kept_directions(c, 0.9).double()  # top 2 hold 80 %, top 3 hold 95 %: 3 removed, 5 kept
    assert v.shape == (8, 5)
    torch.testing.assert_close(v.T @ v, torch.eye(5, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(v.T @ basis[:, :3], torch.zeros(5, 3, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("null-space")
    general = root / "general.jsonl"
    general.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in GENERAL))
    return {"model": str(save_tiny_model(root / "model")), "facts": str(write_facts(root / "facts.jsonl")),
            "general": str(general), "root": root}


def args(setup, name: str, *extra: str) -> list[str]:
    return [f"model_name_or_path={setup['model']}", f"dataset={setup['facts']}", f"replay_dataset={setup['general']}",
            "replay_ratio=0.5", "replay_null_space=0.9", f"output_dir={setup['root'] / name}", "max_steps=6",
            "learning_rate=5e-2", "plot_loss=false", "bf16=false", "lora_target=all", *extra]


def test_a_run_keeps_every_a_out_of_the_replay_inputs_and_says_so(setup, capsys):
    seen = {}

    def check(trainer):
        space = trainer.null_space
        seen["removed"] = space.removed
        seen["off"] = max(float((a.detach() @ (torch.eye(a.shape[1]) - v @ v.T)).abs().max()) for a, v in space.keep)
        seen["shared"] = len({id(v) for _, v in space.keep}) < len(space.keep)  # q, k, v read one input

    cfg, _ = load_config(None, args(setup, "run"))
    assert train(cfg, on_step=check)["status"] == "completed"
    said = capsys.readouterr().err
    assert "null space: every LoRA A kept out of the input directions holding 0.9" in said
    assert 0 < seen["removed"] < 1 and seen["off"] < 1e-5 and seen["shared"]
    state = load_file(str(setup["root"] / "run" / "adapter_model.safetensors"))
    assert any(float(t.abs().max()) > 1e-4 for k, t in state.items() if "lora_B" in k)  # it learned something


def test_inputs_in_the_removed_span_give_the_base_output(setup):
    from lorakit.lora.inject import lora_layers

    out = {}

    def grab(trainer):
        out["layers"] = lora_layers(trainer.trainable.model)
        out["keep"] = trainer.null_space.keep

    cfg, _ = load_config(None, args(setup, "span", "max_steps=4"))
    train(cfg, on_step=grab)
    (key, layer), (a, v) = out["layers"][0], out["keep"][0]
    removed = torch.linalg.qr(torch.eye(a.shape[1]) - v @ v.T)[0][:, :a.shape[1] - v.shape[1]]  # (in, k)
    x = torch.randn(5, removed.shape[1]) @ removed.T  # (5, in): inputs in span(U)
    y = torch.randn(5, v.shape[1]) @ v.T  # inputs in the kept directions
    with torch.no_grad():
        base, adapted = layer.base_layer(x), layer(x)
        moved = (layer(y) - layer.base_layer(y)).abs().max()
    torch.testing.assert_close(adapted, base, atol=1e-5, rtol=0)
    assert float(moved) > 1e-5, key


def test_resume_equals_uninterrupted(setup):
    """The directions are measured again on resume (the same base, the same rows): the same adapter."""
    whole = setup["root"] / "whole"
    cfg, _ = load_config(None, args(setup, "whole", "save_steps=3"))
    train(cfg)
    resume = f"resume_from_checkpoint={whole / 'checkpoint-3'}"
    cfg, _ = load_config(None, args(setup, "resumed", "save_steps=3", resume))
    assert train(cfg)["global_step"] == 6
    expected = load_file(str(whole / "adapter_model.safetensors"))
    for key, value in load_file(str(setup["root"] / "resumed" / "adapter_model.safetensors")).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (["replay_null_space=1", "self_replay=true", "replay_ratio=0.3"], "replay_null_space must be in [0, 1), got 1"),
    (["replay_null_space=0.9"], "replay_null_space is set but replay_ratio is 0"),
    (["replay_null_space=0.9", "self_replay=true", "replay_ratio=0.3", "finetuning_type=full"],
     "replay_null_space needs finetuning_type lora or qlora"),
    (["replay_null_space=0.9", "self_replay=true", "replay_ratio=0.3", "use_dora=true"],
     "replay_null_space cannot be combined with use_dora"),
    (["replay_null_space=0.9", "self_replay=true", "replay_ratio=0.3", "packing=true"],
     "replay_null_space needs rows that are not packed"),
    (["replay_task_directions=-1", "self_replay=true", "replay_ratio=0.3"],
     "replay_task_directions must be a whole number of directions >= 0, got -1"),
    (["replay_task_directions=1.5", "self_replay=true", "replay_ratio=0.3"], "replay_task_directions must be int"),
    (["replay_task_directions=8", "replay_null_space=0.9", "self_replay=true", "replay_ratio=0.3"],
     "replay_null_space and replay_task_directions are two ways to confine LoRA A; set one of them"),
    (["replay_task_directions=8"], "replay_task_directions is set but replay_ratio is 0"),
    (["replay_task_directions=8", "self_replay=true", "replay_ratio=0.3", "use_dora=true"],
     "replay_task_directions cannot be combined with use_dora"),
])
def test_bad_null_space_and_task_direction_settings_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["dataset=x", *overrides])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_measurement_over_its_memory_limit_is_refused_in_one_line(setup, monkeypatch):
    import lorakit.train.null_space as null_space

    monkeypatch.setattr(null_space, "MAX_BYTES", 1 << 10)
    cfg, _ = load_config(None, args(setup, "too-big"))
    with pytest.raises(ValueError, match=r"^replay_null_space would sum .* GB of input covariances") as caught:
        train(cfg)
    assert "\n" not in str(caught.value)


def test_an_embedding_lora_layer_is_refused_not_skipped(setup):
    cfg, _ = load_config(None, args(setup, "embedding", "lora_target=embed_tokens,q_proj"))
    with pytest.raises(ValueError, match=r"^replay_null_space projects LoRA on linear layers only; .*embed_tokens "
                                         r"is an embedding") as caught:
        train(cfg)
    assert "\n" not in str(caught.value)


def test_task_directions_find_what_only_the_task_uses():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    # the task spends its energy on directions 0 and 1 equally; the replay rows spend almost all of theirs on 0
    task = basis @ torch.diag(torch.tensor([1.0, 1.0, 0.01, 0.01, 0.01, 0.01], dtype=torch.float64)) @ basis.T
    replay = basis @ torch.diag(torch.tensor([10.0, 0.01, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)) @ basis.T
    q = task_directions(task, replay, 1).double()  # (6, 1)
    assert q.shape == (6, 1)
    assert abs(float(q[:, 0] @ basis[:, 1])) > 0.999  # direction 1: the task's, not the replay rows'
    q3 = task_directions(task, replay, 3).double()
    torch.testing.assert_close(q3.T @ q3, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)


def test_the_first_projection_keeps_the_row_norms_of_a():
    torch.manual_seed(0)
    a = torch.randn(4, 16)
    v = torch.linalg.qr(torch.randn(16, 3))[0]  # (16, 3)
    norms = a.norm(dim=1)
    NullSpace([(a, v)], removed=13 / 16).project(keep_norm=True)
    torch.testing.assert_close(a.norm(dim=1), norms)
    torch.testing.assert_close(a @ v @ v.T, a, atol=1e-5, rtol=0)  # in span(V)


def test_a_run_keeps_every_a_in_the_task_directions_and_says_so(setup, capsys):
    seen = {}

    def check(trainer):
        space = trainer.null_space
        seen["widths"] = {v.shape[1] for _, v in space.keep}
        seen["off"] = max(float((a.detach() @ (torch.eye(a.shape[1]) - v @ v.T)).abs().max()) for a, v in space.keep)

    cfg, _ = load_config(None, args(setup, "task", "replay_null_space=0", "replay_task_directions=4"))
    assert train(cfg, on_step=check)["status"] == "completed"
    said = capsys.readouterr().err
    assert "task directions: every LoRA A kept in the 4 input directions per layer" in said
    assert seen["widths"] == {4} and seen["off"] < 1e-5
    state = load_file(str(setup["root"] / "task" / "adapter_model.safetensors"))
    assert any(float(t.abs().max()) > 1e-4 for k, t in state.items() if "lora_B" in k)


def test_task_directions_as_wide_as_a_layer_input_are_refused(setup):
    cfg, _ = load_config(None, args(setup, "too-wide", "replay_null_space=0", "replay_task_directions=100000"))
    with pytest.raises(ValueError, match=r"^replay_task_directions 100000 must be below the input width of every "
                                         r"LoRA layer; .* reads \d+$"):
        train(cfg)
    assert not (setup["root"] / "too-wide" / "adapter_model.safetensors").exists()
