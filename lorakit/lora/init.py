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
