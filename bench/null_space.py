"""A retention lever measured by bench/retention_levers.py: LoRA's A kept orthogonal to general text's inputs.

For every LoRA linear, the inputs x (in,) it sees on the run's replay rows (the base's, adapters off) give

    C = sum_x x x^T                      (in, in), over every non-padding token of every replay row
    U = the top eigenvectors of C holding a share `energy` of trace(C)          (in, k)

and after every optimizer step A <- A (I - U U^T) (projected AdamW), so the update s B A x is ~0 for any input in
span(U): on inputs like the replay rows the adapted layer computes what the base did, whatever B learns. A share of
0.99 removes about 71 % of the input directions of SmolLM2-135M's layers. The projected A is an ordinary A: the
saved adapter is a plain PEFT LoRA. The bases are measured once, after the first step (B is then one step from 0).

This is the null-space idea of knowledge-editing work (edits constrained to leave the keys of preserved knowledge
unchanged), applied to LoRA's down-projection. It lives in bench/ because it did not move the trade-off enough to
become a `lorakit train` key (README: Keeping what the base knew).
"""

from __future__ import annotations

import sys

import torch

KEY = "null_space"  # the pseudo-override of a lever: null_space=ENERGY (not a lorakit train key)
BATCH = 16


class NullSpace:
    """`on_step` callback of `lorakit.train.train`: projects every LoRA A after each optimizer step."""

    def __init__(self, energy: float) -> None:
        if not 0 < energy < 1:
            raise ValueError(f"{KEY} must be in (0, 1), got {energy}")
        self.energy = energy
        self.bases: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (A weight, U) per LoRA layer

    def __call__(self, trainer) -> None:
        if self.bases is None:
            self.bases = self.measure(trainer)
        self.project()

    def measure(self, trainer) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from lorakit.data.batching import pad_collate
        from lorakit.lora.inject import lora_layers

        model, lora = trainer.trainable.model, trainer.trainable.lora
        rows = [item for item in trainer.data.items if item.get("replay")]
        if not rows:
            raise ValueError(f"{KEY} needs replay rows marked for the KL term (replay_kl_weight > 0)")
        layers = lora_layers(model)
        sums = {key: torch.zeros(m.in_features, m.in_features) for key, m in layers}
        was_training = model.training
        model.eval()
        with torch.no_grad(), lora.disable_adapter(), trainer.autocast():
            for start in range(0, len(rows), BATCH):
                batch = pad_collate(rows[start:start + BATCH], trainer.pad_id)  # right-padded (B, T)
                mask = batch["attention_mask"]
                inputs = capture_inputs(model, layers, batch["input_ids"].to(trainer.device), mask.to(trainer.device))
                for key, x in inputs.items():
                    x = x[mask.to(x.device).bool()].float().cpu()  # (N, in)
                    sums[key] += x.T @ x
        model.train(was_training)
        bases = [(m.lora_A["default"].weight, top_directions(sums[key], self.energy).to(m.lora_A["default"].weight))
                 for key, m in layers]
        removed = sum(u.shape[1] for _, u in bases) / sum(u.shape[0] for _, u in bases)
        print(f"{KEY}: {len(bases)} LoRA layers, {removed:.0%} of their input directions removed "
              f"(the top ones holding {self.energy:g} of the replay rows' input energy)", file=sys.stderr, flush=True)
        return bases

    @torch.no_grad()
    def project(self) -> None:
        for a, u in self.bases:  # a (r, in), u (in, k)
            a.sub_((a @ u) @ u.T)


def capture_inputs(model, layers, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each LoRA layer's input (B, T, in) in one forward; the hooks are removed before returning."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, inp, out, key=key: seen.__setitem__(key, inp[0]))
               for key, m in layers]
    try:
        model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return seen


def top_directions(c: torch.Tensor, energy: float) -> torch.Tensor:
    """The eigenvectors (in, k) of the symmetric `c` with the largest eigenvalues, the fewest whose sum reaches a
    share `energy` of the trace."""
    values, vectors = torch.linalg.eigh(c.double())  # ascending
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    k = int((torch.cumsum(values, 0) / values.sum() < energy).sum()) + 1
    return vectors[:, :k].float().contiguous()
