"""Terminal chat with a base model plus zero or more adapters: streaming, multi-turn, slash commands."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

from .adapters import use_adapter
from .data import get_template
from .generation import Sampling, TextStream, generate
from .lora import LoraModel
from .lora.mixed import BASE

HELP = """commands:
  /reset          forget the conversation
  /system TEXT    set the system prompt (and reset)
  /adapter NAME   switch adapter ({names})
  /help           this text
  /exit           leave (also Ctrl-D); Ctrl-C stops the current answer"""


def stop_token_ids(tokenizer, model, stop_words: list[str] | tuple[str, ...] = ()) -> set[int]:
    """eos of the tokenizer and of the generation config, the usual end-of-turn tokens that exist, and the
    template's stop words that are single tokens (e.g. a built-in template's `<|eot_id|>`)."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    vocab = tokenizer.get_vocab()
    ends = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", *stop_words)
    ids.update(vocab[t] for t in ends if t in vocab)
    return {i for i in ids if i is not None}


class ChatSession:
    """One conversation; `render(messages) -> ids` turns it into the prompt (default: the tokenizer's own template
    through `data.encode.prompt_ids`, the pieces training tokenises)."""

    def __init__(self, model, tokenizer, sampling: Sampling, render: Callable[[list[dict]], list[int]] | None = None,
                 system: str | None = None, adapter: str | None = None, stop_ids: set[int] | None = None,
                 keep_history: bool = True) -> None:
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.render = render or get_template(None, tokenizer).prompt_ids
        self.system = system
        self.history: list[dict] = []
        self.keep_history = keep_history
        self.stop_ids = stop_ids or stop_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids)
        self.adapters = list(model.peft_config) if isinstance(model, LoraModel) else []
        self.adapter = adapter or (self.adapters[0] if self.adapters else BASE)

    def messages(self) -> list[dict]:
        prefix = [{"role": "system", "content": self.system}] if self.system else []
        return prefix + self.history

    def command(self, line: str) -> tuple[str, bool]:
        """Handle a /command; returns (text to show, keep going)."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("exit", "quit"):
            return "", False
        if name == "reset":
            self.history.clear()
            return "(conversation cleared)", True
        if name == "system":
            self.system = arg or None
            self.history.clear()
            return f"(system prompt {'set' if arg else 'cleared'}; conversation cleared)", True
        if name == "adapter":
            return self.switch(arg), True
        if name == "help":
            return HELP.format(names=", ".join(self.adapters + [BASE])), True
        return f"unknown command /{name}; /help lists the commands", True

    def switch(self, name: str) -> str:
        if name != BASE and name not in self.adapters:
            return f"unknown adapter {name!r}; loaded: {', '.join(self.adapters + [BASE])}"
        self.adapter = name
        return f"(adapter: {name})"

    def answer(self, text: str, write: Callable[[str], None]) -> str:
        """Generate the reply to `text`, streaming it through `write`; Ctrl-C keeps the part already written."""
        self.history.append({"role": "user", "content": text})
        stream = TextStream(self.tokenizer)
        try:
            with use_adapter(self.model, self.adapter if self.adapters else None):
                ids = generate(self.model, [self.render(self.messages())], self.sampling, self.stop_ids, self.pad_id,
                               on_token=lambda _, t: write(stream.push(t)))[0]
            write(stream.flush())
            reply = self.tokenizer.decode(ids, skip_special_tokens=True)
        except KeyboardInterrupt:
            reply = self.tokenizer.decode(stream.ids, skip_special_tokens=True)
            write(stream.flush() + " [stopped]")
        self.history.append({"role": "assistant", "content": reply.strip()})
        if not self.keep_history:
            self.history.clear()
        return reply


def run_repl(session: ChatSession, lines: Iterable[str] | None = None, interactive: bool = True) -> None:
    """Read user turns from the terminal (or `lines`), answer each, stream the reply to stdout."""
    out = sys.stdout

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    if interactive:
        write(f"lorakit chat — adapter: {session.adapter}. /help for commands.\n")
    source = iter(lines) if lines is not None else None
    while True:
        try:
            line = (input("\n>>> ") if source is None else next(source)).strip()
        except (EOFError, StopIteration):
            break
        except KeyboardInterrupt:
            write("\n")
            continue
        if not line:
            continue
        if line.startswith("/"):
            text, keep_going = session.command(line)
            if text:
                write(text + "\n")
            if not keep_going:
                break
            continue
        session.answer(line, write)
        write("\n")
