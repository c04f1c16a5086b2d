"""LoRA on parameters that are not nn.Linear weights (PEFT's `target_parameters`): the fused 3-D expert tensors of
mixture-of-experts models (transformers 5: `experts.gate_up_proj` (E, 2I, H), `experts.down_proj` (E, H, I)).

For each targeted parameter W (E, out, in) of a module, every expert e gets its own rank-r update:

    W_e' = W_e + scaling * B_e A_e,     A (E*r, in) = [A_0; A_1; ...],  B (out, r*E) with B_e = B[:, e::E]

(PEFT's layout: A's rows are grouped by expert, B's columns interleave the experts.) A 2-D parameter (out, in) is
the case E = 1. The module's own forward runs unchanged on W' (torch.func.functional_call), so whatever routing of
tokens to experts the model does, each expert sees its adapted weight. W' is materialised for the call (one copy of
the targeted expert weights), as PEFT does. Limits, as PEFT's: no dropout, no DoRA; per-row adapters refuse these
adapters (LoraModel says so before the call).

File keys follow PEFT's nesting of one wrapper per parameter: with targeted parameters p_0, ..., p_{n-1} of one
module, in the module's own parameter order, p_i's factors are saved under `<module>` + ".base_layer" * (n - 1 - i)
+ ".lora_A.weight" (the first is the innermost wrapper, whatever the order of target_parameters).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from . import mixed
from .layers import SIXTEEN_BIT, LoraLayer, MergeRecord, adapter_dtype


def expert_shape(param: torch.Tensor) -> tuple[int, int, int]:
    """(experts, out, in) of a 3-D (E, out, in) or 2-D (out, in) parameter used as F.linear(x, W[e])."""
    if param.dim() == 3:
        return param.shape[0], param.shape[1], param.shape[2]
    if param.dim() == 2:
        return 1, param.shape[0], param.shape[1]
    raise ValueError(f"target_parameters: a {param.dim()}-D parameter cannot take LoRA (2-D or 3-D only)")


class LoraParameters(LoraLayer):
    """LoRA on some parameters of `base_layer` (see the module docstring); `lora_A[adapter][param]` is (E*r, in),
    `lora_B[adapter][param]` (out, r*E)."""

    def __init__(self, base_layer: nn.Module, param_names: list[str]) -> None:
        super().__init__(base_layer)
        self.param_names = list(param_names)  # in the module's parameter order: the file keys depend on it
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.originals: dict[str, torch.Tensor] = {}  # parameter -> the weight a merge replaced (16-bit bases)

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0, init: bool | str = True,
                    use_rslora: bool = False, use_dora: bool = False, **_) -> None:
        if lora_dropout or use_dora or init not in (True, False):
            raise ValueError("target_parameters takes plain LoRA only: no lora_dropout, no DoRA, no PiSSA/OLoRA/"
                             "LoRA-GA init (as in PEFT)")
        self._set_scalars(name, r, lora_alpha, use_rslora, 0.0)
        a_table, b_table = nn.ModuleDict(), nn.ModuleDict()
        for pname in self.param_names:
            w = getattr(self.base_layer, pname)
            experts, out_features, in_features = expert_shape(w)
            a_table[pname] = nn.Linear(in_features, r * experts, bias=False, device=w.device, dtype=adapter_dtype(w))
            b_table[pname] = nn.Linear(r * experts, out_features, bias=False, device=w.device, dtype=adapter_dtype(w))
            if init is not False and w.device.type != "meta":
                with torch.no_grad():
                    nn.init.kaiming_uniform_(a_table[pname].weight, a=math.sqrt(5))
                    nn.init.zeros_(b_table[pname].weight)
        self.lora_A[name], self.lora_B[name] = a_table, b_table
        self.active_adapter = name

    def _drop_adapter_params(self, name: str) -> None:
        for table in (self.lora_A, self.lora_B):
            if name in table:
                del table[name]

    def param_delta(self, name: str, pname: str) -> torch.Tensor:
        """scaling * B_e A_e for every expert, (E, out, in) (or (out, in) for a 2-D parameter), in fp32."""
        w = getattr(self.base_layer, pname)
        experts, _, _ = expert_shape(w)
        a = self.lora_A[name][pname].weight.float()  # (E*r, in)
        b = self.lora_B[name][pname].weight.float()  # (out, r*E)
        a3 = a.reshape(experts, -1, a.shape[-1])  # (E, r, in)
        b3 = b.reshape(b.shape[0], -1, experts)  # (out, r, E)
        delta = torch.einsum("ore,eri->eoi", b3, a3) * self.scaling[name]  # (E, out, in)
        return delta if w.dim() == 3 else delta[0]

    def forward(self, *args, **kwargs):
        """The module's forward with each targeted parameter replaced by W + scaling * B A for this call."""
        routing = mixed.current_routing()
        name = self.active_adapter
        if (routing is not None and name in routing.names) or not self.runs_adapter():
            return self.base_layer(*args, **kwargs)
        adapted = {}
        for pname in self.param_names:
            w = getattr(self.base_layer, pname)
            adapted[pname] = w + self.param_delta(name, pname).to(w.dtype)
        return functional_call(self.base_layer, adapted, args, kwargs, strict=False)

    def merge_is_finite(self, name: str) -> bool:
        return all(torch.isfinite(getattr(self.base_layer, p).detach().float() + self.param_delta(name, p)).all()
                   for p in self.param_names)

    def merge(self, names: list[str] | None = None, safe_merge: bool = True, keep_original: bool | None = None) -> None:
        """W += scaling * B A for each targeted parameter (fp32 arithmetic); 16-bit weights kept for unmerge."""
        for name in names if names is not None else [self.active_adapter]:
            if name is None or name in self.merged_adapters:
                continue
            if safe_merge and not self.merge_is_finite(name):
                raise ValueError(f"merging adapter '{name}' would put NaN/Inf into the weights; nothing was merged")
            originals = {}
            for pname in self.param_names:
                w = getattr(self.base_layer, pname)
                keep = keep_original if keep_original is not None else w.dtype in SIXTEEN_BIT
                if keep:
                    originals[pname] = w.detach().clone()
                w.data.copy_((w.detach().float() + self.param_delta(name, pname)).to(w.dtype))
            self.merge_records.append(MergeRecord(name, None, None))
            for pname, w in originals.items():  # the weight before the first merge is what unmerge restores
                self.originals.setdefault(pname, w)

    def unmerge(self) -> None:
        while self.merge_records:
            record = self.merge_records.pop()
            for pname in self.param_names:
                w = getattr(self.base_layer, pname)
                if pname in self.originals and not self.merge_records:
                    w.data.copy_(self.originals.pop(pname))
                else:
                    w.data.copy_((w.detach().float() - self.param_delta(record.name, pname)).to(w.dtype))
