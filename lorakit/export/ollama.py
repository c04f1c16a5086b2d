"""An Ollama `Modelfile` beside a GGUF: FROM (and ADAPTER), the chat TEMPLATE in Go-template form, the default
SYSTEM prompt and the stop strings, picked from the tokenizer's chat template."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChatFormat:
    """An Ollama TEMPLATE (Go template over .Messages), its stop strings, and how it spells a system turn."""

    template: str
    stops: tuple[str, ...]
    system_open: str
    system_close: str


CHAT_FORMATS = {
    "chatml": ChatFormat(
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ("<|im_start|>", "<|im_end|>"), "<|im_start|>system\n", "<|im_end|>"),
    "llama3": ChatFormat(
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
    "generic": ChatFormat("{{- range .Messages }}{{ .Role }}: {{ .Content }}\n{{ end }}assistant: ",
                          ("\nuser:",), "system: ", "\n"),
}


def chat_format_kind(chat_template: str | None) -> str:
    """"chatml", "llama3" or "generic", from the markers a Jinja chat template writes."""
    template = chat_template or ""
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    return "generic"


def _default_system(tokenizer, fmt: ChatFormat) -> str | None:
    """The system prompt a chat template inserts when the conversation has none (SmolLM2 does)."""
    marker = "\x00user\x00"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # a tokenizer without a usable template: no default to carry over
        return None
    head = text.split(marker)[0]
    found = re.search(re.escape(fmt.system_open) + "(.*?)" + re.escape(fmt.system_close), head, re.S)
    return found.group(1) if found else None


def write_modelfile(gguf_path: str | Path, chat: str | object, directory: str | Path | None = None,
                    adapter: str | Path | None = None, system: str | None = None) -> Path:
    """Write an Ollama `Modelfile` (FROM, optional ADAPTER, TEMPLATE, SYSTEM, stop parameters); returns its path.

    chat: "chatml", "llama3", "generic", or a tokenizer (its chat template picks the format, its default system
    prompt and eos token come along). directory defaults to the GGUF's folder; paths are written relative to it.
    """
    gguf_path = Path(gguf_path)
    directory = Path(directory) if directory is not None else gguf_path.parent
    kind = chat if isinstance(chat, str) else chat_format_kind(getattr(chat, "chat_template", None))
    if kind not in CHAT_FORMATS:
        raise ValueError(f"chat format '{kind}' is not one of {', '.join(CHAT_FORMATS)}")
    fmt = CHAT_FORMATS[kind]
    stops = list(fmt.stops)
    if not isinstance(chat, str):
        system = system if system is not None else _default_system(chat, fmt)
        eos = getattr(chat, "eos_token", None)
        stops += [eos] if eos and eos not in stops else []

    def relative(p: str | Path) -> str:
        rel = Path(os.path.relpath(Path(p).resolve(), directory.resolve())).as_posix()
        return rel if rel.startswith("..") else f"./{rel}"

    lines = [f"FROM {relative(gguf_path)}"]
    lines += [f"ADAPTER {relative(adapter)}"] if adapter is not None else []
    lines.append(f'TEMPLATE """{fmt.template}"""')
    lines += [f'SYSTEM """{system}"""'] if system else []
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "Modelfile"
    out.write_text("\n".join(lines) + "\n")
    return out
