"""Precision choice follows what the hardware supports."""

import pytest
import torch

from lorakit import device as dev


def test_cpu_bf16_follows_flags(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(dev.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(dev, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert dev.autocast_dtype(cpu, bf16=True, fp16=False) == torch.bfloat16
    monkeypatch.setattr(dev, "cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.warns(UserWarning, match="no native bf16"):
        assert dev.autocast_dtype(cpu, bf16=True, fp16=False) is None


def test_fp16_only_on_cuda_and_not_both():
    with pytest.warns(UserWarning, match="only used on CUDA"):
        assert dev.autocast_dtype(torch.device("cpu"), bf16=False, fp16=True) is None
    with pytest.raises(ValueError, match="choose one"):
        dev.autocast_dtype(torch.device("cpu"), bf16=True, fp16=True)
    assert dev.autocast_dtype(torch.device("cpu"), bf16=False, fp16=False) is None


def test_pick_device():
    assert dev.pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert dev.pick_device().type == "cpu"
        with pytest.raises(ValueError, match="CUDA is not available"):
            dev.pick_device("cuda")
