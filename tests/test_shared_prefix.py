"""Decoding with one copy of each prompt's key/value cache (detoxrl.shared_prefix)."""

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny import record_prompt_caches
from transformers.cache_utils import DynamicLayer

import detoxrl.policy
from detoxrl.config import GenerationConfig, ModelConfig
from detoxrl.policy import load_policy
from detoxrl.rl.rollout import generate
from detoxrl.shared_prefix import ATTENTION, SharedPrefixLayer, prompt_groups, shared_prefix_attention

PROMPTS = ["the person1 said thanks about work and the meeting", "school talk"]
ROWS = torch.tensor([0, 0, 1, 2, 1, 0])  # rows' prompts, unsorted and in groups of unequal size


def test_prompt_groups_place_every_row_once():
    members, slots = prompt_groups(ROWS)
    assert members.shape == (3, 3)
    assert torch.equal(members.flatten()[slots], torch.arange(len(ROWS)))
    for prompt in range(3):
        assert sorted(int(r) for r in members[prompt] if r < len(ROWS)) == \
            [i for i, p in enumerate(ROWS.tolist()) if p == prompt]
    assert int((members == len(ROWS)).sum()) == 3  # padding: 3 + 2 + 1 rows in groups of 3


def layer_with(prefix_keys, prefix_values, reserve, attention=ATTENTION):
    source = DynamicLayer()
    source.update(prefix_keys, prefix_values)
    return SharedPrefixLayer(source, ROWS, reserve, SimpleNamespace(_attn_implementation=attention))


def test_a_layer_and_its_keys_are_freed_without_the_cyclic_collector():
    """A cycle between the layer and its tagged keys held every step's cache until a full collection ran."""
    layer = layer_with(torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8), reserve=4)
    keys, _ = layer.update(torch.randn(len(ROWS), 2, 1, 8), torch.randn(len(ROWS), 2, 1, 8))
    buffer = weakref.ref(layer.key_buffer)
    gc.disable()
    try:
        del layer, keys
        assert buffer() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("new,padded", [(1, True), (3, True), (3, False)])
