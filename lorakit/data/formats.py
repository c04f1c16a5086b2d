"""Record formats: one raw record (alpaca, sharegpt, OpenAI messages, plain text) to a normalised record.

A normalised SFT record is `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`, a
pre-training (`stage: pt`) record is `{"text": str}`; both also carry `source` (file and line or index, for error
messages) and keep the fields their format does not use under their own names (evaluation reads an `answer` key).

Column and tag names mean what they mean in LLaMA-Factory's `dataset_info.json`:
alpaca reads `prompt` (instruction), `query` (input, joined to the instruction with a newline), `response`
(output), `system` and `history` (a list of [user, assistant] pairs); sharegpt reads the `messages` column, a list
of turns whose `role_tag`/`content_tag` keys hold a role (`user_tag`, `assistant_tag`, `system_tag`,
`function_tag`, `observation_tag`) and the text. Function calls count as assistant turns and observations (tool
results) as user turns, since the normalised form has only three roles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


class DataError(ValueError):
    """Bad input data: the message is one line that names the file, the record and what is wrong."""


ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                  "history": "history"}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
PT_COLUMNS = {"prompt": "text"}
FORMATTINGS = ("alpaca", "sharegpt")

# When tags are not registered, a turn may use either naming (sharegpt's from/value or OpenAI's role/content).
_AUTO_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
               "system": "system", "function_call": "assistant", "observation": "user", "tool": "user",
               "function": "user"}


@dataclass(frozen=True)
class RecordFormat:
    """How to read the records of one data set: a formatting, its columns and (sharegpt) its tags.

    `strict_tags` is True when the tags came from a registry entry: then only those role names are accepted, as in
    LLaMA-Factory. Otherwise both sharegpt (`from`/`value`, human/gpt) and OpenAI (`role`/`content`, user/assistant)
    turns are accepted.
    """

    formatting: str
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    strict_tags: bool = False


def registered_format(entry: dict, stage: str, where: str) -> RecordFormat:
    """The format a `dataset_info.json` entry declares, with LLaMA-Factory's defaults for what it leaves out."""
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise DataError(f"{where}: formatting {formatting!r} is not one of {', '.join(FORMATTINGS)}")
    given = {k: v for k, v in (entry.get("columns") or {}).items() if v}
    if stage == "pt":
        return RecordFormat("text", {**PT_COLUMNS, **given})
    if formatting == "alpaca":
        return RecordFormat("alpaca", {**ALPACA_COLUMNS, **given})
    tags = entry.get("tags")
    return RecordFormat("sharegpt", {**SHAREGPT_COLUMNS, **given}, {**SHAREGPT_TAGS, **(tags or {})},
                        strict_tags=tags is not None)


def detect_format(record: dict, stage: str, where: str) -> RecordFormat:
    """Guess the format of a file from its first record (the keys LLaMA-Factory's formats use)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if stage == "pt":
        if "text" in record:
            return RecordFormat("text", dict(PT_COLUMNS))
        raise DataError(f"{where}: stage pt needs a 'text' field; the record has {_keys(record)}")
    for key in ("messages", "conversations"):
        if isinstance(record.get(key), list):
            return RecordFormat("sharegpt", {**SHAREGPT_COLUMNS, "messages": key}, dict(SHAREGPT_TAGS))
    if "instruction" in record or "output" in record:
        return RecordFormat("alpaca", dict(ALPACA_COLUMNS))
    if "text" in record:
        raise DataError(f"{where}: the record has only 'text' (pre-training data); use stage: pt, or give "
                        "instruction/output or messages for sft")
    raise DataError(f"{where}: cannot tell the format: expected instruction/output (alpaca), conversations or "
                    f"messages (sharegpt/OpenAI) or text (pt); the record has {_keys(record)}")


def normalize(record: dict, fmt: RecordFormat, where: str) -> dict:
    """One raw record to `{"messages": [...]}` (or `{"text": ...}`), plus `source` and the unused fields."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if fmt.formatting == "text":
        text = _field(record, fmt.columns["prompt"], where, "text")
        out, used = {"text": text}, {fmt.columns["prompt"]}
    elif fmt.formatting == "alpaca":
        out, used = {"messages": _alpaca(record, fmt.columns, where)}, set(fmt.columns.values())
    else:
        out, used = {"messages": _sharegpt(record, fmt, where)}, set(fmt.columns.values())
    extras = {k: v for k, v in record.items() if k not in used and k not in ("messages", "text", "source")}
    return {**out, **extras, "source": where}


