"""`lorakit merge` / `lorakit export` end to end on tiny models saved to disk: HF reload and logits, weighted
combinations against add_weighted_adapter, DoRA / rsLoRA / PiSSA adapters, GGUF files, and bad input."""

from __future__ import annotations

import copy

import gguf
import pytest
import torch
import yaml
from cli_setup import random_adapter, save_tiny_model, train_adapter, write_facts
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.adapters import load_adapters, parse_adapter_specs
from lorakit.cli import main
from lorakit.commands.arguments import parse_command
from lorakit.commands.merge import ALIASES, MergeArgs
from lorakit.data import TEMPLATES, get_template
from lorakit.export.chat_template import builtin_chat_template
from lorakit.export.hf import logits_on, probe_ids

VOCAB = 320


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    model = save_tiny_model(root / "model")
    data = write_facts(root / "facts.jsonl")
    a = train_adapter(model, data, root / "a", "max_steps=2")  # a real `lorakit train` output directory
    b, _ = random_adapter(model, root / "b", seed=1)  # rank 4 (a has 8)
    return {"root": root, "model": model, "a": a, "b": b}


def adapter_logits(model_dir, spec: str, probe: torch.Tensor) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return logits_on(load_adapters(base, parse_adapter_specs(spec)), probe)


def reload_logits(out, probe: torch.Tensor) -> torch.Tensor:
    return logits_on(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), probe)


