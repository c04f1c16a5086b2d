"""A built-in chat template (lorakit.data.templates) written as the Jinja `chat_template` a tokenizer carries, so
that a model tuned with `template: llama3` (say) is exported with the format it learned, not its tokenizer's own.

The Jinja mirrors `BuiltinTemplate.segments`: prefix, the system text (the conversation's, else the default),
each turn through its role's format, the separator after a reply that has more turns after it, and the assistant
prefix when `add_generation_prompt`. Literal text goes in as Jinja string expressions, so no whitespace control
can eat a newline of the format.
"""

from __future__ import annotations

import json

from ..data import BuiltinTemplate


def _lit(text: str) -> str:
    return "{{ " + json.dumps(text) + " }}" if text else ""


def _around(fmt: str, expr: str) -> str:
    """`fmt` with its {content} replaced by the Jinja expression `expr`."""
    before, _, after = fmt.partition("{content}")
    return _lit(before) + "{{ " + expr + " }}" + _lit(after)


def builtin_chat_template(template: BuiltinTemplate) -> str:
    """The Jinja chat template that renders conversations exactly as `template` (bound to a tokenizer) does."""
    user_system = (
        "{% if ns.system and ns.in_user %}"
        "{% set content = ns.system + '\\n\\n' + m['content'] %}{% set ns.system = '' %}"
        "{% else %}{% set content = m['content'] %}{% endif %}"
    )
    parts = [
        "{% set ns = namespace(system=" + json.dumps(template.default_system) + ", in_user="
        + ("true" if template.system_in_user else "false") + ") %}",
        "{% set body = messages %}",
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set ns.system = messages[0]['content'] %}{% set body = messages[1:] %}{% endif %}",
        _lit(template.prefix),
        "{% if ns.system and not ns.in_user %}" + _around(template.system, "ns.system") + "{% endif %}",
        "{% for m in body %}",
        "{% if m['role'] == 'assistant' %}",
        _lit(template.assistant_start) + _around(template.assistant, "m['content']"),
        "{% if not loop.last %}" + _lit(template.separator) + "{% endif %}",
        "{% elif m['role'] == 'user' %}" + user_system + _around(template.user, "content"),
        "{% else %}" + _around(template.system, "m['content']"),
        "{% endif %}{% endfor %}",
        "{% if add_generation_prompt %}" + _lit(template.assistant_start) + "{% endif %}",
    ]
    return "".join(parts)