def test_attention_equals_attention_over_the_expanded_cache(new, padded):
    """Scores against the prompt's keys and the row's own, one softmax: SDPA's result over every row's full
    cache, with GQA (4 query heads on 2 key heads), left padding in one prompt, and several new positions."""
    torch.manual_seed(0)
    rows, heads, query_heads, prefix, dim = len(ROWS), 2, 4, 5, 8
    prefix_keys, prefix_values = torch.randn(3, heads, prefix, dim), torch.randn(3, heads, prefix, dim)
    layer = layer_with(prefix_keys, prefix_values, reserve=6)
    layer.update(torch.randn(rows, heads, 2, dim), torch.randn(rows, heads, 2, dim))
    keys, values = layer.update(torch.randn(rows, heads, new, dim), torch.randn(rows, heads, new, dim))
    assert keys.shared_prefix() is layer and layer.get_seq_length() == prefix + 2 + new
    full_keys = torch.cat([prefix_keys[ROWS], keys], dim=-2)
    full_values = torch.cat([prefix_values[ROWS], values], dim=-2)
    length = full_keys.shape[-2]
    mask = torch.ones(rows, 1, new, length, dtype=torch.bool).tril(length - new)
    if padded:
        mask[ROWS == 1, ..., :2] = False  # prompt 1 is left-padded by two positions
    query = torch.randn(rows, query_heads, new, dim)
    expected = F.scaled_dot_product_attention(query, full_keys.repeat_interleave(2, dim=1),
                                              full_values.repeat_interleave(2, dim=1), attn_mask=mask)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    out, _ = shared_prefix_attention(module, query, keys, values, mask if padded else None, scaling=dim ** -0.5)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_gradients_equal_those_through_the_expanded_cache():
    """Training passes recompute the attention in backward (checkpointed): the gradients of the queries, the
    prompts' keys and values and the rows' own ones are those of SDPA over every row's full cache."""
    torch.manual_seed(1)
    rows, heads, prefix, dim, new = len(ROWS), 2, 5, 8, 3
    prefix_keys = torch.randn(3, heads, prefix, dim, requires_grad=True)
    prefix_values = torch.randn(3, heads, prefix, dim, requires_grad=True)
    own_keys = torch.randn(rows, heads, new, dim, requires_grad=True)
    own_values = torch.randn(rows, heads, new, dim, requires_grad=True)
    query = torch.randn(rows, 4, new, dim, requires_grad=True)
    leaves = (query, prefix_keys, prefix_values, own_keys, own_values)

    layer = layer_with(prefix_keys, prefix_values, reserve=new)
    keys, values = layer.update(own_keys, own_values)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=True)
    out, _ = shared_prefix_attention(module, query, keys, values, None, scaling=dim ** -0.5)
    weights = torch.randn_like(out)
    shared = torch.autograd.grad((out * weights).sum(), leaves)

    full_keys = torch.cat([prefix_keys[ROWS], own_keys], dim=-2).repeat_interleave(2, dim=1)
    full_values = torch.cat([prefix_values[ROWS], own_values], dim=-2).repeat_interleave(2, dim=1)
    mask = torch.ones(new, prefix + new, dtype=torch.bool).tril(prefix)
    expected = F.scaled_dot_product_attention(query, full_keys, full_values, attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(shared, torch.autograd.grad((expected * weights).sum(), leaves)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_layer_without_the_attention_switched_on_expands_to_every_row():
    """Under any other attention, or asked to reorder, the layer copies the prefix to every row first and then
    concatenates as DynamicLayer does: slower, never wrong."""
    prefix_keys = torch.randn(3, 1, 4, 2, dtype=torch.bfloat16)
    layer = layer_with(prefix_keys, -prefix_keys, reserve=4, attention="sdpa")
    step = torch.randn(len(ROWS), 1, 1, 2, dtype=torch.bfloat16)
    keys, values = layer.update(step, -step)
    assert not hasattr(keys, "shared_prefix") and keys.dtype == torch.bfloat16
    torch.testing.assert_close(keys, torch.cat([prefix_keys[ROWS], step], dim=-2), rtol=0, atol=0)
    torch.testing.assert_close(values, -keys, rtol=0, atol=0)

    layer = layer_with(prefix_keys, -prefix_keys, reserve=4)
    layer.update(step, -step)
    layer.reorder_cache(torch.arange(len(ROWS)).flip(0))
    keys, _ = layer.update(step, -step)
    reordered = torch.cat([prefix_keys[ROWS], step], dim=-2).flip(0)
    torch.testing.assert_close(keys, torch.cat([reordered, step], dim=-2), rtol=0, atol=0)


def test_sampling_shares_each_prompt_cache_and_draws_the_same(tiny_llama, monkeypatch):
    """generate keeps one copy of each distinct prompt's cache and samples the same responses as with the
    prompts' cache expanded to every row (fp32; log-probs to rounding)."""
    policy = load_policy(ModelConfig(name_or_path=str(tiny_llama)))
    settings = GenerationConfig(max_new_tokens=7, min_new_tokens=7)
    prompts, seeds = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2, [5, 6, 7, 8, 9]
    caches = record_prompt_caches(monkeypatch)
    shared = generate(policy, policy.model, prompts, settings, 64, seeds)
    layers = caches[0].layers
    assert all(type(layer) is SharedPrefixLayer and layer.shared for layer in layers)
    assert {layer.prefix_keys.shape[0] for layer in layers} == {2}
    assert {tuple(layer.keys.shape[:1]) + (layer.keys.shape[-2],) for layer in layers} == {(5, 7)}
    assert policy.model.config._attn_implementation != ATTENTION  # switched back after decoding

    monkeypatch.setattr(detoxrl.policy, "supports_shared_prefix", lambda model: False)
    expanded = generate(policy, policy.model, prompts, settings, 64, seeds)
    assert type(caches[-1].layers[0]) is not SharedPrefixLayer
    assert shared.responses == expanded.responses and torch.equal(shared.response_ids, expanded.response_ids)
    torch.testing.assert_close(shared.logprobs, expanded.logprobs, rtol=0, atol=1e-5)
