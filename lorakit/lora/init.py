"""Initialisers of the LoRA factors.

Plain LoRA (Hu et al. 2021) starts at W' = W: A Kaiming-uniform, B zero. PiSSA (Meng et al. 2024) and OLoRA
(Buyukakyuz 2024) instead start A and B on the principal directions of W and keep only the residual in the base
weight, so W_res + scaling * B A = W still holds at step 0.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn


def init_plain(lora_A: torch.Tensor, lora_B: torch.Tensor, mode: bool | str, r: int) -> None:
    """Kaiming-uniform A / zero B (mode True), normal A / zero B ("gaussian"), or leave both random (False)."""
    if mode is False:
        return
    if mode == "gaussian":
        nn.init.normal_(lora_A, std=1.0 / r)
    else:
        # a = sqrt(5) reproduces nn.Linear's default init: U(-1/sqrt(in), 1/sqrt(in))
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    nn.init.zeros_(lora_B)


def init_embedding(lora_A: torch.Tensor, lora_B: torch.Tensor, mode: bool | str) -> None:
    """Embedding LoRA starts with A zero and B normal (the transpose of the linear case), as PEFT does."""
    if mode is False:
        return
    nn.init.zeros_(lora_A)
    nn.init.normal_(lora_B)


def init_principal(weight: torch.Tensor, mode: str, r: int, scaling: float) -> tuple[torch.Tensor, ...]:
    """PiSSA or OLoRA factors of `weight` (out, in): returns (A (r, in), B (out, r), residual (out, in)), in fp32.

    PiSSA: W ~ U S V^T; B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T, so s * B A is the top-r part of W.
    OLoRA: W = Q R; B = Q_r, A = R_r (PEFT's choice: A is not divided by s). Either way the residual
    W - s * B A stays in the base layer.
    """
    w = weight.detach().float()
    if mode == "olora":
        q, rr = torch.linalg.qr(w)  # (out, k), (k, in)
        lora_B, lora_A = q[:, :r].contiguous(), rr[:r].contiguous()
    else:
        niter = re.fullmatch(r"pissa_niter_(\d+)", mode)
        if niter:
            u, s, v = torch.svd_lowrank(w, q=r, niter=int(niter.group(1)))  # (out, r), (r,), (in, r)
            vh = v.T
        else:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
        root = torch.sqrt(s[:r] / scaling)  # (r,)
        lora_B = (u[:, :r] * root).contiguous()  # (out, r)
        lora_A = (root[:, None] * vh[:r]).contiguous()  # (r, in)
    residual = w - scaling * (lora_B @ lora_A)
    return lora_A, lora_B, residual


def init_lora_ga(factors, weight: torch.Tensor, r: int, scaling: float,
                 cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-GA (lora/loraga.py has the formulas): (A0 (r, in), B0 (out, r), W_res (out, in)) in fp32 for an oriented
    (out, in) weight, from `factors` (loraga.GradientFactors: the gradient's top-2r SVD) and a LoraGAConfig."""
    u, s, vh = factors.u, factors.s, factors.vh  # (out, 2r), (2r,), (2r, in)
    if cfg.direction == "ArB2r":
        rows_a, cols_b = torch.arange(r), torch.arange(r, 2 * r)
    elif cfg.direction == "A2rBr":
        rows_a, cols_b = torch.arange(r, 2 * r), torch.arange(r)
    elif cfg.direction == "ArBr":
        rows_a, cols_b = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    else:  # random: r of the 2r directions for both, as PEFT
        rows_a = cols_b = torch.randperm(2 * r)[:r]
    lora_A = vh[rows_a]  # (r, in)
    lora_B = u[:, cols_b]  # (out, r)
    s_b = s[cols_b]  # (r,)
    out_features = weight.shape[0]
    stable = out_features**0.25 / math.sqrt(cfg.stable_gamma)
    if cfg.scale == "stable" and cfg.stable_scale_on == "AB":
        lora_A, lora_B = lora_A * stable, lora_B * stable
    else:
        lora_B = lora_B * s_b  # PEFT: B carries the singular values
        if cfg.scale == "stable":
            lora_B = lora_B * stable
        elif cfg.scale == "weight_svd" and s_b[0] > 0:
            lora_B = lora_B * (torch.linalg.matrix_norm(weight, ord=2) / s_b[0])
        elif cfg.scale == "gd_scale":
            lora_A, lora_B = lora_A / scaling, lora_B / scaling
    residual = weight - scaling * (lora_B @ lora_A)  # (out, in)
    return lora_A.contiguous(), lora_B.contiguous(), residual
