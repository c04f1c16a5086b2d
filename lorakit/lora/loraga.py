"""LoRA-GA (Wang et al. 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation"): start the adapter where
full fine-tuning's first step points.

With G the mean gradient of a target weight W (out, in) over a few training batches and G ~ U S V^T its SVD, the
adapter starts on 2r of G's singular directions, A on r of the right ones and B on r of the left ones, so that the
first update of s B A approximates full fine-tuning's first update of W. The base is offset so that the model's
outputs at step 0 are unchanged:

    A0 = c_A V_I^T (r, in),  B0 = c_B U_J (out, r),  W_res = W - s B0 A0        I, J disjoint, |I| = |J| = r

`direction` picks I and J among the top 2r (PEFT's names): ArB2r: I = first r, J = r..2r; A2rBr: I = r..2r,
J = first r; ArBr: I odd, J even; random. `scale` picks c_A, c_B:

    stable      the paper's stable-output scale d_out^(1/4) / sqrt(stable_gamma). The paper (and its authors' code)
                puts it on both A and B, which are plain singular vectors; PEFT 0.21 puts it on B only and lets B
                carry the singular values (B0 = U_J S_J c). lorakit follows the paper (`stable_scale_on="AB"`);
                `stable_scale_on="B"` gives PEFT's numbers.
    weight_svd  B0 = U_J S_J * s1(W) / S_J[0]   (PEFT's)
    gd_scale    A0 = V_I^T / s, B0 = U_J S_J / s (PEFT's)
    unit        A0 = V_I^T, B0 = U_J S_J        (PEFT's)

(The initialiser itself is `init.init_lora_ga`.) The gradients are estimated with the base frozen (only the target
weights take gradients). What it holds: over the batches before the last, the accumulated gradient of every target
weight (one fp32 copy of those weights); during the last batch each layer is reduced to its top-2r SVD as soon as
its gradient is complete and the gradient is freed, so with one batch the peak is one layer's gradient beyond the
training forward/backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import LoraConfig
from .inject import find_targets


@dataclass(frozen=True)
class GradientFactors:
    """The top-2r SVD of one target layer's mean gradient, oriented (out, in): G ~ u diag(s) vh."""

    u: torch.Tensor  # (out, 2r)
    s: torch.Tensor  # (2r,)
    vh: torch.Tensor  # (2r, in)


EXACT_SVD_UP_TO = 1024  # a layer with min(out, in) up to this gets the exact SVD (SmolLM2's all do)


def _truncated_svd(grad: torch.Tensor, k: int) -> GradientFactors:
    """Top-k singular triplets of an (out, in) fp32 matrix: exact for a small matrix, else randomized (q = 2k, 4
    power iterations, as PEFT) on a fixed seed, so the same gradient always gives the same factors."""
    if min(grad.shape) <= max(2 * k, EXACT_SVD_UP_TO):
        u, s, vh = torch.linalg.svd(grad, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[grad.device] if grad.device.type == "cuda" else []):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(grad, q=2 * k, niter=4)  # (out, q), (q,), (in, q)
        vh = v.T
    return GradientFactors(u[:, :k].contiguous(), s[:k].contiguous(), vh[:k].contiguous())


def gradient_factors(model: nn.Module, config: LoraConfig,
                     batches: Sequence[Callable[[], torch.Tensor]]) -> dict[str, GradientFactors]:
    """Module name -> the top-2r SVD of its weight's mean gradient over `batches` (each a callable that runs one
    batch forward and returns its mean loss), for every layer `config` targets. Only the target weights take
    gradients; every parameter's requires_grad and the model's mode are restored afterwards."""
    if not batches:
        raise ValueError("LoRA-GA needs at least one batch to estimate the gradient")
    layers = {key: model.get_submodule(key) for key in find_targets(model, config)}
    for key, module in layers.items():
        if type(module) is not nn.Linear and type(module).__name__ != "Conv1D":
            raise ValueError(f"LoRA-GA initialises Linear and Conv1D layers only; '{key}' is a "
                             f"{type(module).__name__} (quantized bases cannot give full-precision gradients)")
    conv = {key: type(module).__name__ == "Conv1D" for key, module in layers.items()}
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    factors: dict[str, GradientFactors] = {}
    hooks = []

    def finish(key: str, weight: torch.Tensor) -> None:
        grad = weight.grad.float() / len(batches)
        grad = grad.T if conv[key] else grad  # (out, in)
        factors[key] = _truncated_svd(grad, 2 * config.rank_for(key))
        weight.grad = None

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for module in layers.values():
            module.weight.requires_grad_(True)
            module.weight.grad = None
        model.train()
        for i, step in enumerate(batches):
            if i == len(batches) - 1:  # reduce each layer as soon as its last gradient is in
                hooks = [m.weight.register_post_accumulate_grad_hook(lambda w, key=key: finish(key, w))
                         for key, m in layers.items()]
            with torch.enable_grad():
                step().backward()
    finally:
        for hook in hooks:
            hook.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
            if name.rsplit(".", 1)[0] in layers:
                p.grad = None
        model.train(was_training)
    missing = sorted(set(layers) - set(factors))
    if missing:
        raise ValueError(f"LoRA-GA: no gradient reached {', '.join(missing[:3])}: these layers do not take part "
                         f"in the loss")
    return factors
