"""The tokenizer inside a GGUF file: vocabulary, merges, token types, special ids and the chat template, under
llama.cpp's `tokenizer.*` keys (as convert_hf_to_gguf.py writes them).

Byte-level BPE tokenizers are written as llama.cpp's "gpt2" model with the `tokenizer.ggml.pre` name that selects
the same pre-tokenizer split; sentencepiece-style (byte-fallback BPE, Unigram) as "llama" with scores.
"""

from __future__ import annotations

import json
import re
import warnings

import gguf

# pre-tokenizer split regexes (tokenizer.json) -> llama.cpp's `tokenizer.ggml.pre` name
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLITS = {_CONTRACTIONS + r"\p{N}{1,3}" + _REST: "llama-bpe", _CONTRACTIONS + r"\p{N}" + _REST: "qwen2"}
_SMOLLM_HEAD = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>"]


def _tokenizer_spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"GGUF export needs a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}")
    return json.loads(backend.to_str())


def _pre_parts(spec: dict) -> list[dict]:
    pre = spec.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer, from its pre-tokenizer (and vocabulary)."""
    parts = _pre_parts(_tokenizer_spec(tokenizer))
    kinds = [p.get("type") for p in parts]
    splits = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if len(splits) == 1 and splits[0] in _SPLITS:
        return _SPLITS[splits[0]]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        # transformers' GGUF loader rebuilds SmolLM's tokenizer without the Digits step; its vocabulary tells
        head = tokenizer.convert_ids_to_tokens(list(range(len(_SMOLLM_HEAD))))
        return "smollm" if len(tokenizer) == 49152 and head == _SMOLLM_HEAD else "gpt-2"
    warnings.warn(f"GGUF export: unknown pre-tokenizer {kinds}; writing 'default' (llama.cpp may split text "
                  f"differently); pass pre_tokenizer= to choose", stacklevel=3)
    return "default"


def _token_table(tokenizer, spec: dict, n_vocab: int) -> tuple[str, list[str], list[int], list[float] | None]:
    """(ggml model, tokens, token types, scores): byte-level BPE is "gpt2", sentencepiece-style is "llama"."""
    model = spec["model"]
    if model["type"] == "BPE":
        kind = "llama" if model.get("byte_fallback") else "gpt2"
    elif model["type"] == "Unigram":
        kind = "llama"
    else:
        raise ValueError(f"GGUF export: tokenizer model '{model['type']}' has no llama.cpp equivalent")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ValueError(f"GGUF export: the tokenizer has ids up to {max(vocab.values())} but the embedding only "
                         f"{n_vocab} rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]  # rows past the tokenizer, as llama.cpp's converter names them
    types = [gguf.TokenType.UNUSED] * n_vocab
    for token, i in vocab.items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        control = added.special or re.fullmatch(r"<\|.*\|>", added.content)
        types[i] = gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED
    if kind == "gpt2":
        return kind, tokens, types, None
    for i, token in enumerate(tokens):
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types[i] = gguf.TokenType.BYTE
    if tokenizer.unk_token_id is not None:
        types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN
    if model["type"] == "Unigram":
        scores = [float(s) for _, s in model["vocab"]] + [0.0] * (n_vocab - len(model["vocab"]))
    else:  # sentencepiece BPE: a piece's score is minus its rank, which the vocabulary order is
        scores = [-float(i) if t == gguf.TokenType.NORMAL else 0.0 for i, t in enumerate(types)]
    return kind, tokens, types, scores


def _adds_space_prefix(spec: dict, kind: str) -> bool:
    parts = _pre_parts(spec)
    if kind == "gpt2":
        return any(p.get("type") == "ByteLevel" and p.get("add_prefix_space") for p in parts)
    normalizer = json.dumps(spec.get("normalizer") or {})
    return '"Prepend"' in normalizer or any(p.get("type") == "Metaspace" and p.get("prepend_scheme") != "never"
                                            for p in parts)


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, n_vocab: int, pre_tokenizer: str | None = None) -> None:
    """Vocabulary, merges, special ids, BOS/EOS flags and chat template under llama.cpp's tokenizer.* keys."""
    spec = _tokenizer_spec(tokenizer)
    kind, tokens, types, scores = _token_table(tokenizer, spec, n_vocab)
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre_tokenizer or (pre_tokenizer_name(tokenizer) if kind == "gpt2" else "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if kind == "gpt2":
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]  # what the tokenizer really adds, not its flags
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id])
    writer.add_add_space_prefix(_adds_space_prefix(spec, kind))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
