"""8-bit AdamW (Dettmers et al. 2022, block-wise quantized optimizer states): adamw_8bit and paged_adamw_8bit.

bitsandbytes provides both (on CUDA, and on the CPU from 0.50; "paged" only pages state on CUDA, on the CPU it is
plain 8-bit AdamW); torchao's AdamW8bit is the fallback for adamw_8bit. Where neither is installed, the error
names the optimizers that are.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from .convert import QuantizationError

EIGHT_BIT = ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit")
ALTERNATIVES = "use optim: adamw_torch (full-precision AdamW, always available)"


def has(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def eight_bit_optimizer(name: str, groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                        weight_decay: float) -> torch.optim.Optimizer:
    """The 8-bit AdamW `name` (one of EIGHT_BIT) over parameter `groups`, from bitsandbytes or torchao."""
    if name not in EIGHT_BIT:
        raise QuantizationError(f"{name!r} is not an 8-bit optimizer; choose one of {', '.join(EIGHT_BIT)}")
    kwargs = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
    if has("bitsandbytes"):
        bnb = importlib.import_module("bitsandbytes")
        cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(groups, **kwargs)
    if name != "paged_adamw_8bit" and has("torchao"):
        from torchao.optim import AdamW8bit

        return AdamW8bit(groups, **kwargs)
    needs = "bitsandbytes>=0.50" if name == "paged_adamw_8bit" else "bitsandbytes>=0.50 or torchao"
    raise QuantizationError(f"optim {name} needs {needs}, and neither is installed here; pip install "
                            f"'bitsandbytes>=0.50', or {ALTERNATIVES}")
