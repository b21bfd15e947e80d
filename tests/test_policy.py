"""Loading, the adapter-disabled reference, padding sides, and save/load symmetry."""

import pytest
import torch
from plain import plain_logits, plain_scores
from tiny import record_prompt_caches
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
from transformers.cache_utils import DynamicLayer

from detoxrl.config import GenerationConfig, ModelConfig
from detoxrl.errors import DetoxError
import detoxrl.policy
import detoxrl.rl.rollout as rollout
from detoxrl.policy import ReservedLayer, distinct_rows, encode_prompts, forward_response, load_policy
from detoxrl.rl.rollout import generate, reference_logprobs

PROMPTS = ["the person1 said thanks about work and the meeting", "school talk"]


def perturb_adapter(policy):
    """A fresh LoRA is a no-op (B = 0); move it so policy and reference differ."""
    torch.manual_seed(1)
    for name, param in policy.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)


def head_logits(model, query, response):
    out = forward_response(model, query["input_ids"], query["attention_mask"], response)
    return plain_logits(out.hidden, out.head)


@pytest.mark.parametrize("model, auto", [("tiny_t5", AutoModelForSeq2SeqLM), ("tiny_llama", AutoModelForCausalLM)])
def test_reference_is_base_model_with_adapter_disabled(model, auto, request):
    path = request.getfixturevalue(model)
    policy = load_policy(ModelConfig(name_or_path=str(path)))
    perturb_adapter(policy)
    base = auto.from_pretrained(path).eval()
    query = policy.tokenize_prompts(PROMPTS, 64, "cpu")
    response = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    with torch.no_grad():
        expected = head_logits(base.requires_grad_(False), query, response)
        with policy.reference_model() as reference:
            got = head_logits(reference, query, response)
        adapted = head_logits(policy.model, query, response)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(adapted, expected)  # the adapter is really on outside the context
    # No second copy of the weights: the reference shares the policy's base parameters.
    assert policy.reference is None


def test_padding_sides(tiny_t5, tiny_llama):
    t5 = load_policy(ModelConfig(name_or_path=str(tiny_t5)))
    llama = load_policy(ModelConfig(name_or_path=str(tiny_llama)))
    q5 = t5.tokenize_prompts(PROMPTS, 64, "cpu")["attention_mask"]
    ql = llama.tokenize_prompts(PROMPTS, 64, "cpu")["attention_mask"]
    assert q5[1, 0] == 1 and q5[1, -1] == 0  # encoder-decoder: right padding
    assert ql[1, 0] == 0 and ql[1, -1] == 1  # decoder-only: left padding


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_llama"])
def test_generation_logprobs_match_the_sampling_distribution(model, request):
    """Log-probs reused from generation equal a teacher-forced pass under the same transform,
    with temperature and min_new_tokens (the settings that gave the old stack negative KL)."""
    policy = load_policy(ModelConfig(name_or_path=str(request.getfixturevalue(model))))
    policy.add_value_head()
    perturb_adapter(policy)
    settings = GenerationConfig(max_new_tokens=8, min_new_tokens=4, temperature=0.7)
    rollout = generate(policy, policy.model, PROMPTS, settings, 64, [11, 12], policy.module.value_head)
    with torch.no_grad():
        out = policy.module(rollout.query_ids, rollout.query_mask, rollout.response_ids)
    expected = plain_scores(plain_logits(out.hidden, out.head), rollout.response_ids, rollout.mask, 0.7, 4,
                            policy.eos_token_ids)[0]
    torch.testing.assert_close(rollout.logprobs, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rollout.values, out.values * rollout.mask, atol=1e-4, rtol=1e-4)
    assert (rollout.mask.sum(dim=1) >= 4).all()  # EOS really was banned before min_new_tokens
    ref = reference_logprobs(policy, rollout, settings)
    assert torch.isfinite(ref).all()


