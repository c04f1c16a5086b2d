"""replay_kl_weight: replay tokens learn (1 - w) the label and w the base's distribution. The chunked head's loss and
gradients equal the formula computed by autograd; an untrained adapter (B = 0) adds no KL; the term is the KL to the
model with its adapter off, and descending it brings a drifted adapter back; the collated mask covers exactly the
replay examples (padded and packed); a run says it uses the term; the base's states kept before training give the
loss and gradients of its per-step forward; replay_loss_weight multiplies the replay tokens' part; bad settings are
one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from cli_setup import save_tiny_model, write_facts
from conftest import make_model

from lorakit.data.batching import collate_packed, pack_examples, pad_collate
from lorakit.lora import LoraConfig, get_lora_model
from lorakit.train import ConfigError, load_config, train
from lorakit.train.loss import Distill, _LinearCrossEntropy, causal_lm_loss


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_soft_target_head_loss_and_gradients_match_the_formula(w):
    torch.manual_seed(0)
    rows = torch.randn(7, 16, requires_grad=True)
    weight, teacher = torch.randn(50, 16), torch.randn(7, 16)
    targets = torch.randint(0, 50, (7,))
    fast = _LinearCrossEntropy.apply(rows, weight, None, targets, 3, teacher, w)  # 3 rows a chunk: 3 chunks
    (grad_fast,) = torch.autograd.grad(fast, rows)
    logp, t_logp = F.log_softmax(rows @ weight.T, -1), F.log_softmax(teacher @ weight.T, -1)
    ref = (1 - w) * F.nll_loss(logp, targets, reduction="sum") + w * (t_logp.exp() * (t_logp - logp)).sum()
    (grad_ref,) = torch.autograd.grad(ref, rows)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-5, atol=1e-6)


def lora_model():
    model = make_model("llama")
    return get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def batch_with_replay():
    torch.manual_seed(1)
    ids = torch.randint(3, 90, (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    replay = torch.zeros(3, 12, dtype=torch.bool)
    replay[1] = True  # the middle row is a replay row
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "replay": replay}


def test_an_untrained_adapter_adds_no_kl_and_weights_the_replay_labels():
    lora = lora_model()  # B = 0: the adapter is the base
    model, batch = lora.model, batch_with_replay()
    plain = {k: v for k, v in batch.items() if k != "replay"}
    with torch.no_grad():
        full, count = causal_lm_loss(model, plain)
        task_only, _ = causal_lm_loss(model, {**plain, "labels": plain["labels"].masked_fill(batch["replay"], -100)})
        w = 0.25
        mixed, mixed_count = causal_lm_loss(model, batch, distill=Distill(w, lora.disable_adapter))
        ignored, _ = causal_lm_loss(model, batch)  # the mask alone changes nothing
    replay_part = full - task_only
    assert mixed_count == count and replay_part > 0
    torch.testing.assert_close(mixed, task_only + (1 - w) * replay_part, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ignored, full)
    with torch.no_grad():  # replay_loss_weight: the replay tokens' part counts `scale` times
        scaled, _ = causal_lm_loss(model, batch, distill=Distill(w, lora.disable_adapter, scale=3.0))
    torch.testing.assert_close(scaled, task_only + 3 * (1 - w) * replay_part, rtol=1e-5, atol=1e-5)


def test_the_kl_term_is_the_kl_to_the_model_with_its_adapter_off():
    lora = lora_model()
    with torch.no_grad():
        for p in lora.model.parameters():
            if p.requires_grad:  # the LoRA weights: A and B away from zero
                p.normal_(0, 0.05)
    model, batch = lora.model, batch_with_replay()
    with torch.no_grad():
        only_kl, _ = causal_lm_loss(model, batch, distill=Distill(1.0, lora.disable_adapter))
        task = {k: v for k, v in batch.items() if k != "replay"}
        task_only, _ = causal_lm_loss(model, {**task, "labels": task["labels"].masked_fill(batch["replay"], -100)})
        logp = F.log_softmax(model(input_ids=batch["input_ids"][1:2]).logits[0, 3:11].float(), -1)
        with lora.disable_adapter():
            base = F.log_softmax(model(input_ids=batch["input_ids"][1:2]).logits[0, 3:11].float(), -1)
    expected = (base.exp() * (base - logp)).sum()
    assert expected > 1e-4
    torch.testing.assert_close(only_kl - task_only, expected, rtol=1e-4, atol=1e-5)


def test_the_collated_mask_covers_exactly_the_replay_examples():
    task = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    replay = {"input_ids": [8, 9], "labels": [-100, 9], "replay": True}
    padded = pad_collate([task, replay], pad_token_id=0)
    assert padded["replay"].tolist() == [[False, False, False], [True, True, False]]
    assert "replay" not in pad_collate([task, task], pad_token_id=0)  # unmarked data: no mask at all
    rows = pack_examples([task, replay], max_len=8)
    packed = collate_packed(rows, pad_token_id=0)
    assert packed["replay"].tolist() == [[False, False, False, True, True]]


def test_descent_on_the_kl_term_brings_a_drifted_adapter_back_to_the_base():
    lora = lora_model()
    model = lora.model
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # a drifted adapter: A and B away from zero
                p.normal_(0, 0.3)
    batch = batch_with_replay()
    batch["replay"][:] = True  # every row replays
    distill = Distill(1.0, lora.disable_adapter)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-2)
    kl_start = None
    for _ in range(60):
        loss, count = causal_lm_loss(model, batch, distill=distill)
        kl_start = float(loss) / count if kl_start is None else kl_start
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        loss, count = causal_lm_loss(model, batch, distill=distill)
    assert kl_start > 1e-2 and float(loss) / count < 0.3 * kl_start


def test_a_run_with_the_kl_term_trains_and_says_so(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    facts = write_facts(tmp_path / "facts.jsonl")
    general = tmp_path / "general.jsonl"  # the replay rows: other conversations than the task's
    general.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in GENERAL))
    cfg, _ = load_config(None, [f"model_name_or_path={model_dir}", f"dataset={facts}", f"replay_dataset={general}",
                                "replay_ratio=0.5", "replay_kl_weight=0.5", "replay_loss_weight=2",
                                f"output_dir={tmp_path / 'out'}", "max_steps=3", "plot_loss=false",
                                "save_strategy=no", "bf16=false"])
    assert train(cfg)["status"] == "completed"
    said = capsys.readouterr().err
    assert "KL to the base on their labels, weight 0.5; each of their tokens' loss counted 2 times" in said


GENERAL = [("Say hello.", "Hello there, how can I help?"), ("Count to three.", "One, two, three."),
           ("Name a colour.", "Blue is a colour."), ("What comes after Monday?", "Tuesday comes after Monday.")]


@pytest.mark.parametrize("overrides, message", [
    (["replay_kl_weight=1.5", "self_replay=true", "replay_ratio=0.3"], "replay_kl_weight must be in [0, 1], got 1.5"),
    (["replay_kl_weight=0.5"], "replay_kl_weight is set but replay_ratio is 0"),
    (["replay_kl_weight=0.5", "self_replay=true", "replay_ratio=0.3", "finetuning_type=full"],
     "replay_kl_weight needs finetuning_type lora or qlora"),
    (["replay_loss_weight=0", "replay_kl_weight=0.5", "self_replay=true", "replay_ratio=0.3"],
     "replay_loss_weight must be above 0, got 0"),
    (["replay_loss_weight=3", "self_replay=true", "replay_ratio=0.3"],
     "replay_loss_weight needs replay_kl_weight above 0"),
])
def test_bad_kl_settings_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["dataset=x", *overrides])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_kept_teacher_states_give_the_loss_and_gradients_of_the_per_step_forward():
    from lorakit.train.loss import TEACHER_KEY
    from lorakit.train.teacher import compute_states

    lora = lora_model()
    with torch.no_grad():
        for p in lora.model.parameters():
            if p.requires_grad:  # the adapter away from the base, so the teacher is not the student
                p.normal_(0, 0.05)
    model, batch = lora.model, batch_with_replay()
    items = [{"input_ids": batch["input_ids"][r].tolist(), "labels": batch["labels"][r].tolist(),
              **({"replay": True} if r == 1 else {})} for r in range(3)]  # training items, as prepare_data makes
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731  (the run's autocast: none, fp32)
    states = compute_states(model, items, lora.disable_adapter, no_autocast, torch.device("cpu"), pad_id=0)
    assert list(states.states) == [1] and states.states[1].shape == (12, model.config.hidden_size)
    cached = states.batch([0, 1, 2], 12)
    assert cached.shape == (3, 12, model.config.hidden_size) and not cached[0].any() and not cached[2].any()
    assert states.batch([0, 2], 12) is None  # no replay row in that micro-batch: the key is left out
    distill = Distill(0.6, lora.disable_adapter)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for extra in ({}, {TEACHER_KEY: cached}):
        loss, count = causal_lm_loss(model, {**batch, **extra}, distill=distill)
        results.append((loss.detach(), count, torch.autograd.grad(loss, params)))
    (loss_a, count_a, grads_a), (loss_b, count_b, grads_b) = results
    assert count_a == count_b
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("packing", [False, True])
def test_a_run_keeps_the_teachers_states_unless_packed_and_learns_the_same(tmp_path, capsys, monkeypatch, packing):
    import lorakit.train.trainer as trainer_module

    model_dir = save_tiny_model(tmp_path / "model")
    facts = write_facts(tmp_path / "facts.jsonl")
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in GENERAL))

    def run(name: str) -> float:
        cfg, _ = load_config(None, [f"model_name_or_path={model_dir}", f"dataset={facts}", f"replay_dataset={general}",
                                    "replay_ratio=0.5", "replay_kl_weight=1", f"output_dir={tmp_path / name}",
                                    "max_steps=4", "plot_loss=false", "save_strategy=no", "bf16=false",
                                    f"packing={str(packing).lower()}"])
        return train(cfg)["train_loss"]

    kept = run("kept")
    said = capsys.readouterr().err
    monkeypatch.setattr(trainer_module, "TEACHER_MAX_BYTES", 0)  # nothing fits: the base runs at every step
    every_step = run("every-step")
    said_after = capsys.readouterr().err
    if packing:
        assert "KL to the base: its forward runs on the replay rows of every step (packed rows)" in said
    else:
        assert "replay rows computed once" in said and "MB would exceed 0 MB" in said_after
    assert kept == pytest.approx(every_step, rel=1e-5)