def leftovers(parent) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_seed_000_export_line_writes_a_plain_transformers_model(setup, tmp_path, capsys):
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": str(setup["model"]), "template": "chatml",
                                      "trust_remote_code": True, "export_size": 5, "export_device": "cpu",
                                      "export_legacy_format": False}))
    out = tmp_path / "merged"
    rc = main(["export", str(config), f"adapter_name_or_path={setup['a']}", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "max |logits diff| vs the adapter model" in err and "ignoring keys that change nothing here" in err
    probe = probe_ids(VOCAB)
    torch.testing.assert_close(reload_logits(out, probe), adapter_logits(setup["model"], str(setup["a"]), probe),
                               atol=1e-4, rtol=0)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    written, trained = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(setup["a"])
    assert written.apply_chat_template(conversation, tokenize=False) == \
        trained.apply_chat_template(conversation, tokenize=False)  # built-in chatml renders as the test's own
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["dora", "rslora", "pissa"])
def test_variant_adapters_merge_to_the_adapter_models_logits(kind, setup, tmp_path):
    _, lm = random_adapter(setup["model"], tmp_path / "adapter", seed=3, use_dora=kind == "dora",
                           use_rslora=kind == "rslora", init_lora_weights="pissa" if kind == "pissa" else True)
    probe = probe_ids(VOCAB)
    expected = logits_on(lm, probe)  # the in-memory adapter model (PiSSA: on its rewritten base)
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--export_dir", str(tmp_path / "out")]) == 0
    torch.testing.assert_close(reload_logits(tmp_path / "out", probe), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("combination,extra", [("cat", []), ("linear", []), ("svd", ["--svd_rank", "6"]),
                                               ("ties", ["--density", "0.5"])])
def test_weighted_merge_equals_add_weighted_adapter(combination, extra, setup, tmp_path):
    spec = f"a={setup['a']},b={setup['b']}"
    if combination in ("linear", "ties"):  # factored combinations need equal ranks
        spec = f"a={setup['a']},b={setup['a']}"
    rc = main(["merge", "--adapters", spec, "--weights", "0.7,0.3", "--combination", combination, *extra,
               "--export_dir", str(tmp_path / "out")])
    assert rc == 0
    lm = load_adapters(AutoModelForCausalLM.from_pretrained(setup["model"]).eval(), parse_adapter_specs(spec))
    torch.manual_seed(0)
    svd_rank = int(extra[1]) if combination == "svd" else None
    density = float(extra[1]) if combination == "ties" else None
    lm.add_weighted_adapter(["a", "b"], [0.7, 0.3], "m", combination_type=combination, svd_rank=svd_rank,
                            density=density)
    expected = lm.merge_and_unload(adapter_names=["m"]).state_dict()
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    for key, tensor in expected.items():
        torch.testing.assert_close(written[key], tensor, atol=1e-6, rtol=0, msg=key)


def test_several_adapters_without_weights_add_their_deltas(setup, tmp_path):
    spec = f"a={setup['a']},b={setup['b']}"
    assert main(["merge", "--adapter", f"a={setup['a']}", "--adapter", f"b={setup['b']}",
                 "--export_dir", str(tmp_path / "out")]) == 0
    base = AutoModelForCausalLM.from_pretrained(setup["model"]).state_dict()
    lm = load_adapters(AutoModelForCausalLM.from_pretrained(setup["model"]).eval(), parse_adapter_specs(spec))
    lm.merge_adapter(["a", "b"])  # one after the other, as LLaMA-Factory merges a list of adapters
    expected = lm.unload().state_dict()
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(written[key], base[key])
    torch.testing.assert_close(written[key], expected[key], atol=1e-6, rtol=0)


def test_gguf_and_gguf_lora_with_modelfiles(setup, tmp_path):
    out = tmp_path / "gguf"
    assert main(["merge", f"adapter_name_or_path={setup['a']}", f"export_dir={out}", "--format", "gguf",
                 "--quant", "f32"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    assert (out / "Modelfile").read_text().startswith("FROM ./model.gguf")
    lm = load_adapters(AutoModelForCausalLM.from_pretrained(setup["model"]).eval(),
                       parse_adapter_specs(str(setup["a"])))
    merged = lm.merge_and_unload().state_dict()
    tensors = {t.name: t for t in gguf.GGUFReader(out / "model.gguf").tensors}
    v = torch.from_numpy(tensors["blk.0.attn_v.weight"].data.copy())
    torch.testing.assert_close(v, merged["model.layers.0.self_attn.v_proj.weight"])
    assert main(["merge", f"adapter_name_or_path={setup['a']}", f"export_dir={tmp_path / 'q8'}",
                 "--format", "gguf", "--quant", "q8_0"]) == 0
    q8 = {t.name: t for t in gguf.GGUFReader(tmp_path / "q8" / "model.gguf").tensors}
    assert q8["blk.0.attn_v.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0

    lora_out = tmp_path / "lora"
    assert main(["export", "--adapter", str(setup["a"]), "--export_dir", str(lora_out), "--format", "gguf-lora"]) == 0
    assert sorted(p.name for p in lora_out.iterdir()) == ["Modelfile", "adapter.gguf"]
    modelfile = (lora_out / "Modelfile").read_text()
    assert f"FROM {setup['model'].resolve()}" in modelfile and "ADAPTER ./adapter.gguf" in modelfile
    reader = gguf.GGUFReader(lora_out / "adapter.gguf")
    assert any(t.name == "blk.0.attn_q.weight.lora_a" for t in reader.tensors)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_builtin_templates_become_jinja_that_renders_the_same(name, tokenizer):
    bound = get_template(name, tokenizer)
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = builtin_chat_template(bound)
    conversations = [[{"role": "user", "content": "hi"}],
                     [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]]
    for messages in conversations:
        for generation in (True, False):
            expected = "".join(text for text, _ in bound.segments(messages, add_generation_prompt=generation))
            assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation) == expected


def test_yaml_overrides_and_flags_combine():
    args, _ = parse_command(MergeArgs, ["adapter_name_or_path=A,B", "export_dir=out", "--format", "gguf",
                                        "--quant=q8_0", "--weights", "0.5,0.5", "--combination", "svd",
                                        "--overwrite"], ALIASES)
    assert (args.adapter_name_or_path, args.export_dir, args.export_format, args.export_quant) == \
        ("A,B", "out", "gguf", "q8_0")
    assert args.weight_values() == [0.5, 0.5] and args.combination_type == "svd" and args.overwrite_output_dir


def test_help_lists_every_key(capsys):
    assert main(["merge", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("export_dir", "export_size", "export_dtype", "export_device", "export_legacy_format", "weights",
                "combination_type", "density", "svd_rank", "overwrite_output_dir", "--format", "--quant"):
        assert key in out
    assert main(["export", "--help"]) == 0 and capsys.readouterr().out.startswith("usage: lorakit export")


def _bad_cases(setup, tmp_path):
    empty = tmp_path / "not_an_adapter"
    empty.mkdir(exist_ok=True)
    gpt2 = tmp_path / "gpt2"
    if not gpt2.exists():
        save_tiny_model(gpt2, arch="gpt2")
    small = tmp_path / "small"
    if not small.exists():
        save_tiny_model(small, hidden_size=32, intermediate_size=48)
    a, b = str(setup["a"]), str(setup["b"])
    return {
        "no adapter_config": (["--adapter", str(empty)], "adapter_config.json", str(empty)),
        "missing base": (["--adapter", a, "--model", str(tmp_path / "nowhere")], "not found", "nowhere"),
        "weights count": (["--adapters", f"{a},{b}", "--weights", "1"], "1 weight(s) for 2 adapter(s)", "weights"),
        "weights zero": (["--adapters", f"{a},{b}", "--weights", "0,0"], "positive sum", "weights"),
        "weights negative": (["--adapters", f"{a},{b}", "--weights", "0.5,-1"], "positive sum", "weights"),
        "combination": (["--adapters", f"{a},{b}", "--combination", "average"], "'average' is unknown",
                        "combination_type"),
        "gguf arch": (["--model", str(gpt2), "--format", "gguf"], "model_type 'gpt2'", "GGUF"),
        "legacy": (["--adapter", a, "export_legacy_format=true"], ".bin", "export_legacy_format"),
        "quant": (["--adapter", a, "--format", "gguf", "--quant", "q4_k"], "q4_k", "export_quant"),
        "shape": (["--adapter", a, "--model", str(small)], "does not fit this model", str(setup["a"])),
        "unknown key": (["--adapter", a, "export_sise=2"], "did you mean 'export_size'", "export_sise"),
        "ranks": (["--adapters", f"{a},{b}", "--combination", "linear"], "equal rank", "r=4"),
    }


CASES = ["no adapter_config", "missing base", "weights count", "weights zero", "weights negative", "combination",
         "gguf arch", "legacy", "quant", "shape", "unknown key", "ranks"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_writes_nothing(case, setup, tmp_path, capsys):
    argv, message, culprit = _bad_cases(setup, tmp_path)[case]
    out = tmp_path / "exports" / "out"
    rc = main(["merge", *argv, "--export_dir", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lorakit merge: error")]
    assert rc != 0 and len(err) == 1, err
    assert message in err[0] and culprit in err[0]
    assert not out.exists() and (not out.parent.exists() or leftovers(out.parent) == [])


def test_occupied_export_dir_is_refused_unless_overwrite(setup, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", "--adapter", str(setup["a"]), "--export_dir", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["merge", "--adapter", str(setup["a"]), "--export_dir", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_interrupted_export_leaves_nothing(setup, tmp_path, monkeypatch, capsys):
    import lorakit.export.gguf as gguf_export

    def interrupted(writer, entries, path):
        path.parent.joinpath("model.gguf.part").write_bytes(b"half")  # something on disk when Ctrl-C comes
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_export, "_write", interrupted)
    out = tmp_path / "exports" / "out"
    assert main(["merge", "--adapter", str(setup["a"]), "--export_dir", str(out), "--format", "gguf"]) == 130
    assert "aborted; nothing written" in capsys.readouterr().err
    assert not out.exists() and leftovers(out.parent) == []