def test_model_generation_config_does_not_leak_into_sampling(tiny_llama, tmp_path):
    """A model whose generation_config.json penalises repetition, bans n-gram repeats and suppresses
    tokens: the recorded log-probs must still be those of the plain distribution that training uses."""
    import shutil

    from transformers import GenerationConfig as HFGenerationConfig

    path = tmp_path / "penalised"
    shutil.copytree(tiny_llama, path)
    HFGenerationConfig(repetition_penalty=1.5, no_repeat_ngram_size=1, suppress_tokens=[5, 6, 7],
                       bad_words_ids=[[8]], eos_token_id=1, pad_token_id=0, bos_token_id=3).save_pretrained(path)
    policy = load_policy(ModelConfig(name_or_path=str(path)))
    assert policy.model.generation_config.repetition_penalty == 1.5  # the model really carries the settings
    perturb_adapter(policy)
    settings = GenerationConfig(max_new_tokens=12, temperature=1.0)
    rollout = generate(policy, policy.model, PROMPTS * 4, settings, 64, list(range(8)))
    with torch.no_grad():
        out = policy.module(rollout.query_ids, rollout.query_mask, rollout.response_ids)
    expected = plain_scores(plain_logits(out.hidden, out.head), rollout.response_ids, rollout.mask)[0]
    torch.testing.assert_close(rollout.logprobs, expected, atol=1e-4, rtol=1e-4)
    assert policy.model.generation_config.repetition_penalty == 1.5  # the model's own config is restored


def test_save_and_reload(tiny_llama, tmp_path):
    policy = load_policy(ModelConfig(name_or_path=str(tiny_llama)))
    assert policy.module.value_head is None  # a critic is built only when PPO asks for one
    policy.add_value_head()
    perturb_adapter(policy)
    with torch.no_grad():
        policy.module.value_head.summary.bias.fill_(0.25)
    policy.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "value_head.safetensors").is_file()
    assert not list((tmp_path / "adapter").glob("*.bin"))
    again = load_policy(ModelConfig(name_or_path=str(tiny_llama)), adapter=tmp_path / "adapter")
    before = dict(policy.model.named_parameters())
    for name, param in again.model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, before[name])
            assert param.requires_grad  # an existing adapter is made trainable
    assert again.module.value_head.summary.bias.item() == pytest.approx(0.25)


@pytest.mark.parametrize("model, auto", [("tiny_t5", AutoModelForSeq2SeqLM), ("tiny_llama", AutoModelForCausalLM)])
def test_weights_converted_while_loading_are_read_not_mapped(model, auto, request, monkeypatch):
    """An fp32 checkpoint loaded into bf16 is read tensor by tensor (no mapped fp32 file beside the bf16 copy),
    to the same weights as a mapped load; an fp32 load keeps the mapping."""
    import transformers.modeling_utils as modeling_utils

    path = request.getfixturevalue(model)
    backends, original = [], modeling_utils.safe_open

    def recording(*args, **kwargs):
        backends.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_open", recording)
    read = detoxrl.policy.load_base(str(path), False, torch.bfloat16)
    assert backends == ["pread"] and modeling_utils.safe_open is recording
    mapped = auto.from_pretrained(path, dtype=torch.bfloat16)
    assert backends == ["pread", "mmap"]
    weights = mapped.state_dict()
    assert {k: v.dtype for k, v in read.state_dict().items()} == {k: v.dtype for k, v in weights.items()}
    assert all(torch.equal(v, weights[k]) for k, v in read.state_dict().items())
    detoxrl.policy.load_base(str(path), False, torch.float32)
    assert backends[-1] == "mmap"


def test_loading_errors(tmp_path):
    with pytest.raises(DetoxError, match="does not exist"):
        load_policy(ModelConfig(name_or_path=str(tmp_path / "missing")))
    with pytest.raises(DetoxError, match="GGUF file not found"):
        load_policy(ModelConfig(name_or_path=str(tmp_path / "x.gguf")))
    with pytest.raises(DetoxError, match="not installed"):
        load_policy(ModelConfig(name_or_path="pkg://no_such_package_here/x.gguf"))


