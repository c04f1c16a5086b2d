"""QLoRA's quantize-while-loading (`load_model(..., quantization=...)`, lorakit.quant.load): the same quantized
layers as loading whole and quantizing after, without ever holding every full-precision linear weight at once."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from cli_setup import save_tiny_model
from safetensors.torch import load_file, save_file

from lorakit.lora.layers import dense_weight
from lorakit.models import load_model
from lorakit.quant import Quantization, QuantLinear, quantize_model, quantized_layers
from lorakit.quant.load import INDEX_NAME, WEIGHTS_NAME


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_load")
    return {arch: save_tiny_model(root / arch, arch=arch) for arch in ("llama", "llama_tied", "gpt2")}


def both_ways(path, quantization: Quantization):
    streamed, _, _ = load_model(str(path), device="cpu", quantization=quantization)
    after, _, _ = load_model(str(path), device="cpu")
    quantize_model(after, quantization.bits, quantization.quant_type, quantization.double_quant,
                   quantization.compute_dtype, quantization.backend)
    return streamed, after


def assert_same(streamed, after):
    layers, expected = dict(quantized_layers(streamed)), dict(quantized_layers(after))
    assert layers.keys() == expected.keys() and len(layers) > 0
    for name, layer in layers.items():
        assert type(layer) is type(expected[name])
        assert torch.equal(dense_weight(layer), dense_weight(expected[name])), name
    dense = {k: v for k, v in after.state_dict().items() if v.is_floating_point()}
    for key, value in streamed.state_dict().items():
        if key in dense:
            assert torch.equal(value, dense[key]), key
    tokens = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(streamed(tokens).logits, after(tokens).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "gpt2"])
@pytest.mark.parametrize("backend", ["lorakit", "bnb"])
def test_quantize_while_loading_equals_quantize_after_loading(models, arch, backend):
    pytest.importorskip("bitsandbytes") if backend == "bnb" else None
    streamed, after = both_ways(models[arch], Quantization(backend=backend))
    assert_same(streamed, after)
    head, embed = streamed.get_output_embeddings(), streamed.get_input_embeddings()
    assert type(head) is torch.nn.Linear and (head.weight is embed.weight) == (arch != "llama")
    assert not any(t.is_meta for t in [*streamed.parameters(), *streamed.buffers()])
    assert streamed.lorakit_quantization["layers"] == len(quantized_layers(streamed))


def test_eight_bit_and_fp4_too(models):
    assert_same(*both_ways(models["llama"], Quantization(bits=8, backend="lorakit")))
    assert_same(*both_ways(models["llama"], Quantization(quant_type="fp4", double_quant=False, backend="lorakit")))


def test_full_precision_linear_weights_never_all_exist(models, monkeypatch):
    """Each time a layer is quantized, count the bytes of live full-precision tensors shaped like a linear weight:
    while loading it is one layer's; loaded whole first, it is all of them."""
    model, _, _ = load_model(str(models["llama"]), device="cpu")
    shapes = {tuple(m.weight.shape) for _, m in model.named_modules()
              if type(m) is torch.nn.Linear and m is not model.get_output_embeddings()}
    sizes = [m.weight.numel() * 4 for _, m in model.named_modules()
             if type(m) is torch.nn.Linear and m is not model.get_output_embeddings()]
    del model
    samples = []
    real_init = QuantLinear.__init__

    def counting_init(self, weight, *args, **kwargs):
        if not samples or streaming:  # only what this load holds: tensors other tests left alive are the baseline
            samples.append(live_bytes(shapes) - baseline)
        real_init(self, weight, *args, **kwargs)

    monkeypatch.setattr(QuantLinear, "__init__", counting_init)
    streaming = True
    gc.collect()
    baseline = live_bytes(shapes)
    load_model(str(models["llama"]), device="cpu", quantization=Quantization(backend="lorakit"))
    assert len(samples) == len(sizes) == 14
    assert max(samples) <= max(sizes) < sum(sizes) / 4  # one layer's weight at a time
    samples.clear()
    streaming = False
    gc.collect()
    baseline = live_bytes(shapes)
    model, _, _ = load_model(str(models["llama"]), device="cpu")
    quantize_model(model, backend="lorakit")
    assert samples[0] >= sum(sizes)  # the ordinary route: the whole model first


def live_bytes(shapes: set[tuple[int, ...]]) -> int:
    """Bytes of live, real (not meta) floating tensors of the given shapes (a tensor and its views count once)."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not obj.is_meta and obj.is_floating_point() \
                and tuple(obj.shape) in shapes | {s[::-1] for s in shapes} and obj.data_ptr() not in seen:
            seen.add(obj.data_ptr())
            total += obj.numel() * obj.element_size()
    return total


def test_sharded_checkpoint(models, tmp_path):
    """A sharded safetensors checkpoint (an index and two files) streams too."""
    source = models["llama"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    tensors = load_file(str(source / WEIGHTS_NAME))
    keys = sorted(tensors)
    halves = {"a.safetensors": keys[:len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for file, part in halves.items():
        save_file({k: tensors[k] for k in part}, str(tmp_path / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: file for file, part in halves.items() for k in part}}
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    streamed, _, _ = load_model(str(tmp_path), device="cpu", quantization=Quantization(backend="lorakit"))
    _, after = both_ways(source, Quantization(backend="lorakit"))
    assert_same(streamed, after)


def test_a_checkpoint_with_other_names_is_loaded_whole_then_quantized(models, tmp_path, capsys):
    """Tensor names transformers has to convert (here: a base-model checkpoint without the `model.` prefix)."""
    source = models["llama"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    tensors = load_file(str(source / WEIGHTS_NAME))
    renamed = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    renamed["lm_head.weight"] = tensors["lm_head.weight"]
    save_file(renamed, str(tmp_path / WEIGHTS_NAME), metadata={"format": "pt"})
    streamed, _, _ = load_model(str(tmp_path), device="cpu", quantization=Quantization(backend="lorakit"))
    assert "loading it whole, then quantizing" in capsys.readouterr().err
    _, after = both_ways(source, Quantization(backend="lorakit"))
    assert_same(streamed, after)
