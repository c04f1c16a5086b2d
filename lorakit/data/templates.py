"""Chat templates: a conversation to text pieces, each marked as an assistant reply (a label) or not.

Two kinds share one interface (`segments`, `prompt`, `prompt_ids`, `stop_words`); `prompt_ids` is
`encode.prompt_ids`, so chat, eval and training tokenise a conversation in the same pieces:

- `TokenizerTemplate`, the default: the tokenizer's own Jinja chat template. The reply pieces are found by
  prefix rendering: the text of turns [0, i) with the generation prompt is a prefix of the text of turns [0, i],
  and what lies between is reply i with its end-of-turn marker. A template that re-renders earlier turns
  differently once later turns exist (e.g. one that drops past reasoning) breaks this and is reported.
- `BuiltinTemplate`, selected by name (`chatml`, `qwen`, `llama3`, `mistral`, `alpaca`, `empty`): format strings
  per role, so the pieces are known by construction.

`segments(messages)` returns `[(text, is_reply), ...]` whose concatenation is the whole rendered conversation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .formats import DataError

Segments = list[tuple[str, bool]]


@dataclass(frozen=True)
class BuiltinTemplate:
    """A chat format given by one format string per role; `{content}` is the message text, `{bos}`/`{eos}` the
    tokenizer's tokens (filled in by `get_template`).

    A conversation renders as: prefix, system (if any), then each turn; an assistant turn is `assistant_start`
    (the generation prompt, not a label) followed by `assistant` (the reply and its end-of-turn marker, a label);
    `separator` (not a label) follows a reply that has more turns after it.
    """

    name: str
    user: str
    assistant: str
    assistant_start: str = ""
    system: str = "{content}"
    prefix: str = ""
    separator: str = ""
    default_system: str = ""
    system_in_user: bool = False
    """Mistral-style: no system role; the system text opens the first user turn."""
    stop: tuple[str, ...] = ()
    """Strings that end a reply when generating (end-of-turn tokens)."""
    tokenizer: object = field(default=None, repr=False, compare=False)

    def segments(self, messages: list[dict], add_generation_prompt: bool = False) -> Segments:
        """The conversation as (text, is_reply) pieces; consecutive prompt pieces are merged."""
        out: Segments = []
        prompt = self.prefix
        system = next((m["content"] for m in messages[:1] if m["role"] == "system"), self.default_system)
        body = messages[1:] if messages and messages[0]["role"] == "system" else messages
        if system and not self.system_in_user:
            prompt += self.system.replace("{content}", system)
        for i, m in enumerate(body):
            content = m["content"]
            if m["role"] == "assistant":
                out += [(prompt + self.assistant_start, False), (self.assistant.replace("{content}", content), True)]
                prompt = self.separator if i + 1 < len(body) else ""
                continue
            if m["role"] == "user" and system and self.system_in_user:
                content, system = f"{system}\n\n{content}", ""
            fmt = self.user if m["role"] == "user" else self.system
            prompt += fmt.replace("{content}", content)
        if add_generation_prompt:
            prompt += self.assistant_start
        if prompt:
            out.append((prompt, False))
        return [(text, is_reply) for text, is_reply in out if text or is_reply]

    def prompt(self, messages: list[dict]) -> str:
        """The conversation followed by the generation prompt (for chat and evaluation)."""
        return "".join(text for text, _ in self.segments(messages, add_generation_prompt=True))

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The ids before the next reply: `encode.prompt_ids`, the one place a prompt becomes ids."""
        from .encode import prompt_ids  # encode builds on this module

        return prompt_ids(self, messages)

    @property
    def stop_words(self) -> list[str]:
        return list(self.stop)


