"""Registry: the base model and the adapters it serves — loaded at start, loaded at run time, being unloaded —
each with the chat template it was trained with and its stop tokens.

Opening uses the pieces `lorakit chat` uses (adapters.py: parse, check every directory, find the base and each
adapter's template before any weight loads; chat.py: stop tokens), so a request's prompt and stop rules are
those of `lorakit chat --adapter DIR`. Unlike chat, adapters trained with different templates can be served side
by side: each renders with its own.

The model changes (`attach`, `detach`) only on the engine's thread, between steps. An adapter being unloaded
takes no new request (404) but stays in the model until the requests already accepted for it have finished.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters import base_model_of, check_adapter_dirs, load_adapters, parse_adapter_specs, template_of
from ..chat import stop_token_ids
from ..data import DataError, get_template
from ..lora import LoraConfig, LoraModel
from ..lora.mixed import BASE
from .protocol import ApiError


@dataclass
class Entry:
    """One servable model id: the base (`config` None) or an adapter."""

    name: str
    root: str
    template: object | None  # a bound template (.prompt_ids(messages), .stop_words); None: the tokenizer has none
    stop_ids: frozenset[int]
    config: LoraConfig | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    unloading: bool = False

    @property
    def adapter(self) -> str:
        return BASE if self.config is None else self.name

    def describe(self) -> str:
        if self.config is None:
            return f"{self.name} (base, template {self.template_label})"
        c = self.config
        targets = c.target_modules if isinstance(c.target_modules, str) else ",".join(c.target_modules or [])
        kind = " DoRA" if c.use_dora else ""
        kind += " rsLoRA" if c.use_rslora else ""
        extra = f", modules_to_save {','.join(c.modules_to_save)}" if c.modules_to_save else ""
        return (f"{self.name}: r={c.r} alpha={c.lora_alpha}{kind} targets {targets}{extra}, "
                f"template {self.template_label}, from {self.root}")

    @property
    def template_label(self) -> str:
        return self.template.name if self.template is not None else "none (chat completions refused)"


class Registry:
    def __init__(self, model, tokenizer, base_id: str, base_root: str, template: str | None) -> None:
        self.model, self.tokenizer, self.base_id, self.template_name = model, tokenizer, base_id, template
        self.entries: dict[str, Entry] = {}
        self.base = self._entry(base_id, base_root, None, None)

    def _entry(self, name: str, root: str, config: LoraConfig | None, path: Path | None) -> Entry:
        name_of = template_of([(name, path)], self.template_name) if path is not None else self.template_name
        try:
            template = get_template(name_of, self.tokenizer)
        except DataError:  # a tokenizer without a chat template: completions only (chat answers 400)
            template = None
        stops = stop_token_ids(self.tokenizer, self.model, template.stop_words if template else ())
        return Entry(name, root, template, frozenset(stops), config)

    # --- lookups (any thread) -------------------------------------------------------------------------------
    def resolve(self, model: str) -> Entry:
        """The entry a request's `model` names: the base id (or __base__) or an adapter; 404 otherwise."""
        if model in (self.base_id, BASE):
            return self.base
        entry = self.entries.get(model)
        if entry is None or entry.unloading:
            known = ", ".join([self.base_id] + self.names())
            raise ApiError(404, f"model '{model}' does not exist; served: {known}", param="model",
                           code="model_not_found")
        return entry

    def names(self) -> list[str]:
        return [n for n, e in self.entries.items() if not e.unloading]

    def weights(self, adapters: dict[str, float]) -> tuple[tuple[str, float], ...]:
        """A request's weighted combination {name: weight} of served adapters (delta = sum w_i s_i B_i A_i x);
        404 for an unknown name, 400 for a combination the per-row path refuses (one with a DoRA adapter, or with
        modules_to_save)."""
        if not adapters:
            raise ApiError(400, "adapters: give at least one {name: weight}", param="adapters")
        for name in adapters:
            if name not in self.names():
                raise ApiError(404, f"adapters: '{name}' is not a served adapter; served: {', '.join(self.names())}",
                               param="adapters", code="model_not_found")
        try:
            self.model.check_adapter_entry(dict(adapters))
        except ValueError as exc:
            raise ApiError(400, str(exc).replace("adapter_names: ", "adapters: "), param="adapters",
                           code="unsupported_value") from None
        return tuple(sorted(adapters.items()))

    def listing(self) -> list[dict]:
        """/v1/models: the base, then each adapter (parent = the base id, root = its directory)."""
        rows = [{"id": self.base_id, "object": "model", "created": self.base.created, "owned_by": "lorakit",
                 "root": self.base.root, "parent": None}]
        rows += [{"id": e.name, "object": "model", "created": e.created, "owned_by": "lorakit", "root": e.root,
                  "parent": self.base_id} for e in self.entries.values() if not e.unloading]
        return rows

    def check_name(self, name: str) -> None:
        if name in (self.base_id, BASE) or name in self.entries:
            state = " (being unloaded)" if name in self.entries and self.entries[name].unloading else ""
            raise ApiError(400, f"the name '{name}' is taken{state}; pick another lora_name", param="lora_name",
                           code="name_taken")

    # --- changes (engine thread) ----------------------------------------------------------------------------
    def attach(self, name: str, path: str) -> Entry:
        """Load the adapter at `path` as `name`; 400 when it cannot be read or does not fit the base."""
        self.check_name(name)
        directory = Path(path).expanduser()
        try:
            config = check_adapter_dirs([(name, directory)])[name]
            check_shareable(name, config)
            if isinstance(self.model, LoraModel):
                self.model.load_adapter(directory, adapter_name=name)
            else:
                self.model = load_adapters(self.model, [(name, directory)]).eval()
        except (OSError, ValueError) as exc:
            raise ApiError(400, f"cannot load adapter '{name}': {exc}", param="lora_path",
                           code="invalid_adapter") from None
        entry = self.entries[name] = self._entry(name, str(directory), self.model.peft_config[name], directory)
        return entry

    def detach(self, name: str) -> None:
        """Remove an adapter marked unloading (its last request has finished)."""
        self.model.delete_adapter(name)
        del self.entries[name]


def check_shareable(name: str, config: LoraConfig) -> None:
    """An adapter that changes what every row shares (the base's biases) cannot be served next to others."""
    if config.bias != "none":
        raise ValueError(f"adapter '{name}' trains the base model's biases (bias: {config.bias}), which every row "
                         f"of a batch shares; merge it (lorakit merge) and serve the merged model")


def open_registry(specs: str | None, model_name_or_path: str | None, template: str | None, dtype: str = "float32",
                  device: str | None = None) -> Registry:
    """Check every adapter directory, find the base, load it once, attach every adapter (as `lorakit chat`)."""
    from ..models import DEFAULT_MODEL, load_model

    pairs = parse_adapter_specs(specs)
    configs = check_adapter_dirs(pairs)
    for name, config in configs.items():
        check_shareable(name, config)
    base = base_model_of(configs, model_name_or_path, dict(pairs))
    for name, path in pairs:
        template_of([(name, path)], template)  # every adapter's template is readable before the weights load
    model, tokenizer, root = load_model(base, dtype=dtype, device=device)
    model = load_adapters(model, pairs).eval()
    registry = Registry(model, tokenizer, base or DEFAULT_MODEL, str(root), template)
    for name, path in pairs:
        registry.entries[name] = registry._entry(name, str(path), model.peft_config[name], path)
    return registry
