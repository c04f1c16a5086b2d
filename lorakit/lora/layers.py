"""LoRA layers: a wrapped base module plus one or more low-rank adapters.

    y = W0 x + scaling * B A dropout(x),   scaling = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r))

`lora_A` (r, in) and `lora_B` (out, r) are bias-free nn.Linears kept in ModuleDicts keyed by adapter name, so
the in-memory key `...q_proj.lora_A.default.weight` is the PEFT file key once the adapter name is dropped.

One forward computes that formula for the active adapter. What varies around it lives elsewhere, each in one place:
DoRA's terms in `dora.py` (for adapters with a magnitude vector), the no-grad fast path and the shared autocast
copy of the input in `fastpath.py` (same numbers, less work), and a batch whose rows use different adapters in
`mixed.py` (the routing is handed to the layer for one call by `LoraModel`, through `mixed.current_routing()`).

Merging adds scaling * B A (computed in fp32) into the base weight. Over a 16-bit base, merge keeps the weight it
replaced so that unmerge restores it bit for bit (fp32 arithmetic would not: bf16 has 8 bits of mantissa); over an
fp32 base, unmerge subtracts the delta again (exact to fp32 rounding) and keeps nothing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import dora, fastpath, mixed
from .init import init_embedding, init_lora_ga, init_plain, init_principal


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D (weight stored (in, out)), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


# --- quantized base layers (QLoRA): recognised by duck-typing, so this package needs no bitsandbytes ----------
BNB_QUANTIZED = ("Linear4bit", "Linear8bitLt")
QUANTIZED_MERGE = ("cannot merge into a quantized base layer ({kind}): the 4/8-bit weights cannot absorb a delta "
                   "exactly. Dequantize first (lorakit.quant.dequantize_model(model), or "
                   "lorakit.quant.merge_dequantized for the whole policy), then merge")


def is_quantized(module: nn.Module) -> bool:
    """A quantized linear: lorakit's QuantLinear (has `dequantize_weight`) or bitsandbytes' Linear4bit/8bitLt."""
    return callable(getattr(module, "dequantize_weight", None)) or type(module).__name__ in BNB_QUANTIZED


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a quantized linear, dequantized to its original dtype (a new tensor)."""
    if callable(getattr(module, "dequantize_weight", None)):
        return module.dequantize_weight()
    import bitsandbytes.functional as bnb_f  # only reached for a bitsandbytes layer, so it is installed

    w = module.weight
    if type(module).__name__ == "Linear8bitLt":  # int8 rows scaled by SCB / 127 (LLM.int8 vector-wise)
        return w.data.float() * (w.SCB.float()[:, None] / 127)
    data, state = w.data, w.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' CPU inference layout: undo on copies
        data, state = bnb_f._convert_weight_packed_for_cpu_inverse(data.clone(), copy.copy(state))
    return bnb_f.dequantize_4bit(data, state)


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters keep fp32 over a 16-bit or quantized base (PEFT's autocast_adapter_dtype), else the base dtype."""
    if weight.dtype in (torch.float32, torch.float64):
        return weight.dtype
    return torch.float32


def _discard(table: nn.ModuleDict | nn.ParameterDict, name: str) -> None:
    if name in table:
        del table[name]


SIXTEEN_BIT = (torch.bfloat16, torch.float16)


@dataclass
class MergeRecord:
    """What unmerging adapter `name` needs: DoRA's row factor at merge time, and over a 16-bit base the weight the
    merge replaced (so that unmerge restores it exactly)."""

    name: str
    dora_factor: torch.Tensor | None = None
    original: torch.Tensor | None = None


class LoraLayer(nn.Module):
    """Bookkeeping shared by the linear and embedding variants: adapters, scaling, merge state."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA: adapter -> module holding `weight` (out,)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.disabled = False  # set by LoraModel.disable_adapter() for the duration of its block
        self.merge_records: list[MergeRecord] = []  # merged adapters, oldest first

    # --- the parts a variant defines -------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B A for adapter `name`, in fp32 and in the base weight's layout."""
        raise NotImplementedError

    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def _drop_adapter_params(self, name: str) -> None:
        raise NotImplementedError

    # --- shared behaviour ------------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads `module.weight` keeps working on a wrapped module."""
        return self.base_layer.weight

    @property
    def merged_adapters(self) -> list[str]:
        return [record.name for record in self.merge_records]

    @property
    def merged(self) -> bool:
        return bool(self.merge_records)

    def _set_scalars(self, name: str, r: int, lora_alpha: float, use_rslora: bool, dropout: float,
                     scaling: float | None = None) -> None:
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        if scaling is None:
            scaling = lora_alpha / (r**0.5) if use_rslora else lora_alpha / r
        self.scaling[name] = scaling  # given by the config for AdaLoRA: lora_alpha / init_r
        # nn.Identity when p = 0: no copy of x and no random mask on the hot path
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def runs_adapter(self) -> bool:
        """True when the forward adds the active adapter (not disabled, not merged into the weight already)."""
        return not self.disabled and self.active_adapter is not None and not self.merged

    def merged_weight(self, name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W0 + s B A, DoRA's factor or None), fp32, in the base weight's layout; `w` is W0 in fp32. Changes
        nothing, so a caller can check every layer before merging any."""
        if is_quantized(self.base_layer):  # both merge paths come through here before changing anything
            raise ValueError(QUANTIZED_MERGE.format(kind=type(self.base_layer).__name__))
        merged = w + self.delta_weight(name)
        if name not in self.lora_magnitude_vector:
            return merged, None
        factor = dora.merge_factor(self, name, merged)
        return merged * factor.view(self._row_view()), factor

    def merge_is_finite(self, name: str) -> bool:
        """Whether merging adapter `name` would keep every weight finite (changes nothing)."""
        merged, _ = self.merged_weight(name, self.base_layer.weight.detach().float())
        return bool(torch.isfinite(merged).all())

    def merge(self, names: list[str] | None = None, safe_merge: bool = True, keep_original: bool | None = None) -> None:
        """Add the adapters' deltas to the base weight (fp32 arithmetic). Idempotent; refuses NaN/Inf.

        `keep_original` (default: when the base is 16-bit) keeps the replaced weight for an exact unmerge; a merge
        that is never undone (merge_and_unload) passes False and holds no copy."""
        weight = self.base_layer.weight
        if keep_original is None:
            keep_original = weight.dtype in SIXTEEN_BIT
        for name in names if names is not None else [self.active_adapter]:
            if name is None or name in self.merged_adapters:
                continue
            merged, factor = self.merged_weight(name, weight.detach().float())
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter '{name}' would put NaN/Inf into the weights; nothing was merged")
            original = weight.detach().clone() if keep_original else None
            weight.data.copy_(merged.to(weight.dtype))
            self.merge_records.append(MergeRecord(name, factor, original))

    def unmerge(self) -> None:
        """Undo every merge, newest first: the kept weight where there is one, else subtract the delta again."""
        weight = self.base_layer.weight
        while self.merge_records:
            record = self.merge_records.pop()
            if record.original is not None:
                weight.data.copy_(record.original)
                continue
            w = weight.detach().float()
            if record.dora_factor is not None:
                w = w / record.dora_factor.view(self._row_view())
            weight.data.copy_((w - self.delta_weight(record.name)).to(weight.dtype))

    def _row_view(self) -> tuple[int, int]:
        return (-1, 1)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter '{name}' is merged; unmerge it before deleting it")
        self._drop_adapter_params(name)
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(name, None)
        _discard(self.lora_dropout, name)
        _discard(self.lora_magnitude_vector, name)
        if self.active_adapter == name:
            remaining = self.adapter_names()
            self.active_adapter = remaining[0] if remaining else None


class LoraLinear(LoraLayer):
    """LoRA around nn.Linear, or around transformers' Conv1D (weight (in, out), fan_in_fan_out).

        y = W0 x + scaling * B A dropout(x)        A (r, in), B (out, r)
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        if is_quantized(base_layer):  # the stored weight is packed; the layer knows its shape
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            in_dim = 0 if self.fan_in_fan_out else 1  # Conv1D stores (in, out), Linear (out, in)
            shape = base_layer.weight.shape
            self.in_features, self.out_features = shape[in_dim], shape[1 - in_dim]
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_E = nn.ParameterDict()  # AdaLoRA: adapter -> (r, 1), y = W0 x + s B (E * (A x))

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0, init: bool | str = True,
                    use_rslora: bool = False, use_dora: bool = False, init_factors=None, lora_ga_config=None,
                    svd: bool = False, scaling: float | None = None) -> None:
        """Create adapter `name` and make it active (`init_factors`, `lora_ga_config`: init "lora_ga" only;
        `svd`: AdaLoRA's form with a singular-value vector E, see adalora.py)."""
        self._set_scalars(name, r, lora_alpha, use_rslora, lora_dropout, scaling)
        w = self.base_layer.weight
        dtype = adapter_dtype(w)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=dtype)
        if svd:
            self.lora_E[name] = nn.Parameter(torch.randn(r, 1, device=w.device, dtype=dtype))
            if init is not False and w.device.type != "meta":  # PEFT: E = 0, A and B normal(0, 0.02)
                with torch.no_grad():
                    self.lora_E[name].zero_()
                    nn.init.normal_(self.lora_A[name].weight, std=0.02)
                    nn.init.normal_(self.lora_B[name].weight, std=0.02)
        elif w.device.type != "meta":
            self._initialise(name, init, init_factors, lora_ga_config)
        if use_dora:
            magnitude = nn.Module()
            magnitude.weight = nn.Parameter(torch.empty(self.out_features, device=w.device, dtype=dtype))
            self.lora_magnitude_vector[name] = magnitude
            if w.device.type != "meta":
                dora.reset_magnitude(self, name)
        self.active_adapter = name

    def _initialise(self, name: str, init: bool | str, init_factors=None, lora_ga_config=None) -> None:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "lora_ga")):
            if is_quantized(self.base_layer):
                raise ValueError(f"{init} init rewrites the base weights, which a quantized base cannot hold; "
                                 "use the default init on a quantized base")
            if self.merged:
                raise ValueError(f"cannot add a {init} adapter while another adapter is merged")
            if init == "lora_ga":
                lora_A, lora_B, residual = init_lora_ga(init_factors, self.oriented_weight(), self.r[name],
                                                               self.scaling[name], lora_ga_config)
            else:
                lora_A, lora_B, residual = init_principal(self.oriented_weight(), init, self.r[name],
                                                          self.scaling[name])
            with torch.no_grad():
                a.copy_(lora_A)
                b.copy_(lora_B)
                weight = self.base_layer.weight
                weight.copy_((residual.T if self.fan_in_fan_out else residual).to(weight.dtype))
            return
        with torch.no_grad():
            init_plain(a, b, init, self.r[name])

    def reset_dora_magnitude(self, name: str) -> None:
        """m = ||W0 + s B A|| per output row (see dora.py)."""
        dora.reset_magnitude(self, name)

    def _drop_adapter_params(self, name: str) -> None:
        _discard(self.lora_A, name)
        _discard(self.lora_B, name)
        _discard(self.lora_E, name)

    def effective_a(self, name: str) -> torch.Tensor:
        """A (r, in), or E * A for an AdaLoRA adapter: the factor that multiplies x."""
        a = self.lora_A[name].weight
        return a * self.lora_E[name] if name in self.lora_E else a

    def oriented_weight(self) -> torch.Tensor:
        """The base weight as (out, in), fp32 (dequantized for a quantized base)."""
        if is_quantized(self.base_layer):
            return dense_weight(self.base_layer).float()
        w = self.base_layer.weight.detach().float()
        return w.T if self.fan_in_fan_out else w

    def oriented_delta(self, name: str) -> torch.Tensor:
        """scaling * B A as (out, in), fp32."""
        a = self.effective_a(name).float()  # (r, in)
        b = self.lora_B[name].weight.float()  # (out, r)
        return (b @ a) * self.scaling[name]  # (out, in)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.oriented_delta(name)
        return delta.T if self.fan_in_fan_out else delta

    def _row_view(self) -> tuple[int, int]:
        return (1, -1) if self.fan_in_fan_out else (-1, 1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """y = W0 x + scaling * B A dropout(x) for the active adapter (DoRA: dora.forward; per-row: mixed)."""
        routing = mixed.current_routing()
        if routing is not None:
            return mixed.linear_forward(self, routing, x, self.base_layer(x, *args, **kwargs))
        if not self.runs_adapter():
            return self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        lora_A, lora_B, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        is_dora, is_svd = name in self.lora_magnitude_vector, name in self.lora_E
        if not args and not kwargs and fastpath.applies(self.base_layer, x, lora_A.weight, dropout,
                                                        variant=is_dora or is_svd):
            return fastpath.plain_inference(x, self.base_layer, lora_A.weight, lora_B.weight, self.scaling[name])
        device = x.device.type
        if torch.is_autocast_enabled(device) and type(self.base_layer) is nn.Linear:
            x = fastpath.autocast_input(x, torch.get_autocast_dtype(device))  # one copy for q, k and v
            x_lora = dropout(x)
        else:
            x_lora = dropout(x.to(lora_A.weight.dtype))
        result = self.base_layer(x, *args, **kwargs)  # (..., out)
        if is_dora:
            return dora.forward(self, name, x_lora, result, reuse_base=isinstance(dropout, nn.Identity))
        scale = self.lora_E[name].view(-1) * self.scaling[name] if is_svd else self.scaling[name]  # (r,) or scalar
        lora_out = lora_B(lora_A(x_lora) * scale)  # (..., r) -> (..., out): scaling on r columns
        return result + lora_out.to(result.dtype)


class LoraEmbedding(LoraLayer):
    """LoRA around nn.Embedding: y = E[x] + scaling * (A^T[x]) B^T, with A (r, vocab) and B (dim, r)."""

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def adapter_names(self) -> list[str]:
        return list(self.lora_embedding_A.keys())

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0, init: bool | str = True,
                    use_rslora: bool = False, use_dora: bool = False, init_factors=None, lora_ga_config=None) -> None:
        if use_dora:
            raise ValueError("DoRA on embedding layers is not supported; remove the embedding from target_modules")
        if isinstance(init, str) and init not in ("gaussian",):
            raise ValueError(f"init_lora_weights={init!r} is not supported on embedding layers")
        self._set_scalars(name, r, lora_alpha, use_rslora, lora_dropout)
        w = self.base_layer.weight
        vocab, dim = w.shape
        dtype = adapter_dtype(w)
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, vocab, device=w.device, dtype=dtype))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, r, device=w.device, dtype=dtype))
        if w.device.type != "meta":
            with torch.no_grad():
                init_embedding(self.lora_embedding_A[name], self.lora_embedding_B[name], init)
        self.active_adapter = name

    def _drop_adapter_params(self, name: str) -> None:
        _discard(self.lora_embedding_A, name)
        _discard(self.lora_embedding_B, name)

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self.lora_embedding_A[name].float()  # (r, vocab)
        b = self.lora_embedding_B[name].float()  # (dim, r)
        return (b @ a).T * self.scaling[name]  # (vocab, dim)

    def _embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(ids, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """y = E[x] + scaling * (A^T[x]) B^T for the active adapter (per-row adapters: mixed)."""
        result = self.base_layer(x, *args, **kwargs)
        routing = mixed.current_routing()
        if routing is not None:
            delta = mixed.embedding_delta(self, routing, x)
            return result if delta is None else result + delta.to(result.dtype)
        if not self.runs_adapter():
            return result
        name = self.active_adapter
        after_a = self._embed(x, self.lora_embedding_A[name].T)  # (B, T, r)
        lora_out = after_a @ self.lora_embedding_B[name].T  # (B, T, dim)
        return result + (lora_out * self.scaling[name]).to(result.dtype)


class ModulesToSave(nn.Module):
    """A module trained in full: the original stays frozen, each adapter owns a trainable copy."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone
        self.active_adapter = name

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def delete_adapter(self, name: str) -> None:
        _discard(self.modules_to_save, name)
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.modules_to_save), None)

    def current(self) -> nn.Module:
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        routing = mixed.current_routing()
        if routing is not None:
            return mixed.modules_to_save_forward(self, routing, x, *args, **kwargs)
        return self.current()(x, *args, **kwargs)
