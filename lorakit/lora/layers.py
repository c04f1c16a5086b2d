"""LoRA layers: a wrapped base module plus one or more low-rank adapters.

    y = W0 x + scaling * B A dropout(x),   scaling = lora_alpha / r   (rsLoRA: lora_alpha / sqrt(r))

`lora_A` (r, in) and `lora_B` (out, r) are bias-free nn.Linears kept in ModuleDicts keyed by adapter name, so
the in-memory key `...q_proj.lora_A.default.weight` is the PEFT file key once the adapter name is dropped.
One adapter is active at a time; a mixed batch (one adapter per row) goes through `mixed.py`.

DoRA (Liu et al. 2024) rescales each output row: W' = m * (W0 + s B A) / ||W0 + s B A||, the norm detached
from the graph as the paper (section 4.3) and PEFT do, so it costs no extra backward memory.
"""

from __future__ import annotations

import copy
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import mixed
from .init import init_embedding, init_plain, init_principal


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
        self.disabled = False
        self.merged_adapters: list[str] = []
        self.routing: mixed.Routing | None = None  # set only for the duration of a mixed-batch call
        self._dora_factors: dict[str, torch.Tensor] = {}
        self._plain: tuple | None = None  # LoraLinear's inference fast path: parameters of the active adapter

    def __setattr__(self, name: str, value) -> None:
        if name == "base_layer":  # e.g. quantizing or dequantizing the base in place: re-read its parameters
            self.__dict__["_plain"] = None
        super().__setattr__(name, value)

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
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _set_scalars(self, name: str, r: int, lora_alpha: float, use_rslora: bool, dropout: float) -> None:
        self._plain = None
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_alpha / (r**0.5) if use_rslora else lora_alpha / r
        # nn.Identity when p = 0: no copy of x and no random mask on the hot path
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _runs_adapter(self) -> bool:
        return not self.disabled and self.active_adapter is not None and not self.merged

    def merge(self, names: list[str] | None = None, safe_merge: bool = True) -> None:
        """Add the adapters' deltas to the base weight (fp32 arithmetic). Idempotent; refuses NaN/Inf."""
        weight = self.base_layer.weight
        for name in names if names is not None else [self.active_adapter]:
            if name is None or name in self.merged_adapters:
                continue
            merged = self._merged_weight(name, weight.detach().float())
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter '{name}' would put NaN/Inf into the weights; nothing was merged")
            weight.data.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged delta again, newest first."""
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            w = weight.detach().float()
            if name in self._dora_factors:
                w = w / self._dora_factors.pop(name).view(self._row_view())
            weight.data.copy_((w - self.delta_weight(name)).to(weight.dtype))

    def _merged_weight(self, name: str, w: torch.Tensor) -> torch.Tensor:
        if is_quantized(self.base_layer):  # both merge paths come through here before changing anything
            raise ValueError(QUANTIZED_MERGE.format(kind=type(self.base_layer).__name__))
        merged = w + self.delta_weight(name)
        if name in self.lora_magnitude_vector:
            factor = self._dora_scale(name, merged)
            self._dora_factors[name] = factor
            merged = merged * factor.view(self._row_view())
        return merged

    def _row_view(self) -> tuple[int, int]:
        return (-1, 1)

    def _dora_scale(self, name: str, combined: torch.Tensor) -> torch.Tensor:
        """m / ||W0 + s B A|| per output row (out,), norm detached (DoRA section 4.3)."""
        norm = combined.norm(p=2, dim=self._norm_dim()).detach()
        return self.lora_magnitude_vector[name].weight.float() / norm

    def _norm_dim(self) -> int:
        return 1

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter '{name}' is merged; unmerge it before deleting it")
        self._plain = None
        self._drop_adapter_params(name)
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(name, None)
        _discard(self.lora_dropout, name)
        _discard(self.lora_magnitude_vector, name)
        if self.active_adapter == name:
            remaining = self.adapter_names()
            self.active_adapter = remaining[0] if remaining else None


class LoraLinear(LoraLayer):
    """LoRA around nn.Linear, or around transformers' Conv1D (weight (in, out), fan_in_fan_out)."""

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

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0, init: bool | str = True,
                    use_rslora: bool = False, use_dora: bool = False) -> None:
        """Create adapter `name` and make it active."""
        self._set_scalars(name, r, lora_alpha, use_rslora, lora_dropout)
        w = self.base_layer.weight
        dtype = adapter_dtype(w)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=dtype)
        if w.device.type != "meta":
            self._initialise(name, init)
        if use_dora:
            magnitude = nn.Module()
            magnitude.weight = nn.Parameter(torch.empty(self.out_features, device=w.device, dtype=dtype))
            self.lora_magnitude_vector[name] = magnitude
            if w.device.type != "meta":
                self.reset_dora_magnitude(name)
        self.active_adapter = name

    def _initialise(self, name: str, init: bool | str) -> None:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if isinstance(init, str) and (init.startswith("pissa") or init == "olora"):
            if is_quantized(self.base_layer):
                raise ValueError("PiSSA/OLoRA init rewrites the base weights, which a quantized base cannot hold; "
                                 "use the default init on a quantized base")
            if self.merged:
                raise ValueError("cannot add a PiSSA/OLoRA adapter while another adapter is merged")
            lora_A, lora_B, residual = init_principal(self._oriented_weight(), init, self.r[name], self.scaling[name])
            with torch.no_grad():
                a.copy_(lora_A)
                b.copy_(lora_B)
                weight = self.base_layer.weight
                weight.copy_((residual.T if self.fan_in_fan_out else residual).to(weight.dtype))
            return
        with torch.no_grad():
            init_plain(a, b, init, self.r[name])

    def reset_dora_magnitude(self, name: str) -> None:
        """m = ||W0 + s B A|| per output row, so DoRA starts exactly at the LoRA model."""
        with torch.no_grad():
            combined = self._oriented_weight() + self._oriented_delta(name)
            self.lora_magnitude_vector[name].weight.copy_(combined.norm(p=2, dim=1))

    def _drop_adapter_params(self, name: str) -> None:
        _discard(self.lora_A, name)
        _discard(self.lora_B, name)

    def _oriented_weight(self) -> torch.Tensor:
        """The base weight as (out, in), fp32 (dequantized for a quantized base)."""
        if is_quantized(self.base_layer):
            return dense_weight(self.base_layer).float()
        w = self.base_layer.weight.detach().float()
        return w.T if self.fan_in_fan_out else w

    def _oriented_delta(self, name: str) -> torch.Tensor:
        a = self.lora_A[name].weight.float()  # (r, in)
        b = self.lora_B[name].weight.float()  # (out, r)
        return (b @ a) * self.scaling[name]  # (out, in)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self._oriented_delta(name)
        return delta.T if self.fan_in_fan_out else delta

    def _row_view(self) -> tuple[int, int]:
        return (1, -1) if self.fan_in_fan_out else (-1, 1)

    def _norm_dim(self) -> int:
        return 0 if self.fan_in_fan_out else 1

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.routing is None and self._runs_adapter():
            if not torch.is_grad_enabled() and not args and not kwargs:
                result = self._inference_forward(x)
                if result is not None:
                    return result
            return self._adapter_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.routing is not None:
            return mixed.add_linear_delta(self, x, result)
        return result

    def _inference_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """No-grad plain LoRA over an nn.Linear at one dtype (each decoding step): W0 x + b, then the rank-r
        product added into that output in place by one fused multiply-add. None when the case is not that one.
        The parameters it reads are looked up once per active adapter (`_plain`), not on every token."""
        plain = self._plain
        if plain is None or plain[0] != self.active_adapter:
            plain = self._plain = self._plain_parts()
        _, weight, bias, a, b, scaling, dropout = plain
        if weight is None or x.dtype != weight.dtype or a.dtype != weight.dtype:
            return None
        if (dropout and self.training) or torch.is_autocast_enabled(x.device.type):
            return None
        result = F.linear(x, weight, bias)  # (..., out), a new contiguous tensor
        h = F.linear(x, a)  # (..., r)
        result.view(-1, weight.shape[0]).addmm_(h.view(-1, h.shape[-1]), b.t(), alpha=scaling)
        return result

    def _plain_parts(self) -> tuple:
        """(adapter, W0, bias, A, B, scaling, has dropout); W0 None where the fast path does not apply."""
        base, name = self.base_layer, self.active_adapter
        if type(base) is not nn.Linear or name in self.lora_magnitude_vector:
            return (name, None, None, None, None, None, None)
        dropout = not isinstance(self.lora_dropout[name], nn.Identity)
        return (name, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                self.scaling[name], dropout)

    def _adapter_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """W0 x + B (scaling * A dropout(x)), the scaling applied on the rank-r side (r columns, not out)."""
        name = self.active_adapter
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        device = x.device.type
        if torch.is_autocast_enabled(device) and type(self.base_layer) is nn.Linear:
            # cast x once for both matmuls (autocast alone would cast it for each); same numbers as autocast
            x = autocast_input(x, torch.get_autocast_dtype(device))
            x_lora = dropout(x)
        else:
            x_lora = dropout(x.to(lora_A.weight.dtype))
        result = self.base_layer(x, *args, **kwargs)
        if name in self.lora_magnitude_vector:
            lora_out = lora_B(lora_A(x_lora))  # (..., out)
            return self._dora_forward(name, x_lora, result, lora_out, reuse_base=isinstance(dropout, nn.Identity))
        if not torch.is_grad_enabled() and result.dtype == lora_B.weight.dtype:
            # inference (e.g. each decoding step): fewer ops and no new output tensor; same numbers
            h = F.linear(x_lora, lora_A.weight)  # (..., r)
            return result.add_(F.linear(h, lora_B.weight), alpha=self.scaling[name])  # (..., out)
        lora_out = lora_B(lora_A(x_lora) * self.scaling[name])  # (..., r) -> (..., out)
        return result + lora_out.to(result.dtype)

    def _dora_forward(self, name: str, x: torch.Tensor, result: torch.Tensor, lora_out: torch.Tensor,
                      reuse_base: bool) -> torch.Tensor:
        """result + (m/||W'|| - 1) * W0 x + (m/||W'||) * s B A x   (PEFT's formulation)."""
        weight = dense_weight(self.base_layer) if is_quantized(self.base_layer) else self.base_layer.weight
        lora_weight = self.lora_B[name].weight @ self.lora_A[name].weight  # (out, in)
        w = weight.T if self.fan_in_fan_out else weight
        norm = (w.to(lora_weight.dtype) + self.scaling[name] * lora_weight).norm(p=2, dim=1).detach()  # (out,)
        scale = self.lora_magnitude_vector[name].weight / norm  # (out,)
        bias = getattr(self.base_layer, "bias", None)
        if reuse_base:
            base_out = result if bias is None else result - bias
        else:
            base_out = F.linear(x.to(w.dtype), w)
        dora = (scale - 1) * base_out.to(scale.dtype) + scale * lora_out * self.scaling[name]
        return result + dora.to(result.dtype)


