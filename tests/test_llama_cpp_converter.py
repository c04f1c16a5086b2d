"""llama.cpp's own `convert_lora_to_gguf.py` reads a lorakit adapter, and writes what lorakit's `write_gguf_lora`
writes: the same tensor names, shapes, values and alpha.

The script ships in the llama-cpp-python sdist (vendor/llama.cpp, with its gguf-py and conversion package). The
test fetches the sdist with pip once into $LORAKIT_HOME/sdist (never into the repository) and skips, saying why,
when it cannot be fetched (offline).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from cli_setup import random_adapter, save_tiny_model

from lorakit.export.gguf import write_gguf_lora
from lorakit.models import lorakit_home

VERSION = "0.3.36"  # llama-cpp-python, pinned: the converter's command line and output are what is tested
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
VENDOR = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
NEEDED = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter() -> Path:
    """convert_lora_to_gguf.py from the cached sdist (fetched with pip the first time); skips if unavailable."""
    home = lorakit_home()
    script = home / f"llama.cpp-{VERSION}" / "convert_lora_to_gguf.py"
    if script.is_file():
        return script
    sdist = home / "sdist" / SDIST
    if not sdist.is_file():
        sdist.parent.mkdir(parents=True, exist_ok=True)
        try:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                   f"llama-cpp-python=={VERSION}", "-d", str(sdist.parent)],
                                  capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip(f"fetching the llama-cpp-python {VERSION} sdist timed out")
        if proc.returncode != 0 or not sdist.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"cannot fetch the llama-cpp-python {VERSION} sdist (llama.cpp's converter): {last}")
    target = home / f".tmp-llama.cpp-{VERSION}-{os.getpid()}"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(VENDOR) and m.name[len(VENDOR):].startswith(NEEDED) and m.isfile()]
        for member in members:
            member.name = member.name[len(VENDOR):]
        tar.extractall(target, members=members, filter="data")
    target.rename(script.parent)  # complete or absent: an interrupted extraction is never used
    return script


def tensors(path: Path) -> dict[str, np.ndarray]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: np.array(t.data).reshape([int(n) for n in reversed(t.shape)]) for t in reader.tensors}


def alpha_of(path: Path) -> float:
    import gguf

    field = gguf.GGUFReader(str(path)).fields["adapter.lora.alpha"]
    return float(field.parts[field.data[0]][0])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpps_converter_reads_a_lorakit_adapter(arch, tmp_path):
    script = converter()
    base = save_tiny_model(tmp_path / "base", arch=arch)
    adapter, lora = random_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8)
    out = tmp_path / "converted.gguf"
    proc = subprocess.run([sys.executable, str(script), "--base", str(base), "--outtype", "f32", "--outfile", str(out),
                           str(adapter)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    converted = tensors(out)
    layers, modules = 2, ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    assert set(converted) == {f"blk.{i}.{m}.weight.lora_{ab}" for i in range(layers) for m in modules
                              for ab in "ab"}
    state = lora.exportable("default")[1]
    a = state["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].numpy()
    b = state["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].numpy()
    assert converted["blk.1.ffn_down.weight.lora_a"].shape == a.shape == (4, 96)  # (r, in)
    assert converted["blk.1.ffn_down.weight.lora_b"].shape == b.shape == (64, 4)  # (out, r)
    np.testing.assert_array_equal(converted["blk.1.ffn_down.weight.lora_a"], a)
    np.testing.assert_array_equal(converted["blk.1.ffn_down.weight.lora_b"], b)
    ours = tmp_path / "lorakit.gguf"
    write_gguf_lora(lora, None, None, ours, quant="f32")
    written = tensors(ours)
    assert written.keys() == converted.keys()
    for name, value in converted.items():  # q/k rows permuted for llama's rotary as llama.cpp does it
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    assert alpha_of(ours) == alpha_of(out) == 8.0
