"""TrainConfig: every `lorakit train` setting, under LLaMA-Factory's key names, with its default and meaning.

Defaults are LLaMA-Factory's (Hugging Face TrainingArguments' where LLaMA-Factory has none), except
`logging_steps` (10, not 500) and `output_dir` (which they require). `__post_init__` checks types and ranges and
reports every problem at once; reading YAML and key=value overrides is in `options.py`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..dtypes import DTYPE_NAMES
from ..lora.config import LORA_GA_DIRECTIONS, LORA_GA_SCALES
from ..settings import ConfigError

STAGES = ("sft", "pt")
FINETUNING_TYPES = ("lora", "full", "freeze")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
EVAL_STRATEGIES = ("no", "steps", "epoch")
SAVE_STRATEGIES = ("no", "steps", "epoch")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit")
QUANTIZATION_METHODS = ("auto", "bnb", "lorakit")
COMPUTE_DTYPES = tuple(DTYPE_NAMES)


@dataclass
class TrainConfig:
    """Settings of one training run; see `config_help()` for the generated reference."""

    UNSUPPORTED: typing.ClassVar[dict] = {  # beyond lorakit.settings.UNSUPPORTED_KEYS; other commands ignore it
        "do_predict": (False, "prediction is not part of lorakit train; use lorakit eval"),
    }

    # --- model
    model_name_or_path: str | None = None
    """Base model: a local Hugging Face directory, a .gguf file, a hub id already in the local cache, or empty for
    the embedded default (SmolLM2-135M-Instruct)."""
    quantization_bit: int | None = None
    """Quantize the base model's linear layers (not the output head) to 4 or 8 bits and train LoRA on top (QLoRA);
    empty: no quantization."""
    quantization_type: str = "nf4"
    """4-bit data type: nf4 (NormalFloat, QLoRA's) or fp4."""
    double_quantization: bool = True
    """4-bit: also quantize the per-block scales to 8 bits (QLoRA's double quantization, ~0.37 bits/weight less)."""
    quantization_method: str = "auto"
    """Who holds the quantized weights: bnb (bitsandbytes Linear4bit/Linear8bitLt), lorakit (plain torch, any
    device), or auto (bitsandbytes when installed, else lorakit)."""
    compute_dtype: str | None = None
    """Matmul dtype of the quantized layers: float32, bfloat16 or float16; empty: the autocast dtype (bf16/fp16)
    or float32."""
    device: str | None = None
    """lorakit: where to train ("cpu", "cuda", "cuda:1"); empty picks CUDA when present, else the CPU."""

    # --- method
    stage: str = "sft"
    """sft (supervised fine-tuning on conversations; loss on assistant replies) or pt (plain text, loss on all)."""
    do_train: bool = True
    """Must be true: `lorakit train` trains."""
    finetuning_type: str = "lora"
    """lora (train an adapter), qlora (lora on a 4-bit base: quantization_bit 4), full (every weight) or freeze
    (only the last freeze_trainable_layers layers)."""
    lora_target: str = "all"
    """Modules that get LoRA: "all" (every linear layer but the output head) or comma-separated names
    (q_proj,v_proj)."""
    lora_rank: int = 8
    """LoRA rank r: lora_A is (r, in), lora_B is (out, r)."""
    lora_alpha: float | None = None
    """LoRA scale numerator, scaling = lora_alpha / r; empty means 2 * lora_rank."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch input, in [0, 1)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scaling = lora_alpha / sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA): a trainable magnitude per output row."""
    pissa_init: bool = False
    """Initialise A and B from the top-r singular directions of each weight (PiSSA); the saved adapter is
    converted to plain LoRA for the untouched base."""
    pissa_iter: int = 16
    """Subspace iterations of PiSSA's fast SVD; -1 uses the exact SVD."""
    loraga_init: bool = False
    """LoRA-GA: start A and B on the singular directions of each target layer's gradient (estimated on loraga_batches
    training batches, base frozen), base offset so step 0 is unchanged; saved as plain LoRA of rank 2r. It wants a
    learning rate near full fine-tuning's, with use_rslora (the authors' recipe)."""
    loraga_batches: int = 8
    """LoRA-GA: training batches that estimate the gradient."""
    loraga_direction: str = "ArB2r"
    """LoRA-GA: which singular directions A and B take (ArB2r, A2rBr, ArBr, random; PEFT's names)."""
    loraga_scale: str = "stable"
    """LoRA-GA: stable (d_out^(1/4)/sqrt(gamma)), weight_svd, gd_scale or unit (PEFT's names)."""
    loraga_stable_gamma: float = 16
    """LoRA-GA: gamma of the stable scale."""
    loraga_stable_scale_on: str = "AB"
    """LoRA-GA: the stable scale on A and B (the paper) or on B only (B, PEFT 0.21's formula)."""
    use_adalora: bool = False
    """AdaLoRA: LoRA in SVD form whose rank per layer is allocated during training (lorakit runs the budget schedule
    every step and adds the orthogonality penalty); lora_rank is unused, adalora_init_r is the start."""
    adalora_init_r: int = 12
    """AdaLoRA: rank every layer starts with."""
    adalora_target_r: int = 8
    """AdaLoRA: average rank per layer at the end."""
    adalora_tinit: int = 0
    """AdaLoRA: warm-up steps before the budget falls."""
    adalora_tfinal: int = 0
    """AdaLoRA: final steps with the ranks fixed."""
    adalora_deltaT: int = 1
    """AdaLoRA: steps between two allocations."""
    adalora_beta1: float = 0.85
    """AdaLoRA: moving average of the sensitivity."""
    adalora_beta2: float = 0.85
    """AdaLoRA: moving average of the uncertainty."""
    adalora_orth_reg_weight: float = 0.5
    """AdaLoRA: weight of the orthogonality penalty."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: lora_B learns this many times faster than lora_A (16 is the paper's suggestion); empty is off."""
    loraplus_lr_embedding: float = 1e-6
    """LoRA+: learning rate of lora_embedding_B (LoRA on embedding layers)."""
    additional_target: str | None = None
    """Comma-separated modules trained in full and saved with the adapter (PEFT modules_to_save), e.g. lm_head."""
    freeze_trainable_layers: int = 2
    """freeze: train the last N decoder layers (a negative N: the first N)."""
    freeze_trainable_modules: str = "all"
    """freeze: which modules inside those layers train: "all" or comma-separated names (mlp,self_attn)."""
    freeze_extra_modules: str | None = None
    """freeze: comma-separated modules outside the layers that also train (embed_tokens,norm)."""

    # --- data
    dataset: str | None = None
    """Comma-separated data sets: names registered in dataset_dir/dataset_info.json, or file paths (JSON, JSONL,
    CSV, parquet; alpaca, sharegpt, OpenAI messages, or text for pt)."""
    dataset_dir: str = "data"
    """Folder holding dataset_info.json and the data files."""
    template: str | None = None
    """Chat template: empty uses the tokenizer's own; or a built-in name (chatml, qwen, qwen3_nothink, llama3,
    alpaca, mistral, empty)."""
    cutoff_len: int = 2048
    """Longest example in tokens; longer ones are truncated (and counted)."""
    max_samples: int | None = None
    """Use at most this many records of each data set."""
    val_size: float = 0.0
    """Held-out validation split: a fraction in (0, 1) or a number of examples; 0 for none."""
    packing: bool | None = None
    """Pack several examples into each row (attention stays inside each example); empty means true for pt,
    false for sft."""
    neat_packing: bool = False
    """Same as packing: true (lorakit's packing never attends across examples)."""
    train_on_prompt: bool = False
    """Also learn the prompt tokens, not only the assistant replies."""
    disable_shuffling: bool = False
    """Keep the data order instead of shuffling every epoch."""
    group_by_length: bool = False
    """Batch examples of similar length together (batches still come in random order): less padding, less
    compute. No effect with packing."""
    replay_dataset: str | None = None
    """General data mixed into every epoch so the adapter keeps what the base model knew: any data set `dataset`
    accepts (names in dataset_dir/dataset_info.json or files). With self_replay, only its prompts are used."""
    replay_ratio: float = 0.0
    """Share of each epoch's training examples that are replay rows, in [0, 1): round(n_task * r / (1 - r)) rows,
    drawn once (seeded; the pool repeats when smaller) and shuffled in with the task rows every epoch. 0 is off."""
    self_replay: bool = False
    """Replay the base model's own greedy answers: to the prompts of replay_dataset, else to lorakit's shipped
    general prompts (none of them a retention probe). Generated once before training, cached beside output_dir
    (.lorakit-replay/)."""
    self_replay_max_new_tokens: int = 64
    """self_replay: longest generated answer in tokens; one not finished by then is cut after its last whole
    sentence (left out when it has none)."""
    replay_kl_weight: float = 0.0
    """Distil the base model on replay rows: their label tokens learn (1 - w) the label and w the base's whole
    next-token distribution (w KL(P_base || P), the base from one extra forward of each replay row, without
    gradients and with the adapter off). In [0, 1]; lora/qlora only (not under FSDP2). 0 is off."""
    replay_loss_weight: float = 1.0
    """With replay_kl_weight: each replay token's loss counts this many times a task token's in the step's sum
    (the mean still divides by the plain token count). Above 0; 1 is plain."""
    replay_null_space: float = 0.0
    """Keep every LoRA A orthogonal to the input directions that hold this share of the replay rows' input energy
    (per layer, from the base's inputs; A <- A (I - U U^T) after every step), so the adapter leaves the base's
    output on such inputs unchanged. In [0, 1), e.g. 0.99; plain lora/qlora, rows not packed, not under FSDP2.
    0 is off."""
    replay_task_directions: int = 0
    """Keep every LoRA A inside the k input directions (per layer input) where the task rows' input energy is largest
    relative to the replay rows': the top k generalized eigenvectors of (C_task, C_replay), both from the base's
    inputs; A <- A Q Q^T after every step. The adapter then moves the output mostly on inputs like the task's.
    A whole number below every target layer's input width, e.g. 64; plain lora/qlora, rows not packed, not under
    FSDP2, not with replay_null_space. 0 is off."""

    # --- output
    output_dir: str = "saves/lorakit"
    """Where the adapter (or model), checkpoints, metrics and plots go."""
    overwrite_output_dir: bool = False
    """Allow an output_dir that holds another run (its checkpoints and metrics are replaced)."""
    logging_steps: int = 10
    """Write a line to metrics.jsonl every N optimizer steps."""
    save_strategy: str = "steps"
    """When to write checkpoints: steps (every save_steps), epoch, or no."""
    save_steps: int = 500
    """Write output_dir/checkpoint-STEP every N optimizer steps."""
    save_total_limit: int | None = None
    """Keep only the newest N checkpoints; empty keeps all."""
    plot_loss: bool = False
    """Save the loss curve as training_loss.png (and training_eval_loss.png)."""

    # --- training
    per_device_train_batch_size: int = 8
    """Examples (rows, when packing) per micro-batch."""
    per_device_eval_batch_size: int = 8
    """Examples per evaluation batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; the loss is averaged over all label tokens of the step."""
    learning_rate: float = 5e-5
    """Peak learning rate of AdamW."""
    num_train_epochs: float = 3.0
    """Passes over the training data (fractions allowed); max_steps wins when set."""
    max_steps: int = -1
    """Optimizer steps to run; -1 means num_train_epochs decides."""
    lr_scheduler_type: str = "linear"
    """Decay after warmup: linear, cosine, constant (constant_with_warmup is the same)."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming the learning rate up from 0."""
    warmup_steps: int = 0
    """Warmup steps; wins over warmup_ratio when above 0."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases, norms or DoRA magnitudes)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    optim: str = "adamw_torch"
    """Optimizer: adamw_torch (adamw_torch_fused and adamw_hf are accepted and mean the same), or 8-bit AdamW:
    adamw_8bit (= adamw_bnb_8bit) and paged_adamw_8bit, from bitsandbytes (or torchao for adamw_8bit)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this; 0 turns clipping off."""
    bf16: bool = False
    """bf16 autocast where the hardware runs it natively (CUDA, CPUs with AVX-512-BF16/AMX); else a warning and
    fp32."""
    fp16: bool = False
    """fp16 autocast with loss scaling, CUDA only (elsewhere a warning and fp32)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    seed: int = 42
    """Seed for initialisation, shuffling and dropout."""
    resume_from_checkpoint: str | bool | None = None
    """Continue a run: a checkpoint directory, or true for the newest checkpoint in output_dir."""

    # --- evaluation
    eval_strategy: str = "no"
    """When to evaluate on the validation split: no (only at the end, when there is one), steps, or epoch."""
    eval_steps: int | None = None
    """Evaluate every N optimizer steps (eval_strategy: steps); empty means logging_steps."""

    # --- several processes (NPROC_PER_NODE=N lorakit train ..., or torchrun -m lorakit train ...)
    ddp_timeout: int = 1800
    """Seconds a rank waits for the others at a collective before it gives up (and the run stops)."""
    ddp_backend: str | None = None
    """nccl or gloo; empty: nccl on CUDA, gloo on a CPU."""
    ddp_find_unused_parameters: bool | None = None
    """DDP: look for trainable parameters a step did not use (slower); empty means false."""
    fsdp: str | None = None
    """HF's FSDP words: full_shard (FSDP2, fully_shard per decoder layer), shard_grad_op (gathered weights kept
    until the backward), offload; empty: FSDP2 full shard for finetuning_type full, DDP otherwise."""
    fsdp_offload: bool = False
    """FSDP2: keep the shards and the optimizer state on the CPU."""
    deepspeed: str | None = None
    """LLaMA-Factory's DeepSpeed JSON (examples/deepspeed/ds_z3_config.json): read, not run; ZeRO stage 0-2 runs as
    DDP, stage 3 as FSDP2 full shard, CPU offload as FSDP2 CPU offload."""

    def __post_init__(self) -> None:
        problems, bad = _type_problems(self)
        # range checks see the default in place of a value of the wrong type, so they can all run
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        probe = types.SimpleNamespace(**{**vars(self), **{name: defaults[name] for name in bad}})
        problems += _value_problems(probe)
        if problems:
            raise ConfigError(problems)
        if self.finetuning_type == "qlora":  # a synonym: LoRA on a 4-bit base
            self.finetuning_type, self.quantization_bit = "lora", self.quantization_bit or 4
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank
        if self.packing is None or self.neat_packing:
            self.packing = self.neat_packing or self.stage == "pt"
        if self.eval_steps is None:
            self.eval_steps = self.logging_steps

    @property
    def lora_targets(self) -> str | list[str]:
        """lora_target as LoraConfig.target_modules: "all-linear" or a list of names."""
        return "all-linear" if self.lora_target.strip() == "all" else _split(self.lora_target)

    @property
    def additional_targets(self) -> list[str] | None:
        return _split(self.additional_target) or None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML that `lorakit train` reads back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _type_problems(config: TrainConfig) -> tuple[list[str], list[str]]:
    """(problems, names of the fields whose value has the wrong type)."""
    problems, bad = [], []
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(config, f.name)
        allowed = typing.get_args(hints[f.name]) or (hints[f.name],)
        if isinstance(value, bool) and bool not in allowed:
            ok = False  # True is an int to Python, but lora_rank: true is a mistake
        else:
            ok = any(isinstance(value, t) or (t is float and isinstance(value, int)) for t in allowed)
        if not ok:
            names = " or ".join("empty" if t is type(None) else t.__name__ for t in allowed)
            problems.append(f"{f.name} must be {names}, got {value!r}")
            bad.append(f.name)
    return problems, bad


def _value_problems(c) -> list[str]:
    """Range and consistency checks; every failing one is reported."""
    projected = "replay_null_space" if c.replay_null_space else "replay_task_directions" \
        if c.replay_task_directions else ""  # the key that confines LoRA A, if one does
    checks = [
        (c.stage in STAGES, f"stage must be one of {', '.join(STAGES)}, got {c.stage!r}"),
        (c.do_train, "do_train must be true: lorakit train trains (lorakit eval evaluates)"),
        (c.finetuning_type in FINETUNING_TYPES + ("qlora",),
         f"finetuning_type must be one of {', '.join(FINETUNING_TYPES)}, got {c.finetuning_type!r}"),
        (c.quantization_bit in (None, 4, 8), f"quantization_bit must be 4 or 8 (or empty), got {c.quantization_bit}"),
        (c.quantization_type in ("nf4", "fp4"), f"quantization_type must be nf4 or fp4, got {c.quantization_type!r}"),
        (c.quantization_method in QUANTIZATION_METHODS,
         f"quantization_method must be one of {', '.join(QUANTIZATION_METHODS)}, got {c.quantization_method!r}"),
        (c.compute_dtype is None or c.compute_dtype in COMPUTE_DTYPES,
         f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)} or empty, got {c.compute_dtype!r}"),
        (not (c.finetuning_type == "qlora" and c.quantization_bit == 8),
         "finetuning_type qlora means a 4-bit base; for 8 bits use finetuning_type: lora with quantization_bit: 8"),
        (c.quantization_bit is None or c.finetuning_type in ("lora", "qlora"),
         f"finetuning_type {c.finetuning_type} cannot train a quantized base (quantization_bit {c.quantization_bit}):"
         f" quantized weights are frozen; use finetuning_type: lora (QLoRA) or drop quantization_bit"),
        (not (c.pissa_init and (c.quantization_bit or c.finetuning_type == "qlora")),
         "pissa_init rewrites the base weights and cannot be combined with quantization_bit"),
        (c.lora_rank > 0, f"lora_rank must be positive, got {c.lora_rank}"),
        (c.lora_alpha is None or c.lora_alpha > 0, f"lora_alpha must be positive, got {c.lora_alpha}"),
        (0 <= c.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {c.lora_dropout}"),
        (c.pissa_iter >= -1, f"pissa_iter must be -1 or more, got {c.pissa_iter}"),
        (not (c.pissa_init and c.use_dora), "pissa_init cannot be combined with use_dora"),
        (c.loraplus_lr_ratio is None or c.loraplus_lr_ratio > 0,
         f"loraplus_lr_ratio must be positive, got {c.loraplus_lr_ratio}"),
        (bool(_split(c.lora_target)), "lora_target is empty"),
        (c.loraga_batches >= 1, f"loraga_batches must be at least 1, got {c.loraga_batches}"),
        (c.loraga_direction in LORA_GA_DIRECTIONS,
         f"loraga_direction must be one of {', '.join(LORA_GA_DIRECTIONS)}, got {c.loraga_direction!r}"),
        (c.loraga_scale in LORA_GA_SCALES,
         f"loraga_scale must be one of {', '.join(LORA_GA_SCALES)}, got {c.loraga_scale!r}"),
        (c.loraga_stable_gamma > 0, f"loraga_stable_gamma must be positive, got {c.loraga_stable_gamma}"),
        (c.loraga_stable_scale_on in ("AB", "B"),
         f"loraga_stable_scale_on must be AB or B, got {c.loraga_stable_scale_on!r}"),
        (c.adalora_init_r >= 1 and c.adalora_target_r >= 1 and c.adalora_deltaT >= 1,
         "adalora_init_r, adalora_target_r and adalora_deltaT must be at least 1"),
        (c.adalora_target_r <= c.adalora_init_r,
         f"adalora_target_r ({c.adalora_target_r}) must not exceed adalora_init_r ({c.adalora_init_r})"),
        (c.adalora_tinit >= 0 and c.adalora_tfinal >= 0, "adalora_tinit and adalora_tfinal must be 0 or more"),
        (0 < c.adalora_beta1 < 1 and 0 < c.adalora_beta2 < 1, "adalora_beta1 and adalora_beta2 must be in (0, 1)"),
        (c.adalora_orth_reg_weight >= 0, f"adalora_orth_reg_weight must be 0 or more, got {c.adalora_orth_reg_weight}"),
        (not (c.loraga_init and (c.pissa_init or c.use_dora or c.use_adalora)),
         "loraga_init cannot be combined with pissa_init, use_dora or use_adalora (each sets the starting point)"),
        (not (c.loraga_init and (c.quantization_bit or c.finetuning_type == "qlora")),
         "loraga_init rewrites the base weights and needs their full-precision gradients: not with quantization_bit"),
        (not (c.use_adalora and (c.pissa_init or c.use_dora or c.use_rslora)),
         "use_adalora cannot be combined with pissa_init, use_dora or use_rslora (AdaLoRA's scaling is "
         "lora_alpha / adalora_init_r)"),
        (c.freeze_trainable_layers != 0, "freeze_trainable_layers must not be 0"),
        (bool(_split(c.dataset)), "dataset is required: a registered name or a data file"),
        (c.cutoff_len >= 2, f"cutoff_len must be at least 2, got {c.cutoff_len}"),
        (c.max_samples is None or c.max_samples > 0, f"max_samples must be positive, got {c.max_samples}"),
        (0 <= c.replay_ratio < 1, f"replay_ratio must be in [0, 1), got {c.replay_ratio}"),
        (c.replay_ratio == 0 or c.replay_dataset or c.self_replay,
         f"replay_ratio {c.replay_ratio} needs something to replay: replay_dataset or self_replay: true"),
        (c.replay_ratio != 0 or not (c.replay_dataset or c.self_replay),
         "replay_dataset / self_replay are set but replay_ratio is 0; give the share of replay rows, e.g. 0.3"),
        (not (c.self_replay and c.stage == "pt"), "self_replay needs stage: sft (the base answers chat prompts)"),
        (c.self_replay_max_new_tokens >= 1,
         f"self_replay_max_new_tokens must be at least 1, got {c.self_replay_max_new_tokens}"),
        (0 <= c.replay_kl_weight <= 1, f"replay_kl_weight must be in [0, 1], got {c.replay_kl_weight}"),
        (c.replay_kl_weight == 0 or c.replay_ratio > 0,
         "replay_kl_weight is set but replay_ratio is 0: the KL term runs on replay rows; give replay_ratio"),
        (c.replay_kl_weight == 0 or c.finetuning_type in ("lora", "qlora"),
         f"replay_kl_weight needs finetuning_type lora or qlora (the base is the model with the adapter off), "
         f"not {c.finetuning_type}"),
        (c.replay_loss_weight > 0, f"replay_loss_weight must be above 0, got {c.replay_loss_weight}"),
        (c.replay_loss_weight == 1 or c.replay_kl_weight > 0,
         "replay_loss_weight needs replay_kl_weight above 0 (it weighs the replay tokens of the KL term's loss)"),
        (0 <= c.replay_null_space < 1, f"replay_null_space must be in [0, 1), got {c.replay_null_space}"),
        (isinstance(c.replay_task_directions, int) and c.replay_task_directions >= 0,
         f"replay_task_directions must be a whole number of directions >= 0, got {c.replay_task_directions}"),
        (not (c.replay_null_space and c.replay_task_directions),
         "replay_null_space and replay_task_directions are two ways to confine LoRA A; set one of them"),
        (not projected or c.replay_ratio > 0,
         f"{projected} is set but replay_ratio is 0: it is measured on the replay rows; give replay_ratio"),
        (not projected or c.finetuning_type in ("lora", "qlora"),
         f"{projected} needs finetuning_type lora or qlora, not {c.finetuning_type}"),
        (not projected or not (c.use_dora or c.use_adalora or c.pissa_init or c.loraga_init),
         f"{projected} cannot be combined with use_dora, use_adalora, pissa_init or loraga_init (it confines "
         "plain LoRA's B A x by the inputs of each layer; DoRA's magnitude and a start with B != 0 change them "
         "anyway)"),
        (not projected or not (c.packing or c.neat_packing or (c.packing is None and c.stage == "pt")),
         f"{projected} needs rows that are not packed (packing: false): it measures the examples one by one"),
        (c.val_size >= 0 and (c.val_size < 1 or float(c.val_size).is_integer()),
         f"val_size must be a fraction in [0, 1) or a whole number of examples, got {c.val_size}"),
        (bool(str(c.output_dir).strip()), "output_dir is empty"),
        (c.save_strategy in SAVE_STRATEGIES,
         f"save_strategy must be one of {', '.join(SAVE_STRATEGIES)}, got {c.save_strategy!r}"),
        (c.eval_strategy in EVAL_STRATEGIES,
         f"eval_strategy must be one of {', '.join(EVAL_STRATEGIES)}, got {c.eval_strategy!r}"),
        (c.eval_strategy == "no" or c.val_size > 0, f"eval_strategy {c.eval_strategy} needs val_size above 0"),
        (c.lr_scheduler_type in SCHEDULERS,
         f"lr_scheduler_type must be one of {', '.join(SCHEDULERS)}, got {c.lr_scheduler_type!r}"),
        (c.optim in OPTIMIZERS, f"optim must be one of {', '.join(OPTIMIZERS)}, got {c.optim!r}"),
        (c.learning_rate > 0, f"learning_rate must be positive, got {c.learning_rate}"),
        (c.max_steps > 0 or c.num_train_epochs > 0, "num_train_epochs must be positive (or set max_steps)"),
        (c.max_steps == -1 or c.max_steps > 0, f"max_steps must be positive or -1, got {c.max_steps}"),
        (0 <= c.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {c.warmup_ratio}"),
        (c.warmup_steps >= 0, f"warmup_steps must be 0 or more, got {c.warmup_steps}"),
        (c.weight_decay >= 0, f"weight_decay must be 0 or more, got {c.weight_decay}"),
        (0 <= c.adam_beta1 < 1 and 0 <= c.adam_beta2 < 1, "adam_beta1 and adam_beta2 must be in [0, 1)"),
        (c.adam_epsilon > 0, f"adam_epsilon must be positive, got {c.adam_epsilon}"),
        (c.max_grad_norm >= 0, f"max_grad_norm must be 0 (off) or more, got {c.max_grad_norm}"),
        (not (c.bf16 and c.fp16), "bf16 and fp16 are both true; choose one"),
        (c.ddp_timeout >= 1, f"ddp_timeout must be at least 1 second, got {c.ddp_timeout}"),
        (c.ddp_backend in (None, "nccl", "gloo"), f"ddp_backend must be nccl or gloo or empty, got {c.ddp_backend!r}"),
        (c.deepspeed is None or Path(c.deepspeed).is_file(), f"deepspeed: config file '{c.deepspeed}' not found"),
    ]
    problems = [message for ok, message in checks if not ok]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for prefix, switch in (("loraga_", "loraga_init"), ("adalora_", "use_adalora")):
        if not getattr(c, switch):  # options of a method that is off would change nothing
            problems += [f"{k} is set but {switch} is false; set {switch}: true or drop {k}"
                         for k in defaults if k.startswith(prefix) and k != switch and getattr(c, k) != defaults[k]]
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "logging_steps", "save_steps"):
        if getattr(c, name) < 1:
            problems.append(f"{name} must be at least 1, got {getattr(c, name)}")
    for name in ("save_total_limit", "eval_steps"):
        if getattr(c, name) is not None and getattr(c, name) < 1:
            problems.append(f"{name} must be at least 1 or empty, got {getattr(c, name)}")
    if c.finetuning_type not in ("lora", "qlora"):
        lora_only = {"loraplus_lr_ratio": c.loraplus_lr_ratio is not None, "use_rslora": c.use_rslora,
                     "use_dora": c.use_dora, "pissa_init": c.pissa_init, "additional_target": bool(c.additional_target),
                     "loraga_init": c.loraga_init, "use_adalora": c.use_adalora}
        problems += [f"{k} is only valid with finetuning_type: lora" for k, on in lora_only.items() if on]
    return problems
