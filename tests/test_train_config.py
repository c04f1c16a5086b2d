"""TrainConfig: LLaMA-Factory keys, defaults, every problem at once, ignored keys, did-you-mean, generated help."""

from __future__ import annotations

import dataclasses

import pytest

from lorakit.train.config import ConfigError, TrainConfig
from lorakit.train.options import IGNORED_KEYS, config_help, field_docs, from_mapping, load_config

# The keys of LLaMA-Factory's examples/train_lora/llama3_lora_sft.yaml, with the model path changed.
LLAMA_FACTORY_SFT = """\
### model
model_name_or_path: /models/Meta-Llama-3-8B-Instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""


def test_llama_factory_example_loads(tmp_path):
    path = tmp_path / "llama3_lora_sft.yaml"
    path.write_text(LLAMA_FACTORY_SFT)
    config, ignored = load_config(path)
    assert config.lora_target == "all" and config.lora_targets == "all-linear"
    assert config.lora_alpha == 16  # LLaMA-Factory: lora_alpha defaults to 2 * lora_rank
    assert config.learning_rate == 1e-4 and config.num_train_epochs == 3.0 and config.bf16
    assert config.template == "llama3" and config.val_size == 0.1 and config.eval_steps == 500
    assert set(ignored) == {"trust_remote_code", "overwrite_cache", "preprocessing_num_workers", "report_to",
                            "dataloader_num_workers", "save_only_model"}
    assert config.ddp_timeout == 180000000  # read now: the distributed keys are TrainConfig fields


def test_defaults_follow_llama_factory():
    config, _ = from_mapping({"dataset": "x"})
    assert (config.lora_rank, config.lora_alpha, config.lora_dropout, config.cutoff_len) == (8, 16, 0.0, 2048)
    assert (config.learning_rate, config.lr_scheduler_type, config.max_grad_norm, config.seed) == (5e-5, "linear",
                                                                                                   1.0, 42)
    assert config.packing is False and config.eval_steps == config.logging_steps
    assert from_mapping({"dataset": "x", "stage": "pt"})[0].packing is True


def test_typo_gets_did_you_mean():
    with pytest.raises(ConfigError, match="unknown key 'lora_rnak'; did you mean 'lora_rank'"):
        from_mapping({"dataset": "x", "lora_rnak": 4})


def test_every_problem_is_reported_at_once():
    raw = {"datset": "x", "lora_rank": "abc", "bf16": True, "fp16": True, "learning_rate": -1,
           "lr_scheduler_type": "cosin", "use_galore": True}
    with pytest.raises(ConfigError) as info:
        from_mapping(raw)
    text = str(info.value)
    for expected in ("'datset'; did you mean 'dataset'", "lora_rank must be int", "bf16 and fp16",
                     "learning_rate must be positive", "lr_scheduler_type must be one of", "GaLore",
                     "dataset is required"):
        assert expected in text
    assert len(info.value.problems) == 7


def test_unsupported_keys_are_fine_at_their_neutral_value():
    _, ignored = from_mapping({"dataset": "x", "use_galore": False, "adapter_name_or_path": None})
    assert set(ignored) == {"use_galore", "adapter_name_or_path"}
    with pytest.raises(ConfigError, match="quantization_bit must be 4 or 8"):  # QLoRA keys: tests/test_qlora.py
        from_mapping({"dataset": "x", "quantization_bit": 3})


def test_lora_only_options_need_lora():
    with pytest.raises(ConfigError, match="use_dora is only valid with finetuning_type: lora"):
        from_mapping({"dataset": "x", "finetuning_type": "full", "use_dora": True})


def test_overrides_are_yaml_scalars_and_coerced(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: a\nlearning_rate: 1e-4\nlora_target: [q_proj, v_proj]\n")  # 1e-4: a string to YAML
    config, _ = load_config(path, ["num_train_epochs=2", "max_samples=null", "bf16=true", "resume_from_checkpoint=true",
                                   "evaluation_strategy=steps", "val_size=0.2"])
    assert config.learning_rate == 1e-4 and isinstance(config.num_train_epochs, float)
    assert config.lora_targets == ["q_proj", "v_proj"] and config.max_samples is None and config.bf16
    assert config.resume_from_checkpoint is True and config.eval_strategy == "steps"
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        load_config(path, ["=3"])


def test_yaml_file_problems_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: a\nlora_rank: [1, 2\n")
    with pytest.raises(ConfigError, match="line 3"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    config, _ = from_mapping({"dataset": "x,y", "lora_rank": 4, "packing": None})
    path = tmp_path / "training_args.yaml"
    path.write_text(config.to_yaml())
    again, ignored = load_config(path)
    assert again == config and not ignored


def test_help_documents_every_key():
    docs, text = field_docs(), config_help()
    for f in dataclasses.fields(TrainConfig):
        assert f.name in docs and docs[f.name], f"{f.name} has no docstring"
        assert f"  {f.name} = " in text
    assert "overwrite_cache" in text and IGNORED_KEYS
