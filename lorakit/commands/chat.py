"""`lorakit chat`: talk to a base model with zero or more adapters, in the terminal or from a script.

    lorakit chat --adapter saves/kb                          # interactive; the adapter knows its base
    lorakit chat --adapter saves/kb --prompt "Question?"     # answer once, print, exit
    printf 'Q1\\nQ2\\n' | lorakit chat --adapter saves/kb      # stdin not a terminal: each line is a turn
    lorakit chat examples/inference/llama3_lora_sft.yaml temperature=0

Everything is checked (keys, adapter directories, base model, template) before the model loads.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

from ..dtypes import DTYPE_NAMES, canonical_name
from .arguments import ConfigError, run_command, say

USAGE = """usage: lorakit chat [CONFIG.yaml] [KEY=VALUE ...] [--adapter DIR | --adapter NAME=DIR ...] [--model M]
                    [--temperature T] [--top_p P] [--top_k K] [--max_new_tokens N] [--repetition_penalty R]
                    [--prompt TEXT] [--system TEXT]

Chat with a base model plus zero or more adapters. Replies stream as they are generated and stop at the
template's end-of-turn token; Ctrl-C stops the current reply, Ctrl-D or /exit leaves.
In the chat: /reset, /system TEXT, /adapter NAME (or __base__), /help, /exit.
--prompt TEXT answers once and exits. When stdin is not a terminal, each line read is one user turn of a
single conversation (slash commands work; history=false answers every line on its own); the replies go to stdout,
exactly one line per line read (a newline inside a reply is written as \\n, a backslash as \\\\), and loading
messages to stderr.

examples:
  lorakit chat --adapter saves/kb
  lorakit chat --adapter kb=saves/kb --adapter style=saves/style --temperature 0
  lorakit chat infer.yaml adapter_name_or_path=saves/kb --prompt "What is the VPN address?"

"""

FLAGS = {"--adapter": "adapter_name_or_path", "--adapters": "adapter_name_or_path", "--model": "model_name_or_path",
         "--dtype": "infer_dtype"}
ALIASES = {k.removeprefix("--"): v for k, v in FLAGS.items()}
DTYPES = ("auto", *DTYPE_NAMES)
FINETUNING_TYPES = ("lora", "qlora", "full", "freeze")


def model_problems(args, verb: str) -> list[str]:
    """The problems of the settings `chat` and `serve` share (backend, finetuning type, dtype, template); `verb`:
    what the command does with the model ("runs", "serves")."""
    from ..data import DataError, check_template

    problems = []
    if args.infer_backend != "huggingface":
        problems.append(f"infer_backend '{args.infer_backend}' is not supported: lorakit runs models with "
                        f"huggingface (transformers) only")
    if args.finetuning_type not in FINETUNING_TYPES:
        problems.append(f"finetuning_type must be one of {', '.join(FINETUNING_TYPES)}, got '{args.finetuning_type}'")
    elif args.finetuning_type in ("full", "freeze") and args.adapter_name_or_path:
        problems.append(f"finetuning_type {args.finetuning_type} {verb} model_name_or_path as it is; "
                        f"adapter_name_or_path needs finetuning_type lora")
    if args.infer_dtype not in DTYPES:
        problems.append(f"infer_dtype must be one of {', '.join(DTYPES)}, got '{args.infer_dtype}'")
    try:
        check_template(args.template)
    except DataError as exc:
        problems.append(f"template: {exc}")
    return problems


@dataclass
class ChatArgs:
    """Settings of `lorakit chat` (LLaMA-Factory's inference keys where they exist)."""

    UNSUPPORTED: ClassVar[dict] = {
        "quantization_bit": (None, "quantized inference is not supported by lorakit chat; drop quantization_bit"),
        "vllm_enforce_eager": (False, "vLLM is not supported; infer_backend must be huggingface"),
    }

    model_name_or_path: str | None = None
    """Base model: a local HF directory, a GGUF file, a hub id in the local cache. Empty: the adapters' base
    (adapter_config.json / training_args.yaml), else the default SmolLM2-135M-Instruct."""
    adapter_name_or_path: str | None = None
    """Adapter directories: a comma list of DIR or NAME=DIR (--adapter, repeatable). The first is active."""
    template: str | None = None
    """Chat template: empty uses the adapter's training_args.yaml template, else the tokenizer's own; or a
    built-in name (chatml, qwen, qwen3_nothink, llama3, mistral, alpaca, empty)."""
    finetuning_type: str = "lora"
    """lora (or qlora: the adapter runs on the unquantized base); full / freeze: model_name_or_path is the
    trained model itself and no adapter is given."""
    infer_backend: str = "huggingface"
    """Only huggingface (transformers) is supported."""
    infer_dtype: str = "float32"
    """Weights dtype: float32, bfloat16, float16, or auto (the checkpoint's own)."""
    device: str | None = None
    """cpu, cuda, cuda:1, ...; empty picks CUDA when present."""
    temperature: float = 0.7
    """Sampling temperature; 0 is greedy (deterministic)."""
    top_p: float = 0.9
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: no limit)."""
    max_new_tokens: int = 512
    """Upper bound on the tokens of one reply."""
    repetition_penalty: float = 1.0
    """> 1 discourages repeating tokens already in the conversation."""
    seed: int | None = None
    """Seed for sampling, for reproducible replies."""
    prompt: str | None = None
    """Answer this one message, print the reply and exit."""
    system: str | None = None
    """System prompt (else the template's default, if it has one)."""
    active_adapter: str | None = None
    """Adapter that answers first (a name, or __base__ for none); default the first adapter."""
    history: bool = True
    """Keep earlier turns in the conversation; false answers every message on its own."""

    def __post_init__(self) -> None:
        problems = model_problems(self, "runs")
        try:
            self.sampling()
        except ValueError as exc:
            problems += str(exc).split("; ")
        if problems:
            raise ConfigError(problems)

    def sampling(self):
        from ..generation import Sampling

        return Sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                        top_k=self.top_k, repetition_penalty=self.repetition_penalty, seed=self.seed)


