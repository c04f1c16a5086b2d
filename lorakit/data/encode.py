"""Records to training examples: token ids, labels (-100 where there is no loss) and `cutoff_len` truncation.

SFT: the template splits a conversation into (prompt, reply) pieces; each piece is tokenised on its own and the ids
are concatenated (as LLaMA-Factory does), so the reply tokens start exactly where generation would start after the
prompt. Labels are -100 on prompt pieces (unless `train_on_prompt`) and the token ids on replies, which include the
end-of-turn marker the model must learn to emit. Every assistant turn of a multi-turn conversation is a label.
`prompt_ids` is the same path for a prompt (chat, eval, serving): `conversation_texts` then `conversation_ids`.

Truncation keeps the start of each piece and shares `cutoff_len` between prompt and reply turn by turn, as
LLaMA-Factory does: a short reply is kept whole and the prompt is cut; when both are long, they are cut in
proportion to their lengths; later turns get what is left.

PT: `text` + eos, all tokens are labels; a text longer than `cutoff_len` is split into several examples.

In every example `labels[0]` is -100: nothing precedes the first token, so it can never be predicted, and when
examples are packed into one row this keeps the first token of an example from being a target of the previous one.
"""

from __future__ import annotations

from .formats import DataError
from .templates import BuiltinTemplate, TokenizerTemplate

IGNORE_INDEX = -100
_BATCH = 1024  # texts per tokenizer call


def encode_records(records: list[dict], tokenizer, template: BuiltinTemplate | TokenizerTemplate | None = None,
                   cutoff_len: int = 1024, train_on_prompt: bool = False,
                   stage: str = "sft") -> tuple[list[dict], dict[str, int]]:
    """Examples `{"input_ids": [...], "labels": [...]}` and counts of what happened.

    stats: `records`, `examples`, `tokens`, `label_tokens`, `truncated` (examples cut by cutoff_len),
    `tokens_cut`, `dropped_no_labels` (examples with no label token left, not returned), and for pt `split`
    (extra examples made by splitting long texts).
    """
    if cutoff_len < 2:
        raise DataError(f"cutoff_len must be at least 2, got {cutoff_len}")
    stats = {"records": len(records), "examples": 0, "tokens": 0, "label_tokens": 0, "truncated": 0,
             "tokens_cut": 0, "dropped_no_labels": 0}
    if stage == "pt":
        stats["split"] = 0
        candidates = _encode_pt(records, tokenizer, cutoff_len, stats)
    elif stage == "sft":
        if template is None:
            raise DataError("stage sft needs a chat template (get_template(name, tokenizer))")
        candidates = _encode_sft(records, tokenizer, template, cutoff_len, train_on_prompt, stats)
    else:
        raise DataError(f"stage {stage!r} is not one of sft, pt")
    examples = []
    for ids, labels in candidates:
        if labels:
            labels[0] = IGNORE_INDEX
        n_labels = sum(1 for x in labels if x != IGNORE_INDEX)
        if n_labels == 0:
            stats["dropped_no_labels"] += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
        stats["tokens"] += len(ids)
        stats["label_tokens"] += n_labels
    stats["examples"] = len(examples)
    if not examples:
        raise DataError(f"no example has a label token left (cutoff_len={cutoff_len}, "
                        f"{stats['dropped_no_labels']} of {len(records)} dropped)")
    return examples, stats


def _encode_sft(records: list[dict], tokenizer, template, cutoff_len: int, train_on_prompt: bool,
                stats: dict) -> list[tuple[list[int], list[int]]]:
    texts = []  # per record: ([(prompt text, reply text), ...], text after the last reply)
    for record in records:
        if "messages" not in record:
            raise DataError(f"{record.get('source', 'a record')}: no 'messages' (is this pre-training text? "
                            "use stage: pt)")
        try:
            texts.append(conversation_texts(template, record["messages"]))
        except DataError as e:
            raise DataError(f"{record.get('source', 'a record')}: {e}") from None
        except Exception as e:  # a Jinja template that rejects the conversation
            raise DataError(f"{record.get('source', 'a record')}: chat template failed: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return [_truncate_turns(turns, cutoff_len, train_on_prompt, stats)
            for turns, _ in conversation_ids(tokenizer, texts)]


