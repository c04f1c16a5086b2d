"""`make demo`'s driver runs end to end (on a tiny model here; the real run is `make demo`)."""

import json

from cli_setup import save_tiny_model

from lorakit import demo


def test_demo_runs_and_reports_before_and_after(tmp_path, capsys, monkeypatch):
    full = demo.held_out_items
    monkeypatch.setattr(demo, "held_out_items", lambda dataset_dir: full(dataset_dir)[:8])  # keep the test fast
    probes = demo.load_probes()
    monkeypatch.setattr(demo, "load_probes", lambda: probes[:8])
    model_dir = save_tiny_model(tmp_path / "base")
    out = tmp_path / "adapter"
    # self-replay is tested in test_replay.py: a random tiny base rarely ends a sentence
    status = demo.main([f"model_name_or_path={model_dir}", f"output_dir={out}", "max_steps=2",
                        "per_device_train_batch_size=4", "plot_loss=false", "self_replay=false", "replay_ratio=0",
                        "replay_kl_weight=0"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "held-out score (answer contains the fact)" in printed
    assert f"lorakit chat --adapter {out}" in printed
    assert "| model | n | contains | exact_match | rouge_l | retention | kl |" in printed
    assert f"  Q: {demo.GENERAL}\n     before: " in printed and "general probes the base answers right" in printed
    summary = json.loads((out / "demo_results.json").read_text())
    assert 0.0 <= summary["heldout_contains_after"] <= 1.0
    assert summary["kl"] >= 0 and summary["retention_kept"] <= summary["retention_base_right"] <= 8
    low, high = summary["heldout_95"]  # the Wilson interval of the held-out share, also printed
    assert low <= summary["heldout_contains_after"] <= high and "(95 % interval " in printed
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_args.yaml").is_file()


def test_demo_config_is_valid():
    from lorakit.train import load_config

    config, ignored = load_config(demo.CONFIG, [])
    assert not ignored and config.dataset == "kb_train" and config.model_name_or_path is None
    assert config.self_replay and 0 < config.replay_ratio < 1  # the demo keeps what the base knew (issue 17)