class TokenizerTemplate:
    """The tokenizer's own chat template (`tokenizer.apply_chat_template`), split into pieces by prefix rendering."""

    name = "default"

    def __init__(self, tokenizer) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"the tokenizer has no chat template; set template: to one of {', '.join(TEMPLATES)}")
        self.tokenizer = tokenizer

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def segments(self, messages: list[dict], add_generation_prompt: bool = False) -> Segments:
        """The conversation as (text, is_reply) pieces: reply i is render(turns[:i+1]) minus render(turns[:i], gen)."""
        out: Segments = []
        done = ""  # text rendered so far; each later rendering must extend it
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[:i + 1])
            if not before.startswith(done) or not upto.startswith(before):
                raise DataError(f"the tokenizer's chat template is not prefix-stable at turn {i} (it rewrites "
                                f"earlier turns), so replies cannot be masked exactly; use a built-in template: "
                                f"{', '.join(TEMPLATES)}")
            out += [(before[len(done):], False), (upto[len(before):], True)]
            done = upto
        if add_generation_prompt or not messages or messages[-1]["role"] != "assistant":  # else: all rendered
            full = self.render(messages, add_generation_prompt)
            if not full.startswith(done):
                raise DataError("the tokenizer's chat template renders the whole conversation differently from its "
                                f"turns; use a built-in template: {', '.join(TEMPLATES)}")
            out.append((full[len(done):], False))
        return [(text, is_reply) for text, is_reply in out if text or is_reply]

    def prompt(self, messages: list[dict]) -> str:
        return self.render(messages, add_generation_prompt=True)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The ids before the next reply: `encode.prompt_ids`, the one place a prompt becomes ids."""
        from .encode import prompt_ids  # encode builds on this module

        return prompt_ids(self, messages)

    @property
    def stop_words(self) -> list[str]:
        eos = getattr(self.tokenizer, "eos_token", None)
        return [eos] if eos else []


_CHATML = BuiltinTemplate(
    name="chatml",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_start="<|im_start|>assistant\n",
    assistant="{content}<|im_end|>\n",
    stop=("<|im_end|>",),
)

TEMPLATES: dict[str, BuiltinTemplate] = {
    "chatml": _CHATML,
    "qwen": replace(_CHATML, name="qwen",
                    default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    # LLaMA-Factory's name for Qwen3 without thinking: ChatML with no default system prompt
    "qwen3_nothink": replace(_CHATML, name="qwen3_nothink"),
    "llama3": BuiltinTemplate(
        name="llama3",
        prefix="{bos}",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_start="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant="{content}<|eot_id|>",
        stop=("<|eot_id|>",),
    ),
    "mistral": BuiltinTemplate(
        name="mistral", prefix="{bos}", user="[INST] {content} [/INST]", assistant="{content}{eos}",
        system_in_user=True, stop=("{eos}",),
    ),
    "alpaca": BuiltinTemplate(
        name="alpaca",
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n",
        assistant_start="### Response:\n",
        assistant="{content}{eos}",
        separator="\n\n",
        default_system="Below is an instruction that describes a task. "
                       "Write a response that appropriately completes the request.",
        stop=("{eos}",),
    ),
    "empty": BuiltinTemplate(name="empty", user="{content}", assistant="{content}{eos}", stop=("{eos}",)),
}
DEFAULT_NAMES = ("default", "")


def check_template(name: str | None) -> str | None:
    """The built-in name, or None for the tokenizer's own; an unknown name raises (no tokenizer needed, so the
    trainer can check the config before loading anything)."""
    if name is None or name in DEFAULT_NAMES:
        return None
    if name not in TEMPLATES:
        raise DataError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}, or leave template empty to use "
                        "the tokenizer's own chat template")
    return name


def get_template(name: str | None, tokenizer) -> BuiltinTemplate | TokenizerTemplate:
    """The named built-in template bound to `tokenizer`, or the tokenizer's own for None / "default"."""
    if check_template(name) is None:
        return TokenizerTemplate(tokenizer)
    template = TEMPLATES[name]
    fields = ("prefix", "system", "user", "assistant_start", "assistant", "separator")
    specials = {"{bos}": getattr(tokenizer, "bos_token", None), "{eos}": getattr(tokenizer, "eos_token", None)}
    values = {f: getattr(template, f) for f in fields}
    stop = list(template.stop)
    for key, token in specials.items():
        uses = any(key in v for v in values.values()) or any(key in s for s in stop)
        if uses and key == "{eos}" and not token:
            raise DataError(f"template {name!r} needs an eos token, and the tokenizer has none")
        values = {f: v.replace(key, token or "") for f, v in values.items()}
        stop = [s.replace(key, token or "") for s in stop]
    return replace(template, **values, stop=tuple(s for s in stop if s), tokenizer=tokenizer)
