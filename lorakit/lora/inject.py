"""Finding the modules a LoraConfig targets and swapping them for LoRA layers in place."""

from __future__ import annotations

import re

from torch import nn

from .config import DEFAULT_TARGETS, LoraConfig
from .layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave, is_conv1d, is_quantized
from .params import LoraParameters

LAYER_PATTERNS = ("layers", "h", "blocks", "layer", "block")
CONDENSE_FROM = 20  # PEFT condenses a target list of this many names or more into name suffixes


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, transformers' Conv1D, or a quantized linear that keeps in/out features (bitsandbytes, torchao)."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_quantized(module)


def supported(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, nn.Embedding)


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct last name components of the model's linear layers, for error messages."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if is_linear(m)})


def _output_head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, m in model.named_modules() if head is not None and m is head}


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str] | str:
    """The target list with None (architecture default) and "all-linear" expanded."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(f"target_modules is not set and there is no default for model type {model_type!r}; "
                             f"linear modules in this model: {', '.join(linear_module_names(model))}")
        return list(DEFAULT_TARGETS[model_type])
    if targets == "all-linear":
        heads = _output_head_names(model)
        targets = sorted({name for name, m in model.named_modules()
                          if (is_linear(m) or isinstance(m, LoraLinear)) and name not in heads
                          and not _inside_wrapper(model, name)})
    if isinstance(targets, list) and len(targets) >= CONDENSE_FROM:
        return condensed_targets(model, targets)
    return targets


def _suffixes(name: str) -> list[str]:
    """"a.b.c" -> ["c", "b.c", "a.b.c"]: the names that match `name` by suffix, shortest first."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


