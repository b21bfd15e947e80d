"""One copy of each prompt's key/value cache, shared by the rows that sample or re-score it.

Sampling draws k responses per prompt. Expanded to every row, the prompts' cache is stored k times and read
k times at every decoding step: evaluation's 128 rows of ~230 prompt tokens hold ~0.86 GB in bf16 (1.7 GB in
fp32), and reading it is most of the time attention takes. :class:`SharedPrefixLayer` keeps the distinct
prompts' keys and values once and each row's own (response) positions apart; :func:`shared_prefix_attention`
scores a row's queries against its prompt's keys and its own, with one softmax over both. That is the same
attention, computed in fp32 (bf16 inputs are converted as they enter the cache), so bf16 draws differ from
SDPA's by rounding only.

It needs a model whose attention is plain softmax attention dispatched by transformers' attention interface
(:data:`ARCHITECTURES`), and is switched on by :func:`shared_prefixes` around ``generate`` and the
teacher-forced passes that re-score what it sampled (the same arithmetic in both, whatever their batches).
A layer used without that switch, or asked to reorder or select rows, first expands its prefix to every row
and then behaves as transformers' DynamicLayer, so it is never wrong, only slower.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.utils.checkpoint
from transformers import AttentionInterface
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "detoxrl_shared_prefix"
# Architectures whose attention is plain scaled softmax attention (RoPE inside the module, GQA, no softcapping,
# sinks or biases) dispatched through transformers' attention interface, and tested here (a tiny Llama; SmolLM2
# is a Llama). Others keep ReservedLayer.
ARCHITECTURES = frozenset({"llama"})


def supports_shared_prefix(model: torch.nn.Module) -> bool:
    """Models whose attention :func:`shared_prefix_attention` computes exactly (:data:`ARCHITECTURES`)."""
    config = model.config
    return config.model_type in ARCHITECTURES and bool(getattr(model, "_supports_attention_backend", False))


@contextlib.contextmanager
def shared_prefixes(model: torch.nn.Module):
    """Attention by :func:`shared_prefix_attention` (SDPA's masks) for the duration, where the model supports it;
    otherwise nothing changes."""
    if not supports_shared_prefix(model):
        yield
        return
    config = model.config
    saved = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = saved


def prompt_groups(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows grouped by their prompt, for batched matmuls against each prompt's keys.

    ``rows[b]`` is row b's prompt. Returns ``members`` [P, kmax], the rows of each prompt padded with
    ``len(rows)`` (a zero row appended by the caller), and ``slots`` [B], each row's place in
    ``members.flatten()``.
    """
    counts = torch.bincount(rows)
    width = int(counts.max())
    order = torch.argsort(rows, stable=True)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(rows)
    rank[order] = torch.arange(len(rows), device=rows.device) - starts[rows[order]]
    slots = rows * width + rank
    members = torch.full((len(counts) * width,), len(rows), device=rows.device, dtype=rows.dtype)
    members[slots] = torch.arange(len(rows), device=rows.device)
    return members.view(len(counts), width), slots


class SharedPrefixLayer(DynamicLayer):
    """A layer's keys and values: each distinct prompt's once ([P, H, Lp, D]), and each row's own positions
    ([B, H, t, D], allocated once with room for ``reserve``), both in fp32.

    ``update`` returns the rows' own positions, tagged with a weak reference to the layer (``shared_prefix``)
    for :func:`shared_prefix_attention`: a strong one would make the layer and its keys a reference cycle, which
    only Python's cyclic collector frees, and a training run's resident set grew by ~0.05 GB a step until it did.
    The sequence length it reports counts the prefix.
    """

    def __init__(self, layer: DynamicLayer, rows: torch.Tensor, reserve: int, config, dtype: torch.dtype | None = None):
        super().__init__()
        self.device, self.is_initialized, self.config = layer.keys.device, True, config
        self.prefix_keys, self.prefix_values = layer.keys.float(), layer.values.float()
        self.rows = rows.to(self.device)
        self.members, self.slots = prompt_groups(self.rows)
        heads, dim = layer.keys.shape[1], layer.keys.shape[-1]
        self.key_buffer = layer.keys.new_empty(len(rows), heads, reserve, dim, dtype=torch.float32)
        self.value_buffer = torch.empty_like(self.key_buffer)
        self.keys, self.values = self.key_buffer[..., :0, :], self.value_buffer[..., :0, :]
        self.dtype = dtype or layer.keys.dtype  # the model's, where the layer's keys were converted already

    @property
    def shared(self) -> bool:
        return self.prefix_keys is not None

    @property
    def prefix_length(self) -> int:
        return self.prefix_keys.shape[-2] if self.shared else 0

    def get_seq_length(self) -> int:
        return self.prefix_length + self.keys.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if self.shared and (end > self.key_buffer.shape[-2] or self.config._attn_implementation != ATTENTION):
            self.expand()
        if not self.shared:
            return super().update(key_states, value_states)
        self.key_buffer[..., start:end, :] = key_states
        self.value_buffer[..., start:end, :] = value_states
        self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
        self.keys.shared_prefix = weakref.ref(self)
        return self.keys, self.values

    def expand(self) -> None:
        """From here on a DynamicLayer: the prefix copied to every row, before the rows' own positions."""
        self.keys, self.values = (torch.cat([prefix.index_select(0, self.rows), own], dim=-2).to(self.dtype)
                                  for prefix, own in ((self.prefix_keys, self.keys), (self.prefix_values, self.values)))
        self.prefix_keys = self.prefix_values = self.key_buffer = self.value_buffer = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.shared:
            self.expand()
        super().reorder_cache(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.shared:
            self.expand()
        super().batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.shared:
            self.expand()
        super().batch_repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        if self.shared:
            self.expand()
        super().crop(tokens_to_remove)


def _grouped(states: torch.Tensor, members: torch.Tensor, padding: float = 0.0) -> torch.Tensor:
    """[B, ...] rows -> [P, kmax, ...], each prompt's rows together; padding rows hold ``padding``."""
    return torch.cat([states, states.new_full((1, *states.shape[1:]), padding)])[members]


def _mask_in_prompt_layout(mask: torch.Tensor, members: torch.Tensor, heads: int, group: int) -> torch.Tensor:
    """SDPA's mask ([q, L], or [B or 1, 1 or Hq, q, L]) for scores in :func:`attend`'s layout
    [P, H, kmax, Hq / H, q, L]; padding rows attend to every position."""
    if mask.dim() == 2:
        return mask
    per_head = (heads, group) if mask.shape[1] > 1 else (1, 1)
    if mask.shape[0] == 1:
        return mask[0].view(per_head[0], 1, per_head[1], *mask.shape[-2:])
    padding = True if mask.dtype == torch.bool else 0.0
    return _grouped(mask, members, padding).view(*members.shape, *per_head, *mask.shape[-2:]).transpose(1, 2)


def shared_prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                            **kwargs):
    """Attention over a :class:`SharedPrefixLayer`'s prompt and the rows' own positions, one softmax over both;
    SDPA for any other keys. ``attention_mask`` is SDPA's (boolean, True attends) over prefix then own
    positions, or None where nothing is masked.

    Where gradients flow (training passes), the attention is recomputed in the backward pass instead of
    keeping its fp32 scores and probabilities for every layer (~7 MB a layer for 8 rows of 40 positions).
    """
    tag = getattr(key, "shared_prefix", None)
    layer = tag() if tag is not None else None
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    inputs = (query, key, value, layer.prefix_keys, layer.prefix_values, attention_mask, layer.members, layer.slots,
              scaling)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs[:5]):
        return torch.utils.checkpoint.checkpoint(attend, *inputs, use_reentrant=False), None
    return attend(*inputs), None


