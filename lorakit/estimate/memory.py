"""Peak memory of a `lorakit train` run, by part, following what the trainer does.

    peak = max(load, train)
    load  = process + 4 P                                  (lorakit loads every model in fp32 on the device, then
                                                            casts (bf16 base) or quantizes (QLoRA) it there)
    train = process + frozen weights + trained weights + gradients + optimizer state + activations + temporary

- frozen weights: the base as the trainer stores it: fp32; bf16 for LoRA-wrapped linears under bf16 autocast
  (`store_frozen_base`, not DoRA); 4-bit NF4/FP4 = 0.5 B + block scales (fp32 per 64: 0.0625 B; double
  quantization: int8 per 64 + fp32 per 256 blocks: 0.0159 B); int8 = 1 B + an fp32 scale per row. Embeddings,
  norms and the output head stay fp32. On a CPU a quantized model keeps the fp32 checkpoint's pages resident too
  (the embedding still points into the memory-mapped file, so the mapping and every page quantizing read stay).
- trained weights: LoRA A (r x in) and B (out x r) per target, fp32 (+ the magnitude row for DoRA, + full copies
  of `additional_target` modules); full / freeze: the parameters that train, fp32.
- gradients: 4 B per trained parameter. Optimizer: AdamW 8 B (two fp32 moments); 8-bit AdamW 2 B (tensors under
  4,096 values keep fp32 moments, as bitsandbytes does). For full / freeze the gradients grow while the backward
  frees the activations (they are set to None after each step), so only what exceeds activations + temporary
  adds to the peak; LoRA's gradients are too small to matter.
- activations: what autograd keeps for the backward of the largest micro-batch (or, on a CPU, piece of one): per
  token and decoder layer (a = 2 B under bf16 autocast, else 4; H hidden, I intermediate, q = heads x head_dim,
  kv = kv heads x head_dim, n heads)
      norms 2 (4H + 4)   attention (2q + 2kv) a + 4n   MLP 3 I a
      inputs kept for LoRA A: H a (q/k/v share one), H a (gate/up), I a (down), o_proj shares the attention output
      LoRA A outputs r a per target;  layers whose weights train: (2H + I) a + 2 x 4H (norm outputs) (+ 3H x 2 B
      under autocast);  a quantized base under autocast: an input copy per linear (sum of in_features) a and
      the MLP's three tensors in fp32 (3 I x 4; measured with bitsandbytes' layers)
  only for the layers the backward passes through (freeze: from the first trained layer on); with gradient
  checkpointing 4H per layer plus one layer recomputed. After the layers: the final norm and the head's
  gradient rows (4H per label token), and for a trained head its (V x H) fp32 gradient.
  On a CPU the process's resident memory grows by more than what autograd keeps: tensors freed during the forward
  and backward leave holes in glibc's heap that later steps do not fill; `CPU_HEAP_FACTOR` (measured) scales
  the kept activations to what RSS shows. With checkpointing, the backward recomputes each layer's activations
  and frees them again, one layer after the other, and the heap keeps about `CPU_RECOMPUTE_HEAP` of what the
  whole run would have kept without checkpointing (measured: two rows of bench/validate_estimate.py).
- temporary: the chunked head: one chunk of n = min(chunk rows, label tokens) rows of V logits: 8 n V bytes in
  fp32 (logits + softmax), 10 n V under bf16 (+ the head cast to bf16 once, 2 V H); a trained head adds its fp32
  product per chunk (4 V H). Or the backward of the first layer, (3 I a + 8 H) per token, whichever is larger.
- process: CPU: python + torch + transformers + lorakit (`CPU_PROCESS_BYTES`, measured), the tokenizer, and
  bitsandbytes where it is imported; CUDA: the context (`devices.CUDA_CONTEXT_BYTES`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..train.config import TrainConfig
from ..train.loss import default_chunk
from .devices import CUDA_CONTEXT_BYTES, Device
from .shape import ModelShape

MIB = 2**20
CPU_PROCESS_BYTES = 336 * MIB  # python + torch + transformers' Llama + lorakit.train imported (bench/validate_estimate)
TOKENIZER_BYTES = 47 * MIB  # a 49k BPE tokenizer loaded (measured the same way)
BNB_BYTES = 44 * MIB  # importing bitsandbytes (QLoRA's default backend, 8-bit AdamW)
CPU_HEAP_FACTOR = 1.7  # peak RSS of the activations / what autograd keeps; fitted in bench/validate_estimate.py
CPU_RECOMPUTE_HEAP = 0.5  # with checkpointing: RSS added by the backward's recomputes / what no checkpointing keeps
QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")
SMALL_STATE = 4096  # bitsandbytes keeps 32-bit moments for tensors with fewer values


@dataclass
class Workload:
    """The largest single forward + backward pass of the run: rows x width tokens, `labels` of them with loss."""

    rows: int
    width: int
    labels: int
    packed: bool

    @property
    def tokens(self) -> int:
        return self.rows * self.width


@dataclass
class Training:
    """What trains, as the trainer sets it up: LoRA targets (module name -> (in, out)) or trained parameters."""

    targets: dict
    """LoRA: module name -> (in_features, out_features); empty for full / freeze."""
    trained: dict
    """Parameter name -> numel of every trained parameter (LoRA: adapters and modules_to_save copies)."""
    trained_layers: set
    """Decoder layer indices whose own weights train (full / freeze)."""
    first_backward_layer: int
    """The first decoder layer the backward pass reaches (0 unless freeze leaves early layers out)."""
    trains_head: bool
    trains_norms: bool


def quantized_bytes(n: int, out_features: int, cfg: TrainConfig) -> float:
    """Bytes of a quantized (out x in) weight of n values (see the module docstring)."""
    if cfg.quantization_bit == 8:
        return n + 4 * out_features
    scales = 1 / 64 + 4 / (64 * 256) if cfg.double_quantization else 4 / 64
    return n * (0.5 + scales)


def weight_parts(shape: ModelShape, cfg: TrainConfig, run: Training, amp: bool, device: Device) -> dict[str, float]:
    """Frozen and trained weights by storage kind."""
    parts: dict[str, float] = {}
    qname = (f"{cfg.quantization_type}{'+dq' if cfg.double_quantization else ''}" if cfg.quantization_bit == 4
             else "int8")

    def add(key: str, value: float) -> None:
        parts[key] = parts.get(key, 0.0) + value

    for m in shape.linears:
        n = m.in_features * m.out_features
        if f"{m.name}.weight" in run.trained and not run.targets:
            add("trained weights", 4 * n)
        elif cfg.quantization_bit:
            add(f"frozen weights {qname}", quantized_bytes(n, m.out_features, cfg))
        elif amp and m.name in run.targets and not cfg.use_dora:
            add("frozen weights bf16", 2 * n)
        else:
            add("frozen weights fp32", 4 * n)
        if m.bias:
            add("frozen weights fp32", 4 * m.out_features)
    rest = shape.params - shape.linear_params  # embeddings, norms, an untied head
    trained_rest = sum(v for k, v in run.trained.items() if not run.targets and not _is_linear_weight(shape, k))
    add("frozen weights fp32", 4 * (rest - trained_rest))
    if run.targets:
        add("trained weights", 4 * sum(run.trained.values()))
    elif trained_rest:
        add("trained weights", 4 * trained_rest)
    if cfg.quantization_bit and device.kind == "cpu":
        add("checkpoint pages (CPU)", 4 * shape.params)
    return parts


def _is_linear_weight(shape: ModelShape, param: str) -> bool:
    return param.endswith(".weight") and param[:-7] in {m.name for m in shape.linears}


def state_parts(cfg: TrainConfig, run: Training) -> dict[str, float]:
    """Gradients and optimizer moments of the trained parameters."""
    grads = 4 * sum(run.trained.values())
    if cfg.optim in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
        moments = sum(2 * n if n >= SMALL_STATE else 8 * n for n in run.trained.values())
    else:
        moments = 8 * sum(run.trained.values())
    return {"gradients": grads, "optimizer": moments}


def layer_bytes_per_token(shape: ModelShape, cfg: TrainConfig, run: Training, layer: int, amp: bool,
                          packed_cpu: bool) -> float:
    """Bytes autograd keeps per token for one decoder layer (the module docstring's formula)."""
    a = 2 if amp else 4
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q_width, shape.kv_width
    norms = 2 * (4 * h + 4)
    attention = (2 * q + 2 * kv) * (4 if packed_cpu else a) + 4 * shape.n_heads + (2 * q if packed_cpu and amp else 0)
    mlp = 3 * i * a
    if layer in run.trained_layers:
        inputs = (2 * h + i) * a + (3 * h * 2 if amp else 0) + (2 * 4 * h if run.trains_norms else 0)
        return norms + attention + mlp + inputs
    mine = [(n, io) for n, io in run.targets.items() if _layer_index(n) == layer]
    if cfg.quantization_bit and amp:  # a 4/8-bit base under autocast keeps its own input copy per linear, fp32 MLP
        inputs = sum(m.in_features for m in shape.linears if m.layer == layer) * a
        return norms + attention + 3 * i * 4 + inputs + len(mine) * cfg.lora_rank * a
    short = {n.rsplit(".", 1)[-1] for n, _ in mine}
    inputs = (h * a if short & set(QKV) else 0) + (h * a if short & set(GATE_UP) else 0)
    inputs += i * a if "down_proj" in short else 0
    inputs += sum(io[0] * a for n, io in mine if n.rsplit(".", 1)[-1] not in (*QKV, *GATE_UP, "down_proj", "o_proj"))
    return norms + attention + mlp + inputs + len(mine) * cfg.lora_rank * a


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for before, here in zip(parts, parts[1:]):
        if before in ("layers", "h", "blocks", "layer", "block") and here.isdigit():
            return int(here)
    return None


def activation_bytes(shape: ModelShape, cfg: TrainConfig, run: Training, work: Workload, amp: bool,
                     device: Device, checkpointing: bool | None = None) -> float:
    """What autograd keeps for the backward of `work` (not scaled by the CPU heap factor); `checkpointing` None
    follows cfg.gradient_checkpointing."""
    packed_cpu = work.packed and device.kind == "cpu"
    layers = range(run.first_backward_layer, shape.n_layers)
    per_layer = [layer_bytes_per_token(shape, cfg, run, j, amp, packed_cpu) for j in layers]
    if not per_layer:
        return 0.0
    if cfg.gradient_checkpointing if checkpointing is None else checkpointing:
        kept = len(per_layer) * 4 * shape.hidden * work.tokens + max(per_layer) * work.tokens
    else:
        kept = sum(per_layer) * work.tokens
    head = (4 * shape.hidden + 4) * work.tokens + 4 * shape.hidden * work.labels
    if run.trains_head:
        head += 4 * shape.vocab * shape.hidden
    return kept + head


def temporary_bytes(shape: ModelShape, run: Training, work: Workload, amp: bool, bucket) -> float:
    """The larger of one chunk of the head's logits and the first layer's backward (module docstring)."""
    v, h = shape.vocab, shape.hidden
    n = min(default_chunk(v), max(work.labels, 1))
    n = bucket(n) if bucket else n
    head = (10 * n * v + 2 * v * h) if amp else 8 * n * v
    if run.trains_head:
        head += 4 * v * h
    a = 2 if amp else 4
    backward = (3 * shape.intermediate * a + 8 * h) * work.tokens
    return max(head, backward)


def process_bytes(cfg: TrainConfig, device: Device) -> float:
    if device.kind == "cuda":
        return CUDA_CONTEXT_BYTES
    bnb = bool(cfg.quantization_bit) or cfg.optim in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit")
    return CPU_PROCESS_BYTES + TOKENIZER_BYTES + (BNB_BYTES if bnb else 0)


def memory(shape: ModelShape, cfg: TrainConfig, run: Training, work: Workload, amp: bool, device: Device,
           bucket=None) -> tuple[dict[str, float], float]:
    """(parts of the training peak in bytes, the loading peak in bytes)."""
    parts = {"process": process_bytes(cfg, device)}
    parts.update(weight_parts(shape, cfg, run, amp, device))
    parts.update(state_parts(cfg, run))
    if amp and not run.targets:  # full / freeze under autocast: bf16 copies of the trained linears, kept for backward
        parts["autocast weight copies"] = 2 * sum(m.in_features * m.out_features for m in shape.linears
                                                  if f"{m.name}.weight" in run.trained)
    kept = activation_bytes(shape, cfg, run, work, amp, device)
    parts["activations"] = kept * (CPU_HEAP_FACTOR if device.kind == "cpu" else 1.0)
    if device.kind == "cpu" and cfg.gradient_checkpointing:  # the layers recomputed one by one in the backward
        parts["activations"] += CPU_RECOMPUTE_HEAP * activation_bytes(shape, cfg, run, work, amp, device, False)
    parts["temporary"] = temporary_bytes(shape, run, work, amp, bucket)
    if not run.targets:  # full / freeze: the gradients fill what the backward frees (set to None after each step)
        parts["gradients"] = max(0.0, parts["gradients"] - parts["activations"] - parts["temporary"])
    load = parts["process"] + 4 * shape.params
    if amp and run.targets and not cfg.quantization_bit and device.kind == "cpu":
        load += 2 * sum(io[0] * io[1] for io in run.targets.values())  # bf16 copies made while the fp32 pages stay
    return parts, load
