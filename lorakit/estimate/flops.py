"""FLOPs of a training step, per token, as lorakit computes it (a matmul of m x k by k x n is 2 m k n FLOPs).

Per token of a sequence of length S, over the layers the backward reaches and the ones it does not:

    base matmuls (N = parameters of the decoder's linears):  forward 2 N; backward to the input 2 N, only where the
                                                             backward passes; backward to a trained weight 2 N
    LoRA (N_lora adapter parameters):                        6 N_lora (forward, both backward products)
    attention, causal (q = heads x head_dim per layer):      forward 2 q S; backward 4 q S
    gradient checkpointing:                                  the forward of the checkpointed layers once more
    output head, only on label tokens (V x H):               forward 2 V H, backward to the rows 2 V H (+ 2 V H
                                                             when the head trains)
    the base's head on replay labels (replay_kl_weight):     forward 2 V H (its hidden states are kept)

S is a packed example's own length (attention runs per example) or a padded row's width.
"""

from __future__ import annotations

from ..train.config import TrainConfig
from .memory import Training, _layer_index
from .shape import ModelShape


def per_token(shape: ModelShape, cfg: TrainConfig, run: Training, seq_len: float) -> float:
    """Training FLOPs per (computed) token of the decoder, the head excluded."""
    total = 0.0
    for m in shape.linears:
        n = m.in_features * m.out_features
        layer = _layer_index(m.name)
        reached = layer is None or layer >= run.first_backward_layer
        trained = f"{m.name}.weight" in run.trained and not run.targets
        total += 2 * n + (2 * n if reached else 0) + (2 * n if trained else 0)
        if cfg.gradient_checkpointing and reached:
            total += 2 * n
    total += 6 * sum(run.trained.values()) if run.targets else 0
    reached_layers = shape.n_layers - run.first_backward_layer
    attention = 2 * shape.q_width * seq_len
    total += shape.n_layers * attention + reached_layers * 2 * attention
    if cfg.gradient_checkpointing:
        total += reached_layers * attention
    return total


def head_per_label(shape: ModelShape, run: Training) -> float:
    """FLOPs of the output head and its backward per label token."""
    vh = shape.vocab * shape.hidden
    return 4 * vh + (2 * vh if run.trains_head else 0)


def epoch_flops(shape: ModelShape, cfg: TrainConfig, run: Training, computed_tokens: int, label_tokens: int,
                seq_len: float, kl_labels: int = 0) -> float:
    """FLOPs of one pass over the data: every computed token through the decoder, every label through the head, and
    the base's head on the `kl_labels` the KL term reads."""
    return (computed_tokens * per_token(shape, cfg, run, seq_len) + label_tokens * head_per_label(shape, run)
            + kl_labels * 2 * shape.vocab * shape.hidden)
