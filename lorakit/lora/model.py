"""LoraModel: a transformers model with LoRA adapters, behind PEFT's method names."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from . import adalora, combine, io, mixed
from .adalora import AdaLoraConfig
from .config import LoraConfig
from .inject import inject_adapter, lora_layers, resolve_targets, set_submodule, wrappers
from .layers import LoraLayer, ModulesToSave


class LoraModel(nn.Module):
    """Wraps `model` (adapters are injected into it in place) and exposes PEFT's API.

    `lora_model.model` is the transformers model; attribute lookups that LoraModel does not answer fall through
    to it (config, device, generation_config, ...).
    """

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                 lora_ga_factors: dict | None = None) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter: str | None = None
        self._initial_factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._stacks = mixed.StackCache()  # per-row adapter stacks of the last mixed call (mixed.py)
        self._layers: list[LoraLayer] | None = None  # lora_layers(model), reset when adapters are added or removed
        self._replaced_base: dict[str, dict[str, torch.Tensor]] = {}  # adapter -> base weights its file replaced
        self.add_adapter(adapter_name, config, lora_ga_factors=lora_ga_factors)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    # --- adapters ----------------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: LoraConfig, lora_ga_factors: dict | None = None) -> None:
        """Inject a new adapter and make it the active one. init_lora_weights="lora_ga" starts from
        `lora_ga_factors` (lorakit.lora.gradient_factors(model, config, batches), computed on the plain model)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter '{adapter_name}' already exists; delete it first or pick another name")
        if adapter_name == mixed.BASE:
            raise ValueError(f"'{mixed.BASE}' is reserved for 'no adapter'")
        if self.merged and isinstance(config.init_lora_weights, str) and config.init_lora_weights != "gaussian":
            raise ValueError("unmerge the merged adapter before adding a PiSSA/OLoRA/LoRA-GA adapter")
        if config.target_modules is None or isinstance(config.target_modules, list):
            # record what is wrapped as PEFT does: the architecture's default, or a long list (all-linear) condensed
            # to name suffixes, so the saved config is the one PEFT, vLLM and llama.cpp's converter expect
            config = dataclasses.replace(config, target_modules=resolve_targets(self.model, config))
        elif config.target_modules == "all-linear":
            config = dataclasses.replace(config, target_modules=resolve_targets(self.model, config))
        self._layers = None
        self._stacks.clear()
        inject_adapter(self.model, config, adapter_name, init_factors=lora_ga_factors)
        config = _with_fan_in_fan_out(self.model, adapter_name, config, source=None)
        self.peft_config[adapter_name] = config
        if isinstance(config.init_lora_weights, str) and config.init_lora_weights != "gaussian":
            self._initial_factors[adapter_name] = {
                key: (m.lora_A[adapter_name].weight.detach().clone(), m.lora_B[adapter_name].weight.detach().clone())
                for key, m in lora_layers(self.model) if adapter_name in getattr(m, "lora_A", {})}
        self.set_adapter(adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active adapter; only it trains (unless loaded for inference)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter '{adapter_name}'; loaded: {', '.join(self.peft_config)}")
        if self.merged and adapter_name != self.active_adapter:
            raise ValueError("unmerge the merged adapter (unmerge_adapter()) before switching adapters")
        self.active_adapter = adapter_name
        for _, module in wrappers(self.model):
            module.active_adapter = adapter_name if adapter_name in module.adapter_names() else None
        self._set_trainable()

    def _set_trainable(self) -> None:
        """Freeze everything, then unfreeze the active adapter, its modules_to_save and biases per `bias`."""
        name = self.active_adapter
        config = self.peft_config[name]
        for p in self.model.parameters():
            p.requires_grad_(False)
        if config.inference_mode:
            return
        for p in io.adapter_tensors(self.model, name, config.bias).values():
            p.requires_grad_(True)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if self.active_adapter else []

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter '{adapter_name}'; loaded: {', '.join(self.peft_config)}")
        for _, module in wrappers(self.model):
            module.delete_adapter(adapter_name)
        self._layers = None
        self._stacks.clear()
        del self.peft_config[adapter_name]
        self._initial_factors.pop(adapter_name, None)
        self._restore_base(adapter_name)
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config), None)
            if self.active_adapter:
                self.set_adapter(self.active_adapter)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model inside the block; a merged adapter is unmerged for it and merged back after."""
        was_merged = [(m, list(m.merged_adapters)) for _, m in lora_layers(self.model) if m.merged]
        modules = wrappers(self.model)
        for m, _ in was_merged:
            m.unmerge()
        for _, m in modules:
            m.disabled = True
        try:
            yield
        finally:
            for _, m in modules:
                m.disabled = False
            for m, names in was_merged:
                m.merge(names)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None, density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """A new adapter from a weighted combination of loaded ones (PEFT's semantics; see lora/combine.py)."""
        if any(getattr(self.peft_config.get(a), "target_parameters", None) for a in adapters):
            raise ValueError("add_weighted_adapter does not combine adapters with target_parameters (expert tensors)")
        if any(isinstance(self.peft_config.get(a), AdaLoraConfig) for a in adapters):
            raise ValueError("add_weighted_adapter does not combine AdaLoRA adapters (as in PEFT); pass them per row "
                             "as adapter_names=[{name: weight}] or merge them one by one")
        combine.add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, density,
                                     majority_sign_method)

    # --- merging -----------------------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return any(m.merged for m in self._layer_list())  # the cached list: every mixed call asks

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = True) -> None:
        """Fold the active adapter (or `adapter_names`) into the base weights. A no-op when already merged.
        Over a 16-bit base each merged layer keeps the weight it replaced, so that unmerge_adapter() restores the
        base bit for bit (one copy of those weights while merged)."""
        self._merge(adapter_names or [self.active_adapter], safe_merge, keep_original=None)

    def _merge(self, names: list[str], safe_merge: bool, keep_original: bool | None) -> None:
        layers = lora_layers(self.model)
        if safe_merge:  # check every layer first, so a bad delta leaves the whole model unchanged
            for key, m in layers:
                for name in names:
                    if name in m.adapter_names() and name not in m.merged_adapters:
                        if not m.merge_is_finite(name):
                            raise ValueError(f"merging adapter '{name}' would put NaN/Inf into '{key}'; "
                                             f"nothing was merged")
        for _, m in layers:
            m.merge([n for n in names if n in m.adapter_names()], safe_merge=False, keep_original=keep_original)

    def unmerge_adapter(self) -> None:
        for _, m in lora_layers(self.model):
            m.unmerge()

    def merge_and_unload(self, safe_merge: bool = True, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge, then return the plain transformers model with no LoRA modules left (no copy of the base kept;
        base weights that an adapter file carried stay, as they are part of what was merged)."""
        self._merge(adapter_names or [self.active_adapter], safe_merge, keep_original=False)
        self._replaced_base.clear()
        return self.unload()

    def unload(self) -> nn.Module:
        """Remove every LoRA module without merging; modules_to_save keep the active adapter's copy. Base weights
        replaced by a loaded adapter file are restored, so the model is the one LoraModel was given."""
        for name in list(self._replaced_base):
            self._restore_base(name)
        for key, module in wrappers(self.model):
            if isinstance(module, LoraLayer):
                set_submodule(self.model, key, module.base_layer)
            elif isinstance(module, ModulesToSave):
                set_submodule(self.model, key, module.current())
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._stacks.clear()
        self._layers = None
        return self.model

    def replaced_base_weights(self, adapter_name: str) -> list[str]:
        """Names of the base parameters that adapter `adapter_name`'s file replaced (a targeted embedding's base
        weight, as PEFT saves it): while it is loaded, these differ for every adapter and for the base model."""
        return sorted(self._replaced_base.get(adapter_name, {}))

    def _restore_base(self, adapter_name: str) -> None:
        with torch.no_grad():
            for key, original in self._replaced_base.pop(adapter_name, {}).items():
                self.model.get_parameter(key).copy_(original)

    def get_base_model(self) -> nn.Module:
        return self.model

    @property
    def base_model(self) -> nn.Module:
        return self.model

    # --- parameter counts --------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, counted as PEFT counts them (4-bit packed weights x2)."""
        trainable = total = 0
        for _, p in self.named_parameters():
            n = p.numel()
            if p.__class__.__name__ == "Params4bit":
                n *= 2 * (p.element_size() if hasattr(p, "element_size") else 1)
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    # --- running -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _routing(self, adapter_names: list[str] | None, expand: int = 1) -> Iterator[None]:
        """Make a Routing for `adapter_names` current for one call (see mixed.py); nothing is set on the layers."""
        if adapter_names is None:
            yield
            return
        if self.model.training:
            raise ValueError("adapter_names (an adapter per row) is for inference: call model.eval() first; "
                             "to train an adapter, use set_adapter()")
        if self.merged:
            raise ValueError("adapter_names needs unmerged adapters; call unmerge_adapter() first")
        names, _ = mixed.parse_names(list(adapter_names), set(self.peft_config))  # errors name the entry's index
        for name in names:
            if self.peft_config[name].target_parameters:
                raise ValueError(f"adapter_names: adapter '{name}' has target_parameters (LoRA on expert tensors); "
                                 f"per-row adapters do not cover it: use set_adapter() or merge it")
        for entry in adapter_names:
            self.check_adapter_entry(entry)
        bank = tuple(n for n, c in self.peft_config.items() if not c.target_parameters)
        routing = mixed.make_routing(list(adapter_names), bank, self.model.device,
                                     self._stacks.get(self._layer_list(), bank))
        with mixed.routed(routing.expanded(expand)):
            yield

    def _layer_list(self) -> list[LoraLayer]:
        """The model's LoRA layers, found once per change of adapters (a walk over every module costs a step's
        worth of Python on a large model)."""
        if self._layers is None:
            self._layers = [m for _, m in lora_layers(self.model)]
        return self._layers

    def check_adapter_entry(self, entry: str | dict[str, float]) -> None:
        """Raise ValueError unless `entry` can route a row: an adapter name, BASE, or {name: weight} over loaded
        adapters none of which is DoRA or has modules_to_save (those cannot be mixed by weight)."""
        mixed.parse_names([entry], set(self.peft_config))
        if isinstance(entry, str):
            return
        for name in entry:
            config = self.peft_config[name]
            if config.use_dora or config.modules_to_save:
                kind = "a DoRA adapter" if config.use_dora else "an adapter with modules_to_save"
                raise ValueError(f"adapter_names: the weighted combination {dict(entry)!r} includes '{name}', "
                                 f"{kind}; such adapters cannot be combined by weight, use it alone")

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The transformers model's forward; `adapter_names` picks an adapter per batch row (inference only)."""
        with self._routing(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """transformers' generate; `adapter_names` has one entry per prompt, also with num_return_sequences/beams."""
        with self._routing(adapter_names, expand=_sequences_per_prompt(self.model, kwargs)):
            return self.model.generate(*args, **kwargs)

    # --- files -------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, selected_adapters: list[str] | None = None) -> None:
        """PEFT layout: the "default" adapter in `save_directory`, others in sub-folders named after them.

        Adapters initialised with PiSSA/OLoRA are written converted to plain LoRA of rank 2r that applies to the
        original (untouched) base weights: s B A - s B0 A0 = s [B, -B0] [A; A0].
        """
        for name in selected_adapters or list(self.peft_config):
            target = Path(save_directory) if name == "default" else Path(save_directory) / name
            config, state = self.exportable(name)
            io.write_adapter(target, config, state)

    def exportable(self, name: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
        """(config, PEFT-keyed CPU tensors) of adapter `name` as save_pretrained writes it (PiSSA/OLoRA converted)."""
        config = self.peft_config[name]
        state = io.state_dict_for_save(self.model, name, config.bias)
        if isinstance(config, AdaLoraConfig):  # PEFT's AdaLoRA files hold the kept triplets only
            return dataclasses.replace(config, inference_mode=True), adalora.kept_triplets(state, config.rank_pattern)
        initial = self._initial_factors.get(name)
        if not initial:
            return dataclasses.replace(config, inference_mode=True), state
        for key, (a0, b0) in initial.items():
            a_key, b_key = f"{io.BASE_PREFIX}{key}.lora_A.weight", f"{io.BASE_PREFIX}{key}.lora_B.weight"
            state[a_key] = torch.cat([state[a_key], a0.cpu().to(state[a_key].dtype)], dim=0)  # (2r, in)
            state[b_key] = torch.cat([state[b_key], -b0.cpu().to(state[b_key].dtype)], dim=1)  # (out, 2r)
        # rank doubles; alpha follows so that the scaling (alpha / r, or alpha / sqrt(r)) is unchanged
        factor = math.sqrt(2) if config.use_rslora else 2
        converted = dataclasses.replace(
            config, r=2 * config.r, lora_alpha=factor * config.lora_alpha, init_lora_weights=True, lora_ga_config=None,
            inference_mode=True,
            rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
            alpha_pattern={k: factor * v for k, v in config.alpha_pattern.items()})
        return converted, state

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | Path, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None) -> "LoraModel":
        """Load a PEFT-format adapter directory onto `model`."""
        file_config, state = io.read_adapter(model_id)
        config = dataclasses.replace(config or file_config, inference_mode=not is_trainable)
        lora = cls(model, dataclasses.replace(config, init_lora_weights=_load_init(config)), adapter_name)
        lora.peft_config[adapter_name] = _with_fan_in_fan_out(lora.model, adapter_name, config, source=str(model_id))
        try:
            lora._replaced_base[adapter_name] = io.load_into(lora.model, state, adapter_name, config.bias,
                                                             source=str(model_id))
        except Exception:
            lora.unload()  # the model is handed back as it came
            raise
        lora._set_trainable()
        return lora

    def load_adapter(self, model_id: str | Path, adapter_name: str, is_trainable: bool = False) -> None:
        """Load another adapter; the active adapter does not change (as in PEFT)."""
        file_config, state = io.read_adapter(model_id)
        config = dataclasses.replace(file_config, inference_mode=not is_trainable)
        active = self.active_adapter
        self.add_adapter(adapter_name, dataclasses.replace(config, init_lora_weights=_load_init(config)))
        self.peft_config[adapter_name] = _with_fan_in_fan_out(self.model, adapter_name, config, source=str(model_id))
        try:
            self._replaced_base[adapter_name] = io.load_into(self.model, state, adapter_name, config.bias,
                                                             source=str(model_id))
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self.set_adapter(active)


def _with_fan_in_fan_out(model: nn.Module, adapter_name: str, config: LoraConfig, source: str | None) -> LoraConfig:
    """fan_in_fan_out as PEFT sets it: True when the targets store their weight (in, out) (GPT-2's Conv1D). The layer
    type decides the orientation; a config that says otherwise (a file written by an older lorakit, or by hand) is
    corrected with a warning, as PEFT does."""
    conv = any(getattr(m, "fan_in_fan_out", False) for _, m in lora_layers(model) if adapter_name in m.adapter_names())
    if config.fan_in_fan_out != conv and source is not None:
        warnings.warn(f"{source}: fan_in_fan_out={config.fan_in_fan_out} in the adapter config, but its targets are "
                      f"{'Conv1D' if conv else 'Linear'} layers: using fan_in_fan_out={conv}", stacklevel=3)
    return dataclasses.replace(config, fan_in_fan_out=conv)


def _sequences_per_prompt(model: nn.Module, kwargs: dict) -> int:
    """How many rows generate() makes of each prompt: max(num_beams, num_return_sequences), as transformers does."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", None)) or 1
    sequences = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", None)) or 1
    return max(int(beams), int(sequences))


def _load_init(config: LoraConfig) -> bool:
    """Loading overwrites the factors, so skip PiSSA/OLoRA (they would rewrite the base weights)."""
    return False if isinstance(config.init_lora_weights, str) and config.init_lora_weights != "gaussian" else True


def get_lora_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                   lora_ga_factors: dict | None = None) -> LoraModel:
    """Wrap `model` with a new adapter (PEFT: get_peft_model); `lora_ga_factors` for init_lora_weights="lora_ga"."""
    return LoraModel(model, config, adapter_name, lora_ga_factors=lora_ga_factors)
