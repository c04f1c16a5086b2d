"""The causal-LM loss, computed only where it counts and never with the whole (tokens x vocab) logits at once.

The plain route (`model(**batch, labels=...)`) applies the output head to every position, materialises
(B, T, V) float logits and then throws away the prompt positions, which in SFT are most of them. Here the decoder
backbone runs to hidden states, only the positions whose next-token label is not -100 are kept, and the head plus
cross-entropy run over those in chunks of `chunk_size` rows:

    h = backbone(input_ids)                   # (B, T, H)
    targets = labels[:, 1:]                   # (B, T-1): position t predicts token t+1
    rows = h[:, :-1][targets != -100]         # (N, H), N = label-bearing positions
    loss_sum = sum over chunks of CE(rows_c @ W.T, targets_c)   # (chunk, V) logits per chunk

With a plain `nn.Linear` head, `_LinearCrossEntropy` computes the gradients of each chunk during the forward pass
(softmax - onehot is all the backward needs), so no logits are kept for the backward and none are recomputed. Any
other head (wrapped by LoRA or modules_to_save) runs chunk by chunk under activation checkpointing. Models whose
logits are more than `head(h)` (soft-capping, logit scales) use their own forward for the logits instead.

The functions return the loss *summed* over label tokens plus the token count, so the trainer can divide by the
label tokens of the whole optimizer step (averaging per-micro-batch means would give the tokens of label-poor
micro-batches more weight).

Distillation to the base (`Distill`, the `replay_kl_weight` key): on the label tokens of replay rows (batch key
`replay`, (B, T) bool) the target is a mix of the label and the base model's own next-token distribution,

    q = (1 - w) onehot(label) + w P_base          P_base from a no-grad forward with the adapters disabled
    loss = CE(q, P) - w H(P_base) = (1 - w) CE(label, P) + w KL(P_base || P)

so d loss / d logits = softmax(logits) - q: the same chunked head as the plain loss, with the teacher's rows of
the same chunk. Only rows holding replay tokens run the teacher forward.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..device import shape_bucket
from .attention import NAME as CPU_ATTENTION
from .attention import mark_packed

IGNORE_INDEX = -100
# config attributes that change logits after the head; a model with any of them set takes the plain route
_LOGIT_MODIFIERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                    "lm_head_multiplier", "mup_width_multiplier", "output_logits_scaling")


REPLAY_KEY = "replay"  # (B, T) bool batch key: the token belongs to a replay row (collated only with Distill on)
TEACHER_KEY = "teacher"  # (B, T, H) batch key: the base's hidden states on replay rows, computed once (teacher.py)


@dataclass(frozen=True)
class Distill:
    """Replay rows learn the base's next-token distribution with weight `weight` in (0, 1] (module docstring);
    `base()` is a context in which the model runs without its adapters (LoraModel.disable_adapter)."""

    weight: float
    base: Callable[[], AbstractContextManager]
    scale: float = 1.0  # each replay token's loss counts this many times a task token's (replay_loss_weight)


def distill_problem(model: nn.Module) -> str | None:
    """Why replay_kl_weight cannot run on this model (its head is trained, or the chunked route is off), or None."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return (f"replay_kl_weight needs a plain, frozen output head; this model's is a {type(head).__name__} "
                "(lm_head trained by LoRA or modules_to_save)")
    return plain_route_reason(model)