def _alpaca(record: dict, columns: dict, where: str) -> list[dict]:
    prompt_key, query_key, response_key = columns["prompt"], columns["query"], columns["response"]
    if prompt_key not in record and query_key not in record:
        raise DataError(f"{where}: alpaca record lacks {prompt_key!r}; it has {_keys(record)}")
    if response_key not in record:
        raise DataError(f"{where}: alpaca record lacks {response_key!r}; it has {_keys(record)}")
    parts = [_optional_str(record, prompt_key, where), _optional_str(record, query_key, where)]
    messages = []
    system = _optional_str(record, columns["system"], where)
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get(columns["history"]) or []
    if not isinstance(history, list):
        raise DataError(f"{where}: {columns['history']!r} must be a list of [user, assistant] pairs")
    for turn in history:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise DataError(f"{where}: each {columns['history']!r} item must be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages.append({"role": "user", "content": "\n".join(p for p in parts if p)})
    messages.append({"role": "assistant", "content": _field(record, response_key, where, "response")})
    return messages


def _sharegpt(record: dict, fmt: RecordFormat, where: str) -> list[dict]:
    key = fmt.columns["messages"]
    turns = record.get(key)
    if not isinstance(turns, list):
        what = "lacks" if turns is None else "has a non-list"
        raise DataError(f"{where}: sharegpt record {what} {key!r}; it has {_keys(record)}")
    messages = []
    system = _optional_str(record, fmt.columns.get("system", ""), where)
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        role, content = _turn(turn, fmt, f"{where} {key}[{i}]")
        if role == "system" and messages:
            problem = "given twice (system column and first turn)" if i == 0 else "allowed only as the first turn"
            raise DataError(f"{where} {key}[{i}]: a system turn is {problem}")
        messages.append({"role": role, "content": content})
    return check_turns(messages, where)


def _turn(turn: dict, fmt: RecordFormat, where: str) -> tuple[str, str]:
    """(role, content) of one sharegpt/OpenAI turn."""
    if not isinstance(turn, dict):
        raise DataError(f"{where}: a turn must be an object, got {type(turn).__name__}")
    tags = fmt.tags
    if fmt.strict_tags:
        roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system",
                 tags["function_tag"]: "assistant", tags["observation_tag"]: "user"}
        role_key, content_key = tags["role_tag"], tags["content_tag"]
    else:
        roles = _AUTO_ROLES
        role_key, content_key = ("from", "value") if "from" in turn else ("role", "content")
    if role_key not in turn:
        raise DataError(f"{where}: turn lacks {role_key!r}; it has {_keys(turn)}")
    raw_role = turn[role_key]
    if raw_role not in roles:
        raise DataError(f"{where}: unknown role {raw_role!r} (known: {', '.join(map(repr, roles))})")
    content = turn.get(content_key)
    if content is None and turn.get("tool_calls"):  # OpenAI assistant turn that only calls tools
        content = json.dumps(turn["tool_calls"], ensure_ascii=False)
    if not isinstance(content, str):
        what = "lacks" if content is None else "has a non-string"
        raise DataError(f"{where}: turn {what} {content_key!r}")
    return roles[raw_role], content


def check_turns(messages: list[dict], where: str) -> list[dict]:
    """A conversation must start (after the system prompt) with a user turn and contain an assistant reply.

    Turns after the last assistant reply teach nothing and are dropped.
    """
    body = [m for m in messages if m["role"] != "system"]
    if not body or body[0]["role"] != "user":
        raise DataError(f"{where}: a conversation must start with a user turn (after an optional system turn)")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"{where}: the conversation has no assistant turn to learn from")
    return messages[:last + 1]


def _field(record: dict, key: str, where: str, what: str) -> str:
    if key not in record:
        raise DataError(f"{where}: record lacks {key!r} ({what}); it has {_keys(record)}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _optional_str(record: dict, key: str, where: str) -> str:
    value = record.get(key) if key else None
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _keys(record: dict) -> str:
    keys = list(record)[:12]
    return "{" + ", ".join(map(repr, keys)) + (", ..." if len(record) > 12 else "") + "}"
