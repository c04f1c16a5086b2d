"""Opening adapter directories: find their base model, load the base once, attach every adapter by name."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .lora import LoraConfig, LoraModel
from .lora.mixed import BASE

TRAINING_ARGS = "training_args.yaml"  # written by `lorakit train` beside the adapter


def parse_adapter_specs(specs: list[str] | str | None) -> list[tuple[str, Path]]:
    """"dir", "name=dir", or a comma list of them -> [(name, dir)]; names default to the directory name
    ("default" for a single unnamed adapter, as PEFT names it)."""
    if not specs:
        return []
    items = [s.strip() for spec in ([specs] if isinstance(specs, str) else specs) for s in spec.split(",")]
    items = [s for s in items if s]
    pairs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = ("default" if len(items) == 1 else Path(item).name), item
        pairs.append((name, Path(path).expanduser()))
    names = [n for n, _ in pairs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"adapter name(s) used twice: {', '.join(duplicated)}; name them with NAME=DIR")
    if BASE in names:
        raise ValueError(f"'{BASE}' is reserved for 'no adapter'")
    return pairs


def check_adapter_dirs(pairs: list[tuple[str, Path]]) -> dict[str, LoraConfig]:
    """Read every adapter_config.json up front, so a bad directory fails before any model is loaded."""
    configs = {}
    for name, path in pairs:
        if not path.is_dir():
            raise FileNotFoundError(f"adapter '{name}': directory '{path}' does not exist")
        configs[name] = LoraConfig.load(path)
    return configs


def training_args(directory: str | Path) -> dict:
    """The resolved settings `lorakit train` saved beside an adapter (training_args.yaml), or {} when absent."""
    path = Path(directory) / TRAINING_ARGS
    if not path.is_file():
        return {}
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise ValueError(f"{path}: invalid YAML") from None
    return raw if isinstance(raw, dict) else {}


def base_model_of(configs: dict[str, LoraConfig], explicit: str | None,
                  dirs: dict[str, Path] | None = None) -> str | None:
    """The base to load: the one given, else the adapters' common base_model_name_or_path (or the
    model_name_or_path of their training_args.yaml); None means the default model."""
    if explicit:
        return explicit
    bases = set()
    for name, config in configs.items():
        base = config.base_model_name_or_path
        if not base and dirs and name in dirs:
            base = training_args(dirs[name]).get("model_name_or_path")
        bases.add(base)
    if len(bases) > 1:
        raise ValueError(f"the adapters were trained on different base models ({', '.join(map(str, bases))}); "
                         f"pass model_name_or_path to choose one")
    return bases.pop() if bases else None


def template_of(pairs: list[tuple[str, Path]], explicit: str | None) -> str | None:
    """The chat template: the one given, else the one the adapters were trained with (training_args.yaml);
    None means the tokenizer's own. Adapters trained with different templates need an explicit choice."""
    if explicit:
        return explicit
    found = {name: training_args(path).get("template") or None for name, path in pairs}
    names = {t for t in found.values() if t}
    if len(names) > 1:
        listed = ", ".join(f"{n}: {t}" for n, t in found.items())
        raise ValueError(f"the adapters were trained with different chat templates ({listed}); pass template=NAME")
    return names.pop() if names else None


@dataclass
class AdapterPlan:
    """What to open, decided from the adapter directories alone (nothing loaded yet)."""

    pairs: list[tuple[str, Path]]
    configs: dict[str, LoraConfig]
    base: str | None
    template: str | None

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.pairs]


def plan_adapters(specs: list[str] | str | None, model_name_or_path: str | None = None,
                  template: str | None = None) -> AdapterPlan:
    """Parse NAME=DIR specs, read every adapter_config.json, pick the base model and the chat template."""
    pairs = parse_adapter_specs(specs)
    configs = check_adapter_dirs(pairs)
    base = base_model_of(configs, model_name_or_path, dict(pairs))
    return AdapterPlan(pairs, configs, base, template_of(pairs, template))


def load_adapters(model: torch.nn.Module, pairs: list[tuple[str, Path]], is_trainable: bool = False):
    """Attach the adapters to `model`; returns a LoraModel (first adapter active), or `model` when there are none."""
    if not pairs:
        return model
    (first, first_path), rest = pairs[0], pairs[1:]
    lora = LoraModel.from_pretrained(model, first_path, adapter_name=first, is_trainable=is_trainable)
    for name, path in rest:
        lora.load_adapter(path, adapter_name=name, is_trainable=is_trainable)
    return lora


def open_model(adapter_specs: list[str] | str | None, model_name_or_path: str | None = None,
               dtype: str = "float32", device: str | None = None):
    """(model with adapters, tokenizer, adapter names): every check runs before the base model is loaded."""
    from .models import load_model

    plan = plan_adapters(adapter_specs, model_name_or_path)
    model, tokenizer, _ = load_model(plan.base, dtype=dtype, device=device)
    return load_adapters(model, plan.pairs), tokenizer, plan.names


def use_adapter(model, name: str | None):
    """Context in which `model` runs adapter `name` on its plain path (`"__base__"`: adapters disabled)."""
    if not isinstance(model, LoraModel) or name is None:
        return contextlib.nullcontext()
    if name == BASE:
        return model.disable_adapter()
    model.set_adapter(name)
    return contextlib.nullcontext()