def shifted_targets(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token targets (B, T-1). In packed rows, the token that starts an example is not predicted from the
    previous example (position_ids restart at 0 there)."""
    targets = labels[:, 1:]
    if position_ids is not None:
        targets = targets.masked_fill(position_ids[:, 1:] == 0, IGNORE_INDEX)
    return targets


def default_chunk(vocab_size: int) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about 64 MB (341 rows for a 49k vocabulary)."""
    return max(128, (1 << 24) // max(vocab_size, 1))


def plain_route_reason(model: nn.Module) -> str | None:
    """Why the chunked route cannot be used for this transformers model, or None when it can."""
    backbone = getattr(model, "base_model", model)
    if backbone is model:
        return "the model has no separate decoder backbone"
    if model.get_output_embeddings() is None:
        return "the model has no output head"
    config = model.config
    config = getattr(config, "text_config", None) or config
    for name in _LOGIT_MODIFIERS:
        value = getattr(config, name, None)
        if value not in (None, 0, 1, 1.0, False):
            return f"its logits are modified after the head ({name}={value})"
    return None


def causal_lm_loss(model: nn.Module, batch: dict, chunked: bool = True, chunk_size: int | None = None,
                   distill: Distill | None = None) -> tuple[torch.Tensor, int]:
    """(loss summed over label tokens, number of label tokens) of `batch` under the transformers `model`.

    `batch` holds input_ids, labels and attention_mask or position_ids (and `replay` rows with `distill`).
    `chunked` False takes the plain route: the model's own forward to full logits, then the same summed
    cross-entropy. `chunk_size` rows of logits exist at a time (default: about 64 MB of them, see
    `default_chunk`). With `distill`, replay tokens learn the base's distribution too (module docstring).
    """
    replay, cached = batch.get(REPLAY_KEY), batch.get(TEACHER_KEY)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", REPLAY_KEY, TEACHER_KEY)}
    targets = shifted_targets(batch["labels"], batch.get("position_ids"))
    mask = targets != IGNORE_INDEX  # (B, T-1)
    count = int(mask.sum())
    packed = "position_ids" in inputs and "attention_mask" not in inputs
    if packed and getattr(model.config, "_attn_implementation", None) == CPU_ATTENTION:
        mark_packed(inputs["position_ids"])  # only then: the spans are read on the host (a sync on a GPU)
    if distill is not None and replay is not None and bool(replay.any()):
        if not chunked:
            raise ValueError(f"replay_kl_weight needs the chunked loss ({plain_route_reason(model)})")
        return distilled_loss(model, inputs, targets, mask, replay[:, 1:] & mask, distill, chunk_size, cached), count
    if chunked:
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
        rows = hidden[:, :-1][mask]  # (N, H)
        head = model.get_output_embeddings()
        return head_cross_entropy(rows, targets[mask], head, chunk_size or head_chunk(model, head)), count
    logits = model(**inputs, use_cache=False).logits  # (B, T, V)
    picked = logits[:, :-1][mask]  # (N, V)
    return F.cross_entropy(picked.float(), targets[mask], reduction="sum"), count


def head_chunk(model: nn.Module, head: nn.Module) -> int:
    return default_chunk(getattr(head, "out_features", 0) or getattr(model.config, "vocab_size", 0))


def distilled_loss(model: nn.Module, inputs: dict, targets: torch.Tensor, mask: torch.Tensor, taught: torch.Tensor,
                   distill: Distill, chunk_size: int | None, cached: torch.Tensor | None = None) -> torch.Tensor:
    """Label CE on task tokens plus (1 - w) CE + w KL(P_base || P) on replay tokens (`taught`, (B, T-1) bool).

    `cached` (B, T, H): the base's last hidden states on these rows, computed before training (teacher.py); without
    it the base runs here, on the rows that hold replay tokens."""
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(distill_problem(model))
    size = chunk_size or head_chunk(model, head)
    if cached is not None:
        teacher_rows = cached[:, :-1][taught]  # (M, H)
    else:
        teacher_rows = base_states(model, inputs, taught, distill)
    plain = mask & ~taught  # (B, T-1)
    loss = head_cross_entropy(hidden[:, :-1][plain], targets[plain], head, size)
    return loss + distill.scale * _LinearCrossEntropy.apply(hidden[:, :-1][taught], head.weight, head.bias,
                                                            targets[taught], size, teacher_rows, distill.weight)


def base_states(model: nn.Module, inputs: dict, taught: torch.Tensor, distill: Distill) -> torch.Tensor:
    """The base's last hidden states (M, H) at the `taught` positions, (B, T-1) bool: a no-grad forward, adapters off
    and no dropout, of the rows that hold any."""
    taught_rows = taught.any(dim=1)  # (B,)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), distill.base():
            teacher_inputs = {k: v[taught_rows] for k, v in inputs.items()}
            teacher = model.base_model(**teacher_inputs, use_cache=False).last_hidden_state  # (b, T, H)
            return teacher[:, :-1][taught[taught_rows]]  # (M, H)
    finally:
        model.train(was_training)


def head_cross_entropy(rows: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk_size: int) -> torch.Tensor:
    """sum_i CE(head(rows_i), targets_i), in chunks of `chunk_size` rows; rows (N, H), targets (N,)."""
    if rows.shape[0] == 0:
        return rows.sum() * 0.0  # keeps the graph (and the backward) valid for a batch without labels
    if type(head) is nn.Linear:
        return _LinearCrossEntropy.apply(rows, head.weight, head.bias, targets, chunk_size)
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_size):
        piece, goal = rows[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, piece, goal, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, piece, goal)
    return total


def _chunk_loss(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(rows).float(), targets, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """sum CE(rows @ W.T + b, targets) with the gradients computed chunk by chunk in the forward pass.

    d loss / d logits = softmax(logits) - onehot(target), so per chunk (n rows, V classes):
        grad_rows = G @ W        # (n, H)
        grad_W   += G.T @ rows   # (V, H), only when W trains (full fine-tuning)
    and the backward only scales the stored gradients by the incoming scalar. With `teacher` rows (N, H) (the
    base's hidden states at the same positions) and weight w, the target is (1 - w) onehot + w softmax(teacher @ W.T)
    and the loss (1 - w) CE + w KL(P_teacher || P): G = softmax - target.
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk_size, teacher=None, kl_weight=0.0):
        need_rows, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        total = rows.new_zeros((), dtype=torch.float32)
        device = rows.device.type
        if torch.is_autocast_enabled(device):  # cast the (V, H) head once, not once per chunk as autocast would
            amp = torch.get_autocast_dtype(device)
            weight_mm, bias_mm = weight.to(amp), bias.to(amp) if bias is not None else None
        else:
            weight_mm, bias_mm = weight, bias
        bucket = shape_bucket(rows.device, weight_mm.dtype)
        for start in range(0, rows.shape[0], chunk_size):
            piece, goal = rows[start:start + chunk_size], targets[start:start + chunk_size]
            n = piece.shape[0]
            extra = bucket(n) - n if bucket else 0  # zero rows: the last chunk's matmuls get a known shape
            logits = F.linear(F.pad(piece, (0, 0, 0, extra)) if extra else piece, weight_mm, bias_mm)
            logits = logits[:n].float()  # (n, V); matmul in the autocast dtype
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            total += (1.0 - kl_weight) * (lse - logits.gather(1, goal[:, None]).squeeze(1)).sum()
            logp = logits.sub_(lse[:, None])  # log-softmax, in place of the logits, (n, V)
            if teacher is not None:
                taught = teacher[start:start + chunk_size]
                t_logits = F.linear(F.pad(taught, (0, 0, 0, extra)) if extra else taught, weight_mm, bias_mm)
                t_logp = torch.log_softmax(t_logits[:n].float(), dim=-1)  # (n, V)
                t_prob = t_logp.exp()
                total += kl_weight * (t_prob * (t_logp - logp)).sum()  # KL(P_teacher || P)
            if not (need_rows or need_weight or need_bias):
                continue
            grad = logp.exp_()  # softmax, in place of the log-softmax, (n, V)
            grad[torch.arange(goal.shape[0], device=goal.device), goal] -= 1.0 - kl_weight
            if teacher is not None:
                grad.sub_(t_prob, alpha=kl_weight)
            if need_rows:
                grad_mm = grad.to(weight_mm.dtype)
                grad_mm = F.pad(grad_mm, (0, 0, 0, extra)) if extra else grad_mm
                grad_rows[start:start + chunk_size] = (grad_mm @ weight_mm)[:n].to(rows.dtype)  # (n, H)
            if need_weight:
                grad_weight += grad.t() @ piece.float()  # (V, H)
            if need_bias:
                grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_rows, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_rows, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_out
        return (grad_rows * scale.to(grad_rows.dtype) if grad_rows is not None else None,
                (grad_weight * scale).to(weight_dtype) if grad_weight is not None else None,
                (grad_bias * scale).to(bias_dtype) if grad_bias is not None else None,
                None, None, None, None)


def check_chunked_route(model: nn.Module, batch: dict, max_tokens: int = 256) -> str | None:
    """None when the chunked route gives this model's own loss on one row of `batch`; else why not.

    A one-time guard for heads this module does not know about: both routes run in eval mode (no dropout), in
    fp32, without gradients, on the first `max_tokens` tokens of the first row.
    """
    reason = plain_route_reason(model)
    if reason is not None:
        return reason
    device = next(model.parameters()).device  # the CPU for a base that FSDP2 has not sharded onto the device yet
    one = {k: v[:1, :max_tokens].to(device) for k, v in batch.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            fast, count = causal_lm_loss(model, one, chunked=True)
            plain, _ = causal_lm_loss(model, one, chunked=False)
    finally:
        model.train(was_training)
    if count and not torch.allclose(fast, plain, rtol=1e-3, atol=1e-4 * count):
        return f"the chunked loss ({float(fast) / count:.5f}) differs from the model's own ({float(plain) / count:.5f})"
    return None
