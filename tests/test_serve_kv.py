"""The serving engine's KV cache (lorakit/serve/kv.py): a decoding step writes in place, and the cache reads as
transformers' DynamicLayer would after the same updates."""

import torch
from transformers.cache_utils import DynamicLayer

from lorakit.serve.kv import SPARE, SlackCache, SlackLayer


def states(rows, width, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, width, 4, generator=g), torch.randn(rows, 2, width, 4, generator=g)


def test_updates_read_as_dynamic_layer_and_steps_write_in_place():
    slack, plain = SlackLayer(), DynamicLayer()
    for layer in (slack, plain):
        layer.update(*states(3, 5, 0))
    buffer = slack.keys.data_ptr()
    for step in range(SPARE + 3):  # past the first spare room: one regrowth
        new = states(3, 1, step + 1)
        k, v = slack.update(*new)
        pk, pv = plain.update(*new)
        assert torch.equal(k, pk) and torch.equal(v, pv)
        if step < SPARE:
            assert slack.keys.data_ptr() == buffer  # no copy of the cache while spare columns last
    assert slack.keys.data_ptr() != buffer and slack.get_seq_length() == 5 + SPARE + 3


def test_stack_right_aligns_rows_and_select_trims():
    a, b = SlackLayer(), SlackLayer()
    ka, va = states(2, 3, 0)
    kb, vb = states(1, 5, 1)
    a.update(ka, va)
    b.update(kb, vb)
    a.stack(b, 5)
    assert a.keys.shape == (3, 2, 5, 4)
    assert torch.equal(a.keys[:2, :, 2:], ka) and torch.equal(a.keys[:2, :, :2], torch.zeros(2, 2, 2, 4))
    assert torch.equal(a.values[2:], vb)
    a.select(torch.tensor([2, 0]), 2)
    assert torch.equal(a.keys[0], kb[0, :, 2:]) and torch.equal(a.keys[1], ka[0])
    k, _ = a.update(*states(2, 1, 2))  # still appends after a rebuild
    assert k.shape == (2, 2, 4, 4)


def test_keys_replaced_from_outside_are_taken_up():
    layer = SlackLayer()
    layer.update(*states(3, 4, 0))
    layer.batch_select_indices(torch.tensor([1]))  # DynamicLayer's own method sets keys to a new tensor
    kept = layer.keys.clone()
    new = states(1, 1, 1)
    k, _ = layer.update(*new)
    assert torch.equal(k, torch.cat([kept, new[0]], dim=-2))


def test_the_cache_makes_a_slack_layer_per_model_layer():
    cache = SlackCache()
    for i in range(3):
        cache.update(*states(1, 2, i), layer_idx=i)
    assert len(cache.layers) == 3 and all(isinstance(layer, SlackLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 2