def attend(query, keys, values, prefix_keys, prefix_values, mask, members, slots, scaling: float) -> torch.Tensor:
    """Softmax attention of ``query`` [B, Hq, q, D] over each row's prompt (``prefix_*`` [P, H, Lp, D], the rows
    of prompt p being ``members[p]``) followed by its own ``keys``/``values`` [B, H, t, D], in fp32; GQA when
    Hq > H. Returns [B, q, Hq, D] in the query's dtype, as transformers' attention functions do.

    Scores and probabilities live in the prompts' layout [P, H, kmax, Hq / H * q, Lp + t], where each prompt's
    rows meet its keys in one matrix product; only the small query and output tensors change layout (a
    teacher-forced pass of 128 rows scores ~340 positions per query: copying those tensors between layouts was
    about half of evaluation's reference pass in bf16).
    """
    rows, query_heads, length, dim = query.shape
    heads, prefix = keys.shape[1], prefix_keys.shape[-2]
    group = query_heads // heads  # GQA: the query heads that share a key head
    prompts, width = members.shape
    queries = _grouped(query.float().reshape(rows, heads, group * length, dim), members)  # [P, kmax, H, n, D]
    prefix_scores = queries.transpose(1, 2).reshape(prompts, heads, width * group * length, dim) \
        @ prefix_keys.transpose(-1, -2)
    own_scores = queries @ _grouped(keys, members).transpose(-1, -2)  # [P, kmax, H, n, t]
    scores = torch.cat([prefix_scores.view(prompts, heads, width, group * length, prefix),
                        own_scores.transpose(1, 2)], dim=-1).mul_(scaling)
    if mask is None and length > 1:  # causal among the new positions
        mask = torch.ones(length, scores.shape[-1], dtype=torch.bool, device=scores.device) \
            .tril(scores.shape[-1] - length)
    if mask is not None:
        scores6 = scores.view(prompts, heads, width, group, length, -1)
        mask = _mask_in_prompt_layout(mask, members, heads, group)
        if mask.dtype == torch.bool:
            scores6.masked_fill_(~mask, float("-inf"))
        else:
            scores6.add_(mask)
    probs = scores.softmax(dim=-1)
    out = (probs[..., prefix:].transpose(1, 2) @ _grouped(values, members)).transpose(1, 2) \
        + (probs.view(prompts, heads, width * group * length, -1)[..., :prefix] @ prefix_values) \
        .view(prompts, heads, width, group * length, dim)
    out = out.transpose(1, 2).reshape(prompts * width, heads, group * length, dim)[slots]
    return out.view(rows, query_heads, length, dim).transpose(1, 2).to(query.dtype).contiguous()


AttentionInterface.register(ATTENTION, shared_prefix_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