def conversation_texts(template: BuiltinTemplate | TokenizerTemplate, messages: list[dict],
                       add_generation_prompt: bool = False) -> tuple[list[tuple[str, str]], str]:
    """The pieces a conversation is tokenised in: (prompt text, reply text) per assistant turn, and the prompt
    text after the last reply (with the generation prompt when asked; training drops it: nothing learns from it)."""
    pairs, prompt = [], ""
    for text, is_reply in template.segments(messages, add_generation_prompt):
        if is_reply:
            pairs.append((prompt, text))
            prompt = ""
        else:
            prompt += text
    return pairs, prompt


def conversation_ids(tokenizer, texts: list[tuple[list[tuple[str, str]], str]]
                     ) -> list[tuple[list[tuple[list[int], list[int]]], list[int]]]:
    """`conversation_texts` of several conversations to token ids, piece by piece: per conversation,
    (prompt ids, reply ids) per turn and the ids of the text after the last reply."""
    flat = [text for pairs, tail in texts for pair in pairs for text in pair] + [tail for _, tail in texts]
    ids = iter(tokenize(tokenizer, flat))
    turns = [[(next(ids), next(ids)) for _ in pairs] for pairs, _ in texts]
    return [(conversation, next(ids)) for conversation in turns]


def prompt_ids(template: BuiltinTemplate | TokenizerTemplate, messages: list[dict]) -> list[int]:
    """The ids a model reads before it writes the next reply to `messages` (chat, eval, serving): the same pieces,
    tokenised the same way, as in a training example with this history, followed by the generation prompt, so a
    generated reply starts exactly where a trained one does."""
    [(turns, tail)] = conversation_ids(template.tokenizer, [conversation_texts(template, messages, True)])
    return [i for prompt, reply in turns for i in prompt + reply] + tail


def _truncate_turns(turns: list[tuple[list[int], list[int]]], cutoff_len: int, train_on_prompt: bool,
                    stats: dict) -> tuple[list[int], list[int]]:
    """Concatenate (prompt ids, reply ids) turns within `cutoff_len`, keeping the start of each piece."""
    ids: list[int] = []
    labels: list[int] = []
    left, cut = cutoff_len, 0
    for prompt, reply in turns:
        n_prompt, n_reply = turn_budget(len(prompt), len(reply), left)
        cut += len(prompt) - n_prompt + len(reply) - n_reply
        ids += prompt[:n_prompt] + reply[:n_reply]
        labels += (prompt[:n_prompt] if train_on_prompt else [IGNORE_INDEX] * n_prompt) + reply[:n_reply]
        left -= n_prompt + n_reply
    if cut:
        stats["truncated"] += 1
        stats["tokens_cut"] += cut
    return ids, labels


def turn_budget(n_prompt: int, n_reply: int, budget: int) -> tuple[int, int]:
    """How many prompt and reply tokens of one turn fit in `budget` tokens (LLaMA-Factory's rule).

    A reply shorter than half the budget is kept whole; else a prompt shorter than half is kept whole and the reply
    gets the rest; else both are cut in proportion to their lengths.
    """
    if budget <= 0:
        return 0, 0
    if n_prompt + n_reply <= budget:
        return n_prompt, n_reply
    if 2 * n_reply < budget:
        max_reply = budget
    elif 2 * n_prompt < budget:
        max_reply = budget - n_prompt
    else:
        max_reply = int(budget * n_reply / (n_prompt + n_reply))
    keep_reply = min(max_reply, n_reply)
    return min(budget - keep_reply, n_prompt), keep_reply


def _encode_pt(records: list[dict], tokenizer, cutoff_len: int, stats: dict) -> list[tuple[list[int], list[int]]]:
    eos = getattr(tokenizer, "eos_token", None) or ""
    for record in records:
        if "text" not in record:
            raise DataError(f"{record.get('source', 'a record')}: stage pt needs 'text' records")
    out = []
    for ids in tokenize(tokenizer, [r["text"] + eos for r in records]):
        chunks = [ids[i:i + cutoff_len] for i in range(0, len(ids), cutoff_len)]
        stats["split"] += max(len(chunks) - 1, 0)
        out += [(chunk, list(chunk)) for chunk in chunks]
    return out


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without added special tokens (templates write them as text), in batched calls."""
    out: list[list[int]] = []
    for start in range(0, len(texts), _BATCH):
        chunk = texts[start:start + _BATCH]
        out += [list(ids) for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]]
    return out
