"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"): LoRA in SVD form
whose rank per layer is chosen during training.

    y = W0 x + scaling * B (E * (A x)),   A (r, in), E (r, 1), B (out, r),   scaling = lora_alpha / (init_r + 1e-5)

Every step the importance of each entry of A, B and E is |p * grad| smoothed by two moving averages (sensitivity,
beta1; uncertainty, beta2); a triplet (row i of A, E_i, column i of B) scores E's entry plus the means of its A row
and B column. The budget (triplets kept over all layers) falls from init_r per layer to target_r per layer on a cubic
schedule between step tinit and total_step - tfinal, every deltaT steps; the triplets under the budget's threshold get
E_i = 0, and from total_step - tfinal on the final pattern stays fixed. An orthogonality penalty keeps A's rows and B's
columns orthonormal: orth_reg_weight * mean over layers of ||A A^T - I||_F and ||B^T B - I||_F.

PEFT's semantics and file format: `rank_pattern` maps "<module>.lora_E" to one bool per triplet; the file holds
only the kept triplets, as `...lora_A` (k, in), `...lora_B` (out, k), `...lora_E` (k, 1); `scaling` keeps init_r.
Unlike PEFT, lorakit's trainer calls `RankAllocator.step` itself every optimizer step and adds the penalty to the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import LoraConfig

EPS = 1e-5  # PEFT's: scaling = lora_alpha / (ranknum + 1e-5)


@dataclass
class AdaLoraConfig(LoraConfig):
    """An AdaLoRA adapter: LoraConfig's fields (r is unused: init_r is the starting rank) and the budget schedule."""

    target_r: int = 8
    """Average rank per layer at the end of the budget schedule."""
    init_r: int = 12
    """Rank every layer starts with."""
    tinit: int = 0
    """Steps of warm-up before the budget starts to fall."""
    tfinal: int = 0
    """Final steps that train the final ranks without changing them."""
    deltaT: int = 1
    """Steps between two budget allocations."""
    beta1: float = 0.85
    """Moving average of the sensitivity |p * grad|."""
    beta2: float = 0.85
    """Moving average of its uncertainty."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality penalty on A and B."""
    total_step: int | None = None
    """Optimizer steps of the run (lorakit's trainer sets it)."""
    rank_pattern: dict = field(default_factory=dict)
    """The allocation: "<module>.lora_E" -> one bool per triplet (kept or not)."""
    peft_type: str = "ADALORA"
    """Always "ADALORA"."""

    PEFT_TYPE = "ADALORA"

    def _rank_pattern_problems(self) -> list[str]:
        problems = []
        for name, value in (("init_r", self.init_r), ("target_r", self.target_r), ("deltaT", self.deltaT)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not isinstance(value, (int, float)) or not 0 < value < 1:
                problems.append(f"{name} must be in (0, 1), got {value!r}")
        if not isinstance(self.orth_reg_weight, (int, float)) or self.orth_reg_weight < 0:
            problems.append(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.total_step is None or isinstance(self.total_step, bool) or not isinstance(self.total_step, int) \
                or self.total_step <= 0:
            problems.append(f"total_step must be a positive integer (the run's optimizer steps), got "
                            f"{self.total_step!r}")
        elif self.tinit >= self.total_step - self.tfinal:
            problems.append(f"tinit ({self.tinit}) must be below total_step - tfinal "
                            f"({self.total_step} - {self.tfinal}): no step would allocate the budget")
        if self.use_dora:
            problems.append("AdaLoRA does not support DoRA")
        if self.init_lora_weights not in (True, False):
            problems.append(f"AdaLoRA starts with E = 0 and random A, B; init_lora_weights="
                            f"{self.init_lora_weights!r} is not supported")
        problems += [f"rank_pattern[{k!r}] must be a list of booleans, got {v!r}"
                     for k, v in (self.rank_pattern or {}).items()
                     if not isinstance(v, list) or not all(isinstance(b, bool) for b in v)]
        return problems

    def rank_for(self, module_name: str) -> int:
        """The kept triplets of the module once a rank pattern exists (a loaded adapter), else init_r."""
        kept = (self.rank_pattern or {}).get(f"{module_name}.lora_E")
        return sum(kept) if kept is not None else self.init_r

    def alpha_for(self, module_name: str) -> float:
        return self.lora_alpha

    def scaling_for(self, module_name: str) -> float:
        """lora_alpha / init_r (PEFT: lora_alpha / (ranknum + 1e-5), ranknum = init_r even after masking)."""
        alpha = self.lora_alpha if self.lora_alpha > 0 else float(self.init_r)
        return alpha / (self.init_r + EPS)


def svd_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """(module name, layer) of every layer holding AdaLoRA adapter `adapter_name`, in module order."""
    return [(key, m) for key, m in model.named_modules() if adapter_name in getattr(m, "lora_E", {})]


def orthogonal_penalty(model: nn.Module, adapter_name: str) -> torch.Tensor:
    """mean over A's and B's of ||A A^T - I||_F, ||B^T B - I||_F (a scalar with gradients to A and B)."""
    terms = []
    for _, layer in svd_layers(model, adapter_name):
        a = layer.lora_A[adapter_name].weight  # (r, in)
        b = layer.lora_B[adapter_name].weight  # (out, r)
        eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
        terms += [torch.linalg.matrix_norm(a @ a.T - eye), torch.linalg.matrix_norm(b.T @ b - eye)]
    return torch.stack(terms).mean()


class RankAllocator:
    """The budget schedule and importance scores of one AdaLoRA adapter (the state a resume needs: `state_dict`)."""

    def __init__(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> None:
        self.config = config
        self.adapter_name = adapter_name
        self.layers = svd_layers(model, adapter_name)
        self.init_budget = sum(layer.r[adapter_name] for _, layer in self.layers)
        self.target_budget = config.target_r * len(self.layers)
        self.sensitivity: dict[str, torch.Tensor] = {}  # "<module>.lora_A" etc. -> EMA of |p * grad|
        self.uncertainty: dict[str, torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        """(triplets allowed at `step`, whether to allocate now): the cubic schedule of the paper."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        fall = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_budget - self.target_budget) * fall**3 + self.target_budget), step % c.deltaT == 0

    def _parameters(self):
        name = self.adapter_name
        for key, layer in self.layers:
            yield f"{key}.lora_A", layer.lora_A[name].weight
            yield f"{key}.lora_B", layer.lora_B[name].weight
            yield f"{key}.lora_E", layer.lora_E[name]

    @torch.no_grad()
    def update_scores(self) -> None:
        """Fold this step's |p * grad| into the two moving averages (call after backward, before zero_grad)."""
        b1, b2 = self.config.beta1, self.config.beta2
        for key, p in self._parameters():
            if p.grad is None:
                continue
            importance = (p * p.grad).abs()
            mean = self.sensitivity.get(key, torch.zeros_like(p))
            spread = self.uncertainty.get(key, torch.zeros_like(p))
            mean = b1 * mean + (1 - b1) * importance
            self.sensitivity[key], self.uncertainty[key] = mean, b2 * spread + (1 - b2) * (importance - mean).abs()

    def _triplet_scores(self) -> dict[str, torch.Tensor]:
        """"<module>.lora_E" -> (r,): E's score + the mean score of its A row + that of its B column."""
        out = {}
        for key, _ in self.layers:
            score = {part: self.sensitivity[f"{key}.{part}"] * self.uncertainty[f"{key}.{part}"]
                     for part in ("lora_A", "lora_B", "lora_E")}
            out[f"{key}.lora_E"] = score["lora_E"].view(-1) + score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0)
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the E entries of the lowest-scoring triplets so that `budget` remain (ties go together, as PEFT);
        returns the rank pattern."""
        scores = self._triplet_scores()
        cut = self.init_budget - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=cut).values.item() if cut > 0 else -math.inf
        pattern = {}
        for key, layer in self.layers:
            keep = scores[f"{key}.lora_E"] > threshold  # (r,)
            layer.lora_E[self.adapter_name].masked_fill_(~keep[:, None], 0.0)
            pattern[f"{key}.lora_E"] = keep.tolist()
        return pattern

    @torch.no_grad()
    def apply_pattern(self, pattern: dict[str, list[bool]]) -> None:
        for key, layer in self.layers:
            keep = torch.tensor(pattern[f"{key}.lora_E"], device=layer.lora_E[self.adapter_name].device)
            layer.lora_E[self.adapter_name].masked_fill_(~keep[:, None], 0.0)

    def step(self, step: int) -> dict[str, list[bool]] | None:
        """PEFT's update_and_allocate at optimizer step `step` (0-based, after the optimizer step, gradients still
        there): scores, budget, masks; the new rank pattern goes into the adapter's config and is returned."""
        c = self.config
        final = c.total_step - c.tfinal
        if step < final:
            self.update_scores()
            budget, now = self.budget(step)
            pattern = self.mask_to_budget(budget) if now else None
        elif step == final:
            budget, _ = self.budget(step)
            pattern = self.mask_to_budget(budget)
            self.sensitivity, self.uncertainty = {}, {}
        else:
            self.apply_pattern(c.rank_pattern)
            pattern = None
        if pattern is not None:
            c.rank_pattern = pattern  # the adapter's config: what save_pretrained writes
        return pattern

    def state_dict(self) -> dict:
        return {"sensitivity": self.sensitivity, "uncertainty": self.uncertainty}

    def load_state_dict(self, state: dict) -> None:
        self.sensitivity, self.uncertainty = dict(state["sensitivity"]), dict(state["uncertainty"])


def final_ranks(config: AdaLoraConfig, model: nn.Module, adapter_name: str) -> dict[str, int]:
    """Module name -> triplets kept (init_r where no allocation ran yet)."""
    return {key: sum(config.rank_pattern.get(f"{key}.lora_E", [True] * layer.r[adapter_name]))
            for key, layer in svd_layers(model, adapter_name)}


def kept_triplets(state: dict[str, torch.Tensor], rank_pattern: dict[str, list[bool]]) -> dict[str, torch.Tensor]:
    """The file's tensors with only the triplets `rank_pattern` keeps (A rows, B columns, E rows), as PEFT saves."""
    prefix = "base_model.model."
    out = dict(state)
    for pattern_key, kept in rank_pattern.items():
        module = pattern_key.removesuffix(".lora_E")
        e_key = f"{prefix}{module}.lora_E"
        if e_key not in out or out[e_key].shape[0] != len(kept):
            continue  # not this adapter's layer, or already the kept size
        keep = torch.tensor(kept, dtype=torch.bool)
        out[e_key] = out[e_key][keep]
        out[f"{prefix}{module}.lora_A"] = out[f"{prefix}{module}.lora_A"][keep]
        out[f"{prefix}{module}.lora_B"] = out[f"{prefix}{module}.lora_B"][:, keep]
    return out