def load_for_inference(job: str, adapters: str | None, model_name_or_path: str | None, template: str | None,
                       dtype: str = "float32", device: str | None = None):
    """(model with adapters, tokenizer, bound template, stop ids, plan): adapter directories, base model and
    template are checked before the weights load."""
    from ..adapters import load_adapters, plan_adapters
    from ..chat import stop_token_ids
    from ..data import get_template
    from ..models import load_model, resolve_model

    plan = plan_adapters(adapters, model_name_or_path, template)
    path = resolve_model(plan.base)
    shown = f" with adapter(s) {', '.join(plan.names)}" if plan.names else ""
    say(job, f"loading {plan.base or 'the default model'} ({path}){shown}")
    model, tokenizer, _ = load_model(plan.base, dtype=dtype, device=device)
    bound = get_template(plan.template, tokenizer)
    model = load_adapters(model, plan.pairs)
    return model, tokenizer, bound, stop_token_ids(tokenizer, model, bound.stop_words), plan


def run_chat(argv: list[str]) -> int:
    """`lorakit chat`: exit status 0 done, 1 bad input (files, model), 2 bad settings, 130 interrupted."""
    return run_command("chat", argv, ChatArgs, USAGE, FLAGS, ALIASES, lambda args: converse(open_session(args), args))


def open_session(args: ChatArgs):
    from ..chat import ChatSession

    dtype = canonical_name(args.infer_dtype)
    model, tokenizer, template, stop_ids, plan = load_for_inference(
        "chat", args.adapter_name_or_path, args.model_name_or_path, args.template, dtype, args.device)
    active = args.active_adapter
    if active is not None and active != "__base__" and active not in plan.names:
        raise ValueError(f"active_adapter '{active}' is not one of the loaded adapters: "
                         f"{', '.join(plan.names + ['__base__'])}")
    return ChatSession(model, tokenizer, args.sampling(), render=template.prompt_ids, system=args.system,
                       adapter=active, stop_ids=stop_ids, keep_history=args.history)


def converse(session, args: ChatArgs) -> int:
    from ..chat import run_repl

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if args.prompt is not None:
        session.answer(args.prompt, write)
        write("\n")
        return 0
    if sys.stdin.isatty():
        run_repl(session, interactive=True)
    else:
        reply_lines(session, sys.stdin, sys.stdout)
    return 0


def one_line(text: str) -> str:
    """A reply on one line: a backslash becomes \\\\, a newline \\n, a carriage return \\r (reversible)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def reply_lines(session, lines, out) -> None:
    """stdin not a terminal: each non-blank line is one user turn (or a /command), and each gets exactly one line
    on `out` (a reply, or a command's note; /exit ends without one), newlines inside escaped by `one_line`, so
    a script can pair its questions with the answers."""

    def write(piece: str) -> None:
        out.write(one_line(piece))
        out.flush()

    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line.startswith("/"):
            text, keep_going = session.command(line)
            if not keep_going:
                break
            write(text)
        else:
            session.answer(line, write)
        out.write("\n")
        out.flush()
