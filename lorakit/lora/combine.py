"""Combining adapters into a new one, with PEFT's `add_weighted_adapter` semantics.

- "cat":  exact. A' = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B' = [B_1, B_2, ...], rank = sum of ranks, scaling 1.
- "svd" (and "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"): combine the full deltas
  dW_i = s_i B_i A_i, then keep the top `svd_rank` singular directions: B' = U_k S_k, A' = V_k^T.
- "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune": combine the A's and the B's separately with
  weights sqrt(|w_i s_i|) (the sign goes on A). Fast, but B'A' != sum w_i dW_i: an approximation, as in PEFT.
TIES (Yadav et al. 2023): keep the top-`density` magnitudes of each task tensor, elect a sign per entry, average
the entries that agree. DARE (Yu et al. 2024): drop entries at random with probability 1 - density, rescale by
1 / density.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from .config import LoraConfig
from .inject import wrappers
from .layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave

FACTORED = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = FACTORED + SVD + ("cat",)


def prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density * numel) entries of largest magnitude."""
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[t.abs().flatten().topk(k).indices] = 1
    return t * mask.view_as(t)


def prune_random(t: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescaled to keep the expectation."""
    return t * torch.bernoulli(torch.full_like(t, density)) / density


def merge_task_tensors(tensors: list[torch.Tensor], weights: torch.Tensor, method: str, density: float | None,
                       majority_sign_method: str = "total") -> torch.Tensor:
    """Weighted combination of same-shaped task tensors by `method` (the part of the name before "_svd")."""
    if method in ("ties", "magnitude_prune", "dare_linear", "dare_ties") and density < 1:
        prune = prune_random if method.startswith("dare") else prune_magnitude
        tensors = [prune(t, density) for t in tensors]
    stacked = torch.stack(tensors)  # (N, ...)
    weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1)).to(stacked.dtype)
    if method not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    votes = stacked.sum(dim=0) if majority_sign_method == "total" else stacked.sign().sum(dim=0)
    agree = stacked.sign() == torch.where(votes >= 0, 1.0, -1.0)  # (N, ...)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    if isinstance(layer, LoraLinear) and name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    if isinstance(layer, LoraEmbedding) and name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return None


def _combined_factors(layer: LoraLayer, adapters: list[str], weights: list[float], kind: str, rank: int,
                      density: float | None, sign_method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' (rank, in), B' (out, rank)) for one layer; only adapters present in the layer take part."""
    present = [(a, w) for a, w in zip(adapters, weights) if _factors(layer, a) is not None]
    if kind == "cat":
        a = torch.cat([_factors(layer, n)[0].float() * w * layer.scaling[n] for n, w in present], dim=0)
        b = torch.cat([_factors(layer, n)[1].float() for n, _ in present], dim=1)
        return a, b
    if kind in SVD:
        deltas = [layer.delta_weight(n) for n, _ in present]
        delta = merge_task_tensors(deltas, torch.tensor([w for _, w in present]), kind.removesuffix("_svd"),
                                   density, sign_method)
        if getattr(layer, "fan_in_fan_out", False) or isinstance(layer, LoraEmbedding):
            delta = delta.T  # to (out, in): for an embedding, (dim, vocab)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (out, k), (k,), (k, in)
        return vh[:rank].contiguous(), (u[:, :rank] * s[:rank]).contiguous()
    signed = [w * layer.scaling[n] for n, w in present]
    w_a = torch.tensor([math.copysign(math.sqrt(abs(v)), v) for v in signed])
    w_b = torch.tensor([math.sqrt(abs(v)) for v in signed])
    a = merge_task_tensors([_factors(layer, n)[0].float() for n, _ in present], w_a, kind, density, sign_method)
    b = merge_task_tensors([_factors(layer, n)[1].float() for n, _ in present], w_b, kind, density, sign_method)
    return a, b


def _check(lm, adapters: list[str], weights: list[float], kind: str, density: float | None) -> None:
    problems = []
    if kind not in COMBINATIONS:
        problems.append(f"unknown combination_type {kind!r}; choose from {', '.join(COMBINATIONS)}")
    unknown = [a for a in adapters if a not in lm.peft_config]
    if unknown:
        problems.append(f"unknown adapter(s) {', '.join(unknown)}; loaded: {', '.join(lm.peft_config)}")
    if not adapters or len(weights) != len(adapters):
        problems.append(f"{len(adapters)} adapters but {len(weights)} weights")
    elif not all(math.isfinite(w) for w in weights) or all(w == 0 for w in weights):
        problems.append(f"weights {weights} must be finite and not all zero")
    if kind.split("_")[0] in ("ties", "dare", "magnitude") and (density is None or not 0 < density <= 1):
        problems.append(f"combination_type {kind!r} needs density in (0, 1], got {density!r}")
    if not unknown and any(lm.peft_config[a].use_dora for a in adapters):
        problems.append("DoRA adapters cannot be combined (their magnitude vectors do not add)")
    if problems:
        raise ValueError("add_weighted_adapter: " + "; ".join(problems))


def _union_targets(configs: list[LoraConfig]) -> list[str] | str:
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if any(isinstance(t, str) or t is None for t in targets):
        raise ValueError("add_weighted_adapter: cannot combine a regex target_modules with a list of names")
    return sorted(set().union(*targets))


def add_weighted_adapter(lm, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, density: float | None = None,
                         majority_sign_method: str = "total") -> None:
    """Create adapter `adapter_name` from a weighted combination of `adapters` (see the module docstring)."""
    kind = "linear" if len(adapters) == 1 and combination_type in FACTORED + ("cat",) else combination_type
    _check(lm, adapters, weights, kind, density)
    configs = [lm.peft_config[a] for a in adapters]
    ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]
    if kind in FACTORED and len(set(ranks)) != 1:
        raise ValueError(f"add_weighted_adapter: combination_type {kind!r} needs equal ranks, got {ranks}; "
                         f"use 'cat' or 'svd'")
    rank = sum(ranks) if kind == "cat" else (svd_rank or max(ranks)) if kind in SVD else ranks[0]
    config = dataclasses.replace(configs[0], r=rank, lora_alpha=rank, use_rslora=False, use_dora=False,
                                 init_lora_weights=False, rank_pattern={}, alpha_pattern={}, layers_to_transform=None,
                                 target_modules=_union_targets(configs), modules_to_save=None)
    active = lm.active_adapter
    lm.add_adapter(adapter_name, config)
    try:
        for _, module in wrappers(lm.model):
            if isinstance(module, ModulesToSave):
                _copy_saved_module(module, adapters, adapter_name)
            elif adapter_name in module.adapter_names():
                _fill(module, adapters, weights, adapter_name, kind, rank, density, majority_sign_method)
    except Exception:
        lm.delete_adapter(adapter_name)
        lm.set_adapter(active)
        raise
    lm.peft_config[adapter_name] = dataclasses.replace(config, init_lora_weights=True)
    lm.set_adapter(active)


def _fill(layer: LoraLayer, adapters: list[str], weights: list[float], new_name: str, kind: str, rank: int,
          density: float | None, sign_method: str) -> None:
    """Write the combined factors into the new adapter's (zeroed) A and B of one layer."""
    new_a, new_b = _factors(layer, new_name)
    with torch.no_grad():
        new_a.zero_()
        new_b.zero_()
        if any(_factors(layer, a) is not None for a in adapters):
            a, b = _combined_factors(layer, adapters, weights, kind, rank, density, sign_method)
            new_a[: a.shape[0]].copy_(a)
            new_b[:, : b.shape[1]].copy_(b)


def _copy_saved_module(wrapper: ModulesToSave, adapters: list[str], new_name: str) -> None:
    owners = [a for a in adapters if a in wrapper.modules_to_save]
    if len(owners) > 1:
        raise ValueError(f"add_weighted_adapter: adapters {', '.join(owners)} each train their own copy of a module "
                         f"(modules_to_save); such copies cannot be combined")
    if owners:
        wrapper.modules_to_save[new_name] = copy.deepcopy(wrapper.modules_to_save[owners[0]])