def test_unknown_hub_id_says_hub_or_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DetoxError, match="smollm2-offline"):
        load_policy(ModelConfig(name_or_path="nobody/no-such-model-xyz"))


def test_distinct_rows():
    rows = torch.tensor([[3, 1], [2, 2], [3, 1], [0, 5], [2, 2]])
    first, inverse = distinct_rows(rows)
    assert sorted(first.tolist()) == [0, 1, 3]  # the first occurrence of each distinct row
    torch.testing.assert_close(rows[first][inverse], rows)


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_llama"])
def test_shared_prompts_give_the_same_pass_and_gradients(model, request):
    """Encoding each distinct prompt once (k responses per prompt, prompts of different lengths, so with
    padding) gives the logits, values and LoRA gradients of the full pass over every row."""
    policy = load_policy(ModelConfig(name_or_path=str(request.getfixturevalue(model))))
    value_head = policy.add_value_head()
    perturb_adapter(policy)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    query = policy.tokenize_prompts(prompts, 64, "cpu")
    response = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0], [5, 9, 1, 0], [7, 7, 7, 7], [6, 1, 0, 0]])
    results = []
    for share in (False, True):
        policy.model.zero_grad()
        out = forward_response(policy.model, query["input_ids"], query["attention_mask"], response, value_head,
                               share_prompts=share)
        logits = plain_logits(out.hidden, out.head)
        (logits.logsumexp(-1).sum() + out.values.sum()).backward()
        grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad}
        results.append((logits.detach(), out.values.detach(), grads))
    (logits, values, grads), (shared_logits, shared_values, shared_grads) = results
    torch.testing.assert_close(shared_logits, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shared_values, values, rtol=1e-4, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_llama"])
def test_recomputed_prompt_layers_give_the_same_pass_and_gradients_to_the_bit(model, request):
    """With model.recompute_prompts a training pass keeps only the prompt layers' inputs and recomputes the
    rest in the backward pass: the logits and every LoRA gradient are those of the pass that keeps all, bit for
    bit, and what the forward pass saves for backward shrinks."""
    policy = load_policy(ModelConfig(name_or_path=str(request.getfixturevalue(model))))
    perturb_adapter(policy)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    query = policy.tokenize_prompts(prompts, 64, "cpu")
    response = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0], [5, 9, 1, 0]])
    base = policy.model.get_base_model()
    # the first prompt layer's first norm: run through __call__, so its hooks also see the replay
    first_norm = base.get_encoder().block[0].layer[0].layer_norm if model == "tiny_t5" \
        else base.model.layers[0].input_layernorm
    results = []
    for recompute in (True, False):
        saved, calls = [], []
        handle = first_norm.register_forward_hook(lambda module, args, out: calls.append(1))
        policy.model.zero_grad()
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
                out = forward_response(policy.model, query["input_ids"], query["attention_mask"], response,
                                       recompute_prompts=recompute)
            calls_in_forward = len(calls)
            logits = plain_logits(out.hidden, out.head)
            logits.logsumexp(-1).sum().backward()
        finally:
            handle.remove()
        grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad}
        results.append((logits.detach(), grads, sum(saved), len(calls) - calls_in_forward))
    (logits, grads, saved, replays), (kept_logits, kept_grads, kept_saved, kept_replays) = results
    assert torch.equal(logits, kept_logits)
    assert any(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        assert torch.equal(grad, kept_grads[name]), name
    assert (replays, kept_replays) == (1, 0)  # replayed once, in the backward pass
    assert saved < 0.75 * kept_saved


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_llama"])
def test_generation_with_repeated_prompts_equals_one_row_at_a_time(model, request):
    """generate() encodes a repeated prompt once; each row still samples what it samples alone."""
    policy = load_policy(ModelConfig(name_or_path=str(request.getfixturevalue(model))))
    perturb_adapter(policy)
    settings = GenerationConfig(max_new_tokens=8, temperature=0.7)
    prompts, seeds = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3, [21, 22, 23, 24, 25, 26]
    batch = generate(policy, policy.model, prompts, settings, 64, seeds)
    for row, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = generate(policy, policy.model, [prompt], settings, 64, [seed])
        assert batch.responses[row] == alone.responses[0]
        n = int(alone.mask.sum())
        torch.testing.assert_close(batch.logprobs[row, :n], alone.logprobs[0, :n], rtol=1e-4, atol=1e-5)


def test_prompt_cache_comes_from_the_decoder_body(tiny_llama):
    """The shared prompts' cache is computed without the LM head: the head runs once per generated token on the
    batch's rows, never on the prompts (its input there, the last position's strided slice, makes CPU bf16
    matmuls compute about every prompt position's logits)."""
    policy = load_policy(ModelConfig(name_or_path=str(tiny_llama)))
    head = policy.model.get_output_embeddings()
    calls = []
    handle = head.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    try:
        generate(policy, policy.model, [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2,
                 GenerationConfig(max_new_tokens=5, min_new_tokens=5), 64, [1, 2, 3, 4])
    finally:
        handle.remove()
    assert calls == [(4, 1, head.in_features)] * 5


def test_reserved_cache_decodes_as_the_growing_one_in_place(tiny_llama, monkeypatch):
    """Sampling writes each step's keys and values into the prompts' cache allocated once (ReservedLayer):
    the same responses and log-probs, to the last bit, as transformers' concatenating DynamicLayer, and the
    buffers are never reallocated while decoding."""
    policy = load_policy(ModelConfig(name_or_path=str(tiny_llama)))
    settings = GenerationConfig(max_new_tokens=7, min_new_tokens=7)
    prompts, seeds = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2, [5, 6, 7, 8, 9]
    monkeypatch.setattr(detoxrl.policy, "supports_shared_prefix", lambda model: False)  # the layer models lacking it get
    caches = record_prompt_caches(monkeypatch)
    reserved = generate(policy, policy.model, prompts, settings, 64, seeds)
    layers = caches[0].layers
    assert all(type(layer) is ReservedLayer for layer in layers)
    assert all(layer.keys.data_ptr() == layer.key_buffer.data_ptr() for layer in layers)  # still the first buffer
    prompt_length = policy.tokenize_prompts(prompts, 64, "cpu")["input_ids"].shape[1]
    # the prompt but its last token, then that token and every sampled token but the last fed back in
    assert {layer.keys.shape[-2] for layer in layers} == {prompt_length - 1 + settings.max_new_tokens}
    assert {layer.key_buffer.shape[0] for layer in layers} == {len(prompts)}

    monkeypatch.setattr(rollout, "encode_prompts", lambda model, ids, mask, reserve=0: encode_prompts(model, ids, mask))
    growing = generate(policy, policy.model, prompts, settings, 64, seeds)
    assert reserved.responses == growing.responses
    assert torch.equal(reserved.response_ids, growing.response_ids) and torch.equal(reserved.logprobs, growing.logprobs)


def test_reserved_layer_grows_past_its_room_and_after_a_reorder():
    """Beyond the reserved positions, or once its keys are no longer a view of its buffer, the layer
    concatenates as DynamicLayer does."""
    keys = torch.randn(2, 1, 3, 4)
    source = DynamicLayer()
    source.update(keys, -keys)
    layer = ReservedLayer(source, torch.tensor([0, 0, 1]), reserve=1)
    torch.testing.assert_close(layer.keys, keys[[0, 0, 1]], rtol=0, atol=0)
    steps = [torch.randn(3, 1, 1, 4) for _ in range(3)]
    for step in steps:
        k, v = layer.update(step, -step)
    expected = torch.cat([keys[[0, 0, 1]], *steps], dim=-2)
    torch.testing.assert_close(k, expected, rtol=0, atol=0)
    torch.testing.assert_close(v, -expected, rtol=0, atol=0)
    layer.reorder_cache(torch.tensor([2, 1, 0]))
    k, _ = layer.update(steps[0], steps[0])
    torch.testing.assert_close(k, torch.cat([expected[[2, 1, 0]], steps[0]], dim=-2), rtol=0, atol=0)
