"""LoraConfig: PEFT's LoRA configuration, same field names, meanings and defaults.

The JSON written by `to_peft_dict` is what `peft.LoraConfig.from_pretrained` reads, and `from_peft_dict`
reads what PEFT writes (keys we do not know are dropped with a warning, so configs from newer PEFT load).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

CONFIG_NAME = "adapter_config.json"
BIAS_MODES = ("none", "all", "lora_only")
_INIT_STRINGS = ("gaussian", "pissa", "olora", "lora_ga")
LORA_GA_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")

# Default targets when `target_modules` is None, as PEFT's per-architecture table (attention query/value).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"], "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"], "opt": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "bloom": ["query_key_value"],
    "falcon": ["query_key_value"], "gptj": ["q_proj", "v_proj"], "smollm3": ["q_proj", "v_proj"],
}


@dataclass
class LoraGAConfig:
    """LoRA-GA's options, PEFT's names and defaults (see lora/loraga.py for the formulas)."""

    direction: str = "ArB2r"
    """Which of the gradient's top 2r singular directions A and B start on: ArB2r, A2rBr, ArBr or random."""
    scale: str = "stable"
    """How A and B are scaled: stable (d_out^(1/4) / sqrt(stable_gamma)), weight_svd, gd_scale or unit."""
    stable_gamma: int = 16
    """gamma of the stable scale."""
    stable_scale_on: str = "AB"
    """lorakit: where the stable scale goes: "AB" (the paper: on A and B, plain singular vectors) or "B" (PEFT 0.21:
    on B only, B carrying the singular values)."""

    def __post_init__(self) -> None:
        problems = []
        if self.direction not in LORA_GA_DIRECTIONS:
            problems.append(f"direction must be one of {', '.join(LORA_GA_DIRECTIONS)}, got {self.direction!r}")
        if self.scale not in LORA_GA_SCALES:
            problems.append(f"scale must be one of {', '.join(LORA_GA_SCALES)}, got {self.scale!r}")
        if isinstance(self.stable_gamma, bool) or not isinstance(self.stable_gamma, (int, float)) \
                or self.stable_gamma <= 0:
            problems.append(f"stable_gamma must be a positive number, got {self.stable_gamma!r}")
        if self.stable_scale_on not in ("AB", "B"):
            problems.append(f"stable_scale_on must be 'AB' or 'B', got {self.stable_scale_on!r}")
        if problems:
            raise ValueError("invalid LoraGAConfig: " + "; ".join(problems))


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter: W' = W + scaling * B A on the targeted layers."""

    r: int = 8
    """Rank of the update: lora_A is (r, in), lora_B is (out, r)."""
    target_modules: list[str] | str | None = None
    """Module names or suffixes to wrap, a regex matched against the full name, or "all-linear"."""
    target_parameters: list[str] | None = None
    """Parameters that are not nn.Linear weights to put LoRA on, e.g. experts.gate_up_proj (MoE experts' fused 3-D
    tensors, one update per expert); suffixes of "<module>.<parameter>"."""
    exclude_modules: list[str] | str | None = None
    """Modules never wrapped (suffixes, or a regex)."""
    lora_alpha: float = 8
    """Scale numerator: scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch input, in [0, 1)."""
    fan_in_fan_out: bool = False
    """True when the base weight is stored (in, out), as GPT-2's Conv1D (set automatically for Conv1D)."""
    bias: str = "none"
    """Which biases train: "none", "all" (every bias in the model) or "lora_only" (biases of wrapped layers)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA (Kalajdzievski 2023): scaling = lora_alpha / sqrt(r)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. a classifier head, lm_head)."""
    init_lora_weights: bool | str = True
    """True: Kaiming A, zero B; False: random B too (not a no-op); "gaussian"; "pissa"; "pissa_niter_N"; "olora";
    "lora_ga" (from the gradient: get_lora_model(..., lora_ga_factors=lorakit.lora.gradient_factors(...)))."""
    lora_ga_config: LoraGAConfig | None = None
    """LoRA-GA's options (init_lora_weights="lora_ga"); None means the defaults."""
    layers_to_transform: list[int] | int | None = None
    """Only wrap modules in these layer indices."""
    layers_pattern: list[str] | str | None = None
    """Name of the layer list ("layers", "h", ...) used with layers_to_transform."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: regex -> r."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides: regex -> lora_alpha."""
    use_dora: bool = False
    """Weight-decomposed LoRA (Liu et al. 2024): a trainable magnitude per output row."""
    task_type: str | None = "CAUSAL_LM"
    """PEFT task type; lorakit handles causal language models."""
    base_model_name_or_path: str | None = None
    """Where the base model came from, so an adapter directory alone is enough to load it."""
    inference_mode: bool = False
    """True when loaded for inference only (the adapter is frozen)."""
    revision: str | None = None
    """Base model revision (kept for PEFT compatibility)."""
    peft_type: str = "LORA"
    """Always "LORA"."""

    PEFT_TYPE: ClassVar[str] = "LORA"

    def __post_init__(self) -> None:
        problems = self._problems()
        if isinstance(self.lora_ga_config, dict):
            try:
                self.lora_ga_config = LoraGAConfig(**self.lora_ga_config)
            except (TypeError, ValueError) as exc:
                problems.append(f"lora_ga_config: {exc}")
        if self.init_lora_weights == "lora_ga" and self.lora_ga_config is None:
            self.lora_ga_config = LoraGAConfig()
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems))
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]

    def _problems(self) -> list[str]:
        """Every problem of the values, at once."""
        problems = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            problems.append(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            problems.append(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            problems.append(f"bias must be one of {', '.join(BIAS_MODES)}, got {self.bias!r}")
        if not _valid_init(self.init_lora_weights):
            problems.append(f"init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_N', 'olora' or "
                            f"'lora_ga', "
                            f"got {self.init_lora_weights!r}")
        if self.peft_type != self.PEFT_TYPE:
            problems.append(f"peft_type must be {self.PEFT_TYPE!r}, got {self.peft_type!r}")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict):
                problems.append(f"{name} must be a mapping of module regex to value, got {pattern!r}")
        problems += self._rank_pattern_problems()
        if self.use_dora and isinstance(self.init_lora_weights, str) and self.init_lora_weights != "gaussian":
            problems.append(f"use_dora cannot be combined with init_lora_weights={self.init_lora_weights!r}")
        if self.target_parameters is not None and (not isinstance(self.target_parameters, (list, tuple)) or not all(
                isinstance(t, str) and t for t in self.target_parameters)):
            problems.append(f"target_parameters must be a list of parameter names, got {self.target_parameters!r}")
        return problems

    def _rank_pattern_problems(self) -> list[str]:
        return [f"rank_pattern[{k!r}] must be a positive integer, got {v!r}"
                for k, v in (self.rank_pattern or {}).items() if not isinstance(v, int) or v <= 0]

    def rank_for(self, module_name: str) -> int:
        """The rank of the module called `module_name` (rank_pattern wins over r)."""
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """The lora_alpha of the module called `module_name` (alpha_pattern wins)."""
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling_for(self, module_name: str) -> float:
        """scaling = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r = self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_peft_dict(self) -> dict[str, Any]:
        """The JSON-ready dict PEFT writes to adapter_config.json."""
        out = dataclasses.asdict(self)
        if isinstance(out["target_modules"], list):
            out["target_modules"] = sorted(set(out["target_modules"]))
        # fields PEFT always writes; their neutral values keep PEFT from enabling features we do not have
        out.update(lora_bias=False, loftq_config={}, megatron_config=None, megatron_core="megatron.core",
                   layer_replication=None, auto_mapping=None, use_qalora=False,
                   trainable_token_indices=None, eva_config=None, corda_config=None)
        if out["lora_ga_config"] is not None:  # lorakit's extra field is not PEFT's
            out["lora_ga_config"].pop("stable_scale_on", None)
        return out

    @classmethod
    def from_peft_dict(cls, raw: dict[str, Any], source: str = "adapter config") -> "LoraConfig":
        """Build from a PEFT adapter_config dict (a LoRA or AdaLoRA one); unknown keys are dropped with one
        warning."""
        peft_type = raw.get("peft_type", cls.PEFT_TYPE)
        if peft_type == "ADALORA" and cls.PEFT_TYPE != "ADALORA":
            from .adalora import AdaLoraConfig

            return AdaLoraConfig.from_peft_dict(raw, source)
        if peft_type != cls.PEFT_TYPE:
            raise ValueError(f"{source}: peft_type is {peft_type!r}; lorakit reads LoRA and AdaLoRA adapters only")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k, v in raw.items() if k not in known and v not in (None, False, {}, [], ""))
        ignored_quietly = {"lora_bias", "loftq_config", "megatron_config", "megatron_core", "layer_replication",
                           "auto_mapping", "use_qalora", "qalora_group_size", "peft_version",
                           "ensure_weight_tying", "trainable_token_indices"}
        unknown = [k for k in unknown if k not in ignored_quietly]
        if unknown:
            warnings.warn(f"{source}: ignoring keys lorakit does not know: {', '.join(unknown)}", stacklevel=2)
        if raw.get("lora_bias"):
            raise ValueError(f"{source}: lora_bias=True adapters are not supported")
        return cls(**{k: v for k, v in raw.items() if k in known})

    def save(self, directory: str | Path) -> None:
        """Write adapter_config.json into `directory`."""
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_peft_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "LoraConfig":
        """Read adapter_config.json from `directory`, with a one-line error when it is missing or broken."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no {CONFIG_NAME} here, so this is not a LoRA adapter directory")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        if "target_modules" not in raw:
            raise ValueError(f"{path}: missing required key 'target_modules'")
        return cls.from_peft_dict(raw, source=str(path))


def _valid_init(value: object) -> bool:
    if isinstance(value, bool):
        return True
    if not isinstance(value, str):
        return False
    return value in _INIT_STRINGS or re.fullmatch(r"pissa_niter_\d+", value) is not None


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """The first pattern that matches the end of `module_name` (PEFT's rank_pattern/alpha_pattern rule)."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None