_last_cast = threading.local()  # .entry = (weakrefs to the input and its cast, the input's version, dtype)


def autocast_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, cast once for all the adapted projections that read the same x (q, k and v read one normed
    hidden state; gate and up another). Autocast casts it anew for each, and each LoRA A keeps its own copy for
    the backward: three (or two) copies where one does. The gradient reaches x through the one cast."""
    if x.dtype == dtype:
        return x
    if x.is_inference():  # no version counter to tell an in-place change; nothing kept for a backward anyway
        return x.to(dtype)
    entry = getattr(_last_cast, "entry", None)
    if entry is not None and entry[0]() is x and entry[2] == x._version and entry[3] == dtype:
        cast = entry[1]()  # alive while a graph holds it (LoRA A saves it for the backward); else cast anew
        if cast is not None:
            return cast
    cast = x.to(dtype)
    # weak references only: the cache keeps neither tensor (nor, through the cast, a graph) alive
    _last_cast.entry = (weakref.ref(x), weakref.ref(cast), x._version, dtype)
    return cast


class LoraEmbedding(LoraLayer):
    """LoRA around nn.Embedding: y = E[x] + scaling * (A^T[x]) B^T, with A (r, vocab) and B (dim, r)."""

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def adapter_names(self) -> list[str]:
        return list(self.lora_embedding_A.keys())

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0, init: bool | str = True,
                    use_rslora: bool = False, use_dora: bool = False) -> None:
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
        result = self.base_layer(x, *args, **kwargs)
        if self.routing is not None:
            delta = mixed.embedding_delta(self, x)
            return result if delta is None else result + delta.to(result.dtype)
        if not self._runs_adapter():
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
        self.routing: mixed.Routing | None = None

    def add_adapter(self, name: str) -> None:
        import copy

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
        if self.routing is not None:
            return mixed.modules_to_save_forward(self, x, *args, **kwargs)
        return self.current()(x, *args, **kwargs)
