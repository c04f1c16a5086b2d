"""Our KV-cache generation loop against transformers' generate and against per-row runs."""

import pytest
import torch
from conftest import VOCAB, make_model

from lorakit import LoraConfig, get_lora_model
from lorakit.generation import Sampling, TextStream, generate, next_tokens


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma2"])
def test_greedy_matches_transformers_and_single_rows(arch):
    model = make_model(arch)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 3)]
    batched = generate(model, prompts, Sampling(max_new_tokens=6), stop_ids=set(), pad_id=0)
    for prompt, got in zip(prompts, batched):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6,
                             pad_token_id=0, eos_token_id=None)
        assert got == ref[0, len(prompt):].tolist()


def test_stop_tokens_end_rows_independently():
    model = make_model("llama")
    prompt = [5, 6, 7]
    free = generate(model, [prompt], Sampling(max_new_tokens=8), stop_ids=set(), pad_id=0)[0]
    stop = free[3]
    out = generate(model, [prompt, [9, 10]], Sampling(max_new_tokens=8), stop_ids={stop}, pad_id=0)
    assert out[0] == free[: free.index(stop)]
    streamed = []
    generate(model, [prompt], Sampling(max_new_tokens=8), stop_ids={stop}, pad_id=0,
             on_token=lambda row, t: streamed.append(t))
    assert streamed == out[0]


def test_adapter_per_row():
    lm = get_lora_model(make_model("llama"), LoraConfig(target_modules="all-linear", init_lora_weights=False),
                        adapter_name="a")
    prompts = [[4, 5, 6, 7], [8, 9]]
    mixed = generate(lm, prompts, Sampling(max_new_tokens=5), set(), 0, adapter_names=["a", "__base__"])
    alone_a = generate(lm, prompts[:1], Sampling(max_new_tokens=5), set(), 0)
    with lm.disable_adapter():
        alone_base = generate(lm, prompts[1:], Sampling(max_new_tokens=5), set(), 0)
    assert mixed == alone_a + alone_base


def test_sampling_rules():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    seen = torch.tensor([[3]])
    assert next_tokens(logits, seen, Sampling(), None).item() == 3
    assert next_tokens(logits, seen, Sampling(repetition_penalty=10.0), None).item() == 2
    g = torch.Generator().manual_seed(0)
    picks = {next_tokens(logits, seen, Sampling(temperature=1.0, top_k=2), g).item() for _ in range(50)}
    assert picks == {2, 3}
    picks = {next_tokens(logits, seen, Sampling(temperature=1.0, top_p=0.5), g).item() for _ in range(50)}
    assert picks == {3}  # p(3) = 0.64 already reaches 0.5
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


def test_sampling_is_reproducible_with_a_seed():
    model = make_model("llama")
    s = Sampling(max_new_tokens=6, temperature=1.0, seed=7)
    assert generate(model, [[3, 4, 5]], s, set(), 0) == generate(model, [[3, 4, 5]], s, set(), 0)


def test_text_stream_waits_for_whole_characters():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Bytes())
    pieces = [stream.push(b) for b in "hé!".encode()]
    assert pieces == ["h", "", "é", "!"]