def condensed_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The fewest name suffixes that match every target and no other module, as PEFT writes a long target list
    (all-linear on a real model becomes q_proj, k_proj, ...: what vLLM and llama.cpp's converter read). Returns
    `targets` unchanged when no shorter list separates them from the other modules."""
    wanted = set(targets)
    others = [key for key, _ in model.named_modules() if key and key not in wanted and not _matches(key, targets)]
    taken = {suffix for key in others for suffix in _suffixes(key)}
    chosen: set[str] = set()
    for key in sorted(wanted):
        if _matches(key, sorted(chosen)):
            continue
        chosen.add(next(s for s in _suffixes(key) if s not in taken))  # the full name itself is never taken
    if len(chosen) >= len(wanted):
        return targets
    return sorted(chosen)


def _matches(key: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return any(key == t or key.endswith("." + t) for t in targets)


def _layer_allowed(key: str, config: LoraConfig) -> bool:
    if config.layers_to_transform is None:
        return True
    patterns = config.layers_pattern or LAYER_PATTERNS
    patterns = [patterns] if isinstance(patterns, str) else patterns
    for pattern in patterns:
        found = re.match(rf".*\.{pattern}\.(\d+)\.", key)
        if found:
            return int(found.group(1)) in config.layers_to_transform
    return False


def _inside_wrapper(model: nn.Module, key: str) -> bool:
    """True for modules that live inside a LoRA layer or a ModulesToSave (base_layer, lora_A, copies)."""
    parts = key.split(".")
    module = model
    for part in parts[:-1]:
        module = getattr(module, part)
        if isinstance(module, (LoraLayer, ModulesToSave)):
            return True
    return False


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules to wrap; one-line errors for an empty match or an unsupported module type."""
    if config.target_modules == [] and config.target_parameters:
        return []  # parameters only (PEFT writes target_modules [] then)
    targets = resolve_targets(model, config)
    excluded = config.exclude_modules
    found, unsupported = [], []
    for key, module in model.named_modules():
        if not key or not _matches(key, targets) or _inside_wrapper(model, key):
            continue
        if excluded and _matches(key, excluded) or not _layer_allowed(key, config):
            continue
        (found if supported(module) or isinstance(module, LoraLayer) else unsupported).append(key)
    if unsupported:
        kind = type(model.get_submodule(unsupported[0])).__name__
        raise ValueError(f"target module '{unsupported[0]}' is a {kind}; LoRA wraps Linear, Conv1D and Embedding "
                         f"layers only (linear modules here: {', '.join(linear_module_names(model))})")
    if not found:
        raise ValueError(f"target_modules {config.target_modules!r} matched no module; "
                         f"linear modules in this model: {', '.join(linear_module_names(model))}")
    return found


def set_submodule(model: nn.Module, key: str, new: nn.Module) -> None:
    parent_name, _, child = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_adapter(model: nn.Module, config: LoraConfig, adapter_name: str,
                   init_factors: dict | None = None) -> list[str]:
    """Wrap (or extend) every targeted module with adapter `adapter_name`; returns the wrapped names.
    `init_factors` (module name -> loraga.GradientFactors) is what init_lora_weights="lora_ga" starts from."""
    keys = find_targets(model, config)
    if config.init_lora_weights == "lora_ga":
        missing = [key for key in keys if key not in (init_factors or {})]
        if missing:
            raise ValueError(f"init_lora_weights='lora_ga' needs the gradient factors of every target layer "
                             f"(lorakit.lora.gradient_factors(model, config, batches), passed as lora_ga_factors=); "
                             f"missing for {', '.join(missing[:3])}")
    svd = config.PEFT_TYPE == "ADALORA"
    for key in keys:
        module = model.get_submodule(key)
        if svd and isinstance(module, (nn.Embedding, LoraEmbedding)):
            raise ValueError(f"AdaLoRA adapts linear layers only; '{key}' is an embedding")
        if not isinstance(module, LoraLayer):
            module = LoraEmbedding(module) if isinstance(module, nn.Embedding) else LoraLinear(module)
            set_submodule(model, key, module)
        module.add_adapter(adapter_name, r=config.rank_for(key), lora_alpha=config.alpha_for(key),
                           lora_dropout=config.lora_dropout, init=config.init_lora_weights,
                           use_rslora=config.use_rslora, use_dora=config.use_dora,
                           init_factors=(init_factors or {}).get(key), lora_ga_config=config.lora_ga_config,
                           **({"svd": True, "scaling": config.scaling_for(key)} if svd else {}))
    for key, names in match_parameters(model, config.target_parameters or []).items():
        module = model.get_submodule(key)
        if not isinstance(module, LoraParameters):
            module = LoraParameters(module, names)
            set_submodule(model, key, module)
        elif module.param_names != names:
            raise ValueError(f"'{key}': every adapter with target_parameters must target the same parameters "
                             f"({', '.join(module.param_names)}), as in PEFT; this one targets {', '.join(names)}")
        module.add_adapter(adapter_name, r=config.rank_for(key), lora_alpha=config.alpha_for(key),
                           lora_dropout=config.lora_dropout, init=config.init_lora_weights,
                           use_rslora=config.use_rslora, use_dora=config.use_dora)
        keys.append(key)
    for key in _modules_to_save_keys(model, config):
        module = model.get_submodule(key)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            set_submodule(model, key, module)
        module.add_adapter(adapter_name)
    return keys


def _modules_to_save_keys(model: nn.Module, config: LoraConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    keys = [key for key, _ in model.named_modules()
            if key and _matches(key, config.modules_to_save) and not _inside_wrapper(model, key)]
    if not keys:
        raise ValueError(f"modules_to_save {config.modules_to_save!r} matched no module in the model")
    return keys


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(k, m) for k, m in model.named_modules() if isinstance(m, LoraLayer)]


def wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every LoRA layer and ModulesToSave wrapper, with its name."""
    return [(k, m) for k, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSave))]


def match_parameters(model: nn.Module, targets: list[str]) -> dict[str, list[str]]:
    """Module name -> its parameters that `targets` name (suffixes of "<module>.<parameter>", as PEFT matches them),
    in the module's own parameter order (PEFT's nesting order, which the file keys follow); one-line error for a
    target that matches nothing."""
    found: dict[str, list[str]] = {}
    used = set()
    for key, module in model.named_modules():
        if not key or _inside_wrapper(model, key) or (isinstance(module, LoraLayer)
                                                      and not isinstance(module, LoraParameters)):
            continue
        base = module.base_layer if isinstance(module, LoraParameters) else module
        for pname, _ in base.named_parameters(recurse=False):
            hits = [t for t in targets if f"{key}.{pname}" == t or f"{key}.{pname}".endswith("." + t)]
            if hits:
                found.setdefault(key, []).append(pname)
                used.update(hits)
    missing = [t for t in targets if t not in used]
    if missing:
        raise ValueError(f"target_parameters {missing[0]!r} matched no parameter of the model")
    return found


def uncovered_weights(model: nn.Module) -> dict[str, int]:
    """"<module>.<parameter>" suffix -> count, for the weight matrices and tensors no adapter covers that are not
    nn.Linear layers (so all-linear skips them): MoE routers and fused expert tensors, typically. Embeddings,
    norms, the output head and what LoRA wraps are left out."""
    heads = _output_head_names(model)
    out: dict[str, int] = {}
    for key, module in model.named_modules():
        if not key or key in heads or _inside_wrapper(model, key) or isinstance(module, ModulesToSave):
            continue
        covered: list[str] = []
        if isinstance(module, LoraParameters):  # some of its parameters may be left
            module, covered = module.base_layer, module.param_names
        elif isinstance(module, LoraLayer) or is_linear(module) or isinstance(module, nn.Embedding):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() >= 2 and pname not in covered:
                name = f"{key.rsplit('.', 1)[-1]}.{pname}"
                out[name] = out.get(name, 0) + 1
    return out
