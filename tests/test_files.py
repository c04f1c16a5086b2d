"""lorakit.files: writes that land whole or not at all, and the adapter save built on them."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from lorakit import files
from lorakit.files import staged_directory, staged_file, staged_files, write_file


def _fail_second_move_into(monkeypatch, directory):
    """Make the second os.replace that moves a file into `directory` raise, as a full disk would."""
    real, calls = os.replace, []

    def replace(src, dst):
        if os.path.dirname(os.fspath(dst)) == os.fspath(directory):
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_write_file_replaces_whole_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_file(path, "one")
    write_file(path, b"two")
    assert path.read_text() == "two" and sorted(p.name for p in path.parent.iterdir()) == ["a.json"]
    mode = stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # a plain create's permissions, not tempfile's 0600


def test_a_failed_file_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), staged_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_staged_directory_replaces_all_at_once_or_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint-2"
    with staged_directory(target) as tmp:
        (tmp / "a").write_text("1")
    with staged_directory(target) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in target.iterdir()] == ["b"]  # the old directory is gone, not merged
    real_rename = type(target).rename

    def rename(self, dst):
        if self.name.startswith(files.TEMP_PREFIX) and "old-" not in self.name:
            raise OSError(28, "No space left on device")  # the new directory cannot be renamed in
        return real_rename(self, dst)

    monkeypatch.setattr(type(target), "rename", rename)
    with pytest.raises(OSError), staged_directory(target) as tmp:
        (tmp / "c").write_text("3")
    assert [p.name for p in target.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]


def test_staged_files_puts_the_old_files_back_when_the_second_move_fails(tmp_path, monkeypatch):
    directory = tmp_path / "out"
    directory.mkdir()
    (directory / "a.txt").write_text("old a")
    (directory / "b.txt").write_text("old b")
    (directory / "notes").write_text("the user's")
    _fail_second_move_into(monkeypatch, directory)  # a placed, b placed <- fails
    with pytest.raises(OSError), staged_files(directory) as tmp:
        (tmp / "a.txt").write_text("new a")
        (tmp / "b.txt").write_text("new b")
    assert {p.name: p.read_text() for p in directory.iterdir()} == {"a.txt": "old a", "b.txt": "old b",
                                                                    "notes": "the user's"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _adapter_model():
    from conftest import make_model

    from lorakit import LoraConfig, get_lora_model

    return get_lora_model(make_model("llama"), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))


def test_adapter_save_is_all_or_nothing(tmp_path, monkeypatch):
    """The adapter's second file cannot be moved into place: the directory keeps the first save's pair."""
    out = tmp_path / "adapter"
    model = _adapter_model()
    model.save_pretrained(out)
    (out / "training_args.yaml").write_text("kept: true\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    _fail_second_move_into(monkeypatch, out)  # the first file is in place, the second cannot follow
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    monkeypatch.undo()
    model.save_pretrained(out)  # and a save that works replaces both
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    assert after["training_args.yaml"] == before["training_args.yaml"]


def test_a_fresh_adapter_directory_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    model = _adapter_model()
    import lorakit.lora.io as io

    def broken_save(config, directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.LoraConfig, "save", broken_save)  # the weights are written, the config is not
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []
