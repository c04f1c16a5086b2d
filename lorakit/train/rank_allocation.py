"""AdaLoRA in `lorakit train` (use_adalora: true): the trainer's side of lorakit.lora.adalora.

Each optimizer step: the orthogonality penalty orth_reg_weight * mean ||A A^T - I||, ||B^T B - I|| joins the loss
(once per step, at the scale of the step's mean token loss), and after the optimizer step the RankAllocator updates
the importance scores and masks E to the step's budget, with the gradients still there. PEFT leaves both to the
user (update_and_allocate); forgetting it trains plain LoRA in SVD form. At the end: every layer's final rank,
printed and plotted (adalora_ranks.png).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..lora import AdaLoraConfig, LoraModel, RankAllocator, orthogonal_penalty
from ..lora.adalora import final_ranks


class RankAllocation:
    """The AdaLoRA schedule of one run; `total_steps` comes from the trainer's schedule."""

    def __init__(self, lora: LoraModel, total_steps: int, adapter_name: str = "default") -> None:
        config = lora.peft_config[adapter_name]
        if not isinstance(config, AdaLoraConfig):
            raise TypeError("RankAllocation needs an AdaLoRA adapter")
        config.total_step = total_steps
        problems = config._rank_pattern_problems()
        if problems:
            raise ValueError("AdaLoRA: " + "; ".join(problems))
        self.lora, self.config, self.adapter_name = lora, config, adapter_name
        self.allocator = RankAllocator(lora.model, config, adapter_name)

    def penalty(self) -> torch.Tensor:
        """orth_reg_weight * the orthogonality penalty (backward it once per step)."""
        return self.config.orth_reg_weight * orthogonal_penalty(self.lora.model, self.adapter_name)

    def after_optimizer_step(self, step: int) -> None:
        """The allocation for optimizer step `step` (0-based), before the gradients are zeroed."""
        self.allocator.step(step)

    def ranks(self) -> dict[str, int]:
        return final_ranks(self.config, self.lora.model, self.adapter_name)

    def report(self, output_dir: str | Path, say=print) -> Path:
        """Print the final ranks (per projection kind and their total) and plot them per layer."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ranks = self.ranks()
        by_kind: dict[str, list[int]] = {}
        for key, r in ranks.items():
            by_kind.setdefault(key.rsplit(".", 1)[-1], []).append(r)
        kinds = ", ".join(f"{k} {sum(v) / len(v):.1f}" for k, v in sorted(by_kind.items()))
        say(f"lorakit train: AdaLoRA final ranks: {sum(ranks.values())} triplets over {len(ranks)} layers "
            f"(budget {self.config.target_r * len(ranks)}); mean rank by module: {kinds}")
        fig, ax = plt.subplots(figsize=(max(6, len(ranks) * 0.08), 3))
        ax.bar(range(len(ranks)), list(ranks.values()))
        ax.set_xlabel("adapted layer (model order)")
        ax.set_ylabel("final rank")
        ax.set_title(f"AdaLoRA ranks (init {self.config.init_r}, target {self.config.target_r})")
        path = Path(output_dir) / "adalora_ranks.png"
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
