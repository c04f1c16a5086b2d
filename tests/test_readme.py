"""The README's Python example runs as written and prints what the README says."""

import re
from pathlib import Path

from cli_setup import save_tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    claimed = re.search(r"# (trainable params: .*)", code).group(1)
    assert claimed in printed
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()


def test_every_train_key_is_documented():
    import dataclasses

    from lorakit.train import TrainConfig

    text = README.read_text()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`{f.name}`" not in text]
    assert not missing, f"README lacks train keys: {missing}"


def test_every_command_is_documented():
    from lorakit.cli import COMMANDS

    text = README.read_text()
    assert all(f"lorakit {name}" in text for name in COMMANDS)


def test_qlora_example_runs_on_a_tiny_model(tmp_path, monkeypatch):
    """The QLoRA section's Python block, with the default model swapped for a tiny one saved to disk."""
    import lorakit.models
    from lorakit.quant import quantized_layers

    tiny = save_tiny_model(tmp_path / "tiny")
    real = lorakit.models.load_model
    monkeypatch.setattr(lorakit.models, "load_model", lambda name, **kw: real(str(tiny), device="cpu", **kw))
    code = re.search(r"## QLoRA.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert len(quantized_layers(scope["lora"])) == 14  # quantize_model, then LoRA on top
    assert len(quantized_layers(scope["model"])) == 14  # load_model(..., quantization=...)
