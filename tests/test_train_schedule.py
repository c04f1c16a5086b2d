"""The learning-rate schedule: hand-checked values, and transformers' schedulers as the oracle."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.train.schedule import get_lr, warmup_steps_for


def test_warmup_rises_from_zero_then_linear_decays_to_zero():
    lrs = [get_lr(s, 1.0, total_steps=10, warmup_steps=2, kind="linear") for s in range(10)]
    assert lrs[:3] == [0.0, 0.5, 1.0]
    assert lrs[3] == pytest.approx(7 / 8)
    assert lrs[9] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_cosine_is_half_way_at_the_middle_and_constant_keeps_warmup():
    assert get_lr(7, 2.0, total_steps=12, warmup_steps=2, kind="cosine") == pytest.approx(1.0)  # (7-2)/(12-2)
    assert get_lr(2, 2.0, total_steps=12, warmup_steps=2, kind="cosine") == pytest.approx(2.0)
    assert [get_lr(s, 1.0, 10, 4, "constant") for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert get_lr(0, 3e-4, 10, 0, "constant") == 3e-4


def test_warmup_steps_win_over_ratio():
    assert warmup_steps_for(100, warmup_steps=0, warmup_ratio=0.1) == 10
    assert warmup_steps_for(95, warmup_steps=0, warmup_ratio=0.1) == 10  # ceil, as transformers
    assert warmup_steps_for(100, warmup_steps=3, warmup_ratio=0.1) == 3


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        get_lr(5, 1.0, 10, 0, "polynomial")


@pytest.mark.parametrize("kind,hf_kind", [("linear", "linear"), ("cosine", "cosine"),
                                          ("constant_with_warmup", "constant_with_warmup")])
def test_matches_transformers_schedulers(kind, hf_kind):
    from transformers import get_scheduler

    total, warmup, base = 17, 3, 0.1
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = get_scheduler(hf_kind, opt, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total):
        assert math.isclose(opt.param_groups[0]["lr"], get_lr(step, base, total, warmup, kind), abs_tol=1e-12)
        opt.step()
        sched.step()
