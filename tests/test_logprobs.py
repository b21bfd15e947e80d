"""The chunked log-prob and entropy kernel (detoxrl.rl.logprobs) against the plain computation, and the
LM head that forward_response hands it against the model's own logits."""

import math

import pytest
import torch
from plain import plain_logits, plain_scores
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from detoxrl.config import ModelConfig
from detoxrl.errors import DetoxError
from detoxrl.policy import forward_response, head_inputs_as_logits, load_policy
from detoxrl.rl import logprobs as kernel
from detoxrl.rl.logprobs import LMHead, score_tokens


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=tol, rtol=tol)


def identity_head(vocab: int) -> LMHead:
    """hidden = logits: the kernel's output can be checked by hand."""
    return LMHead(torch.eye(vocab), None)


# ---------------------------------------------------------------- by hand


def test_logprobs_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]], [[-1.0, 0.5, 0.0], [2.0, 2.0, 2.0]]])
    tokens = torch.tensor([[2, 0], [1, 1]])
    expected = [[z[a] - math.log(sum(math.exp(v) for v in z)) for z, a in zip(logits[b].tolist(), tokens[b].tolist())]
                for b in range(2)]
    out = score_tokens(logits, identity_head(3), tokens, torch.ones(2, 2))
    close(out.logprobs, expected)
    close(out.model_logprobs, expected)
    assert out.logprobs.dtype == torch.float32


def test_temperature_and_min_new_tokens_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 0.0], [1.0, 2.0, 0.0]]])
    out = score_tokens(logits, identity_head(3), torch.tensor([[0, 0]]), torch.ones(1, 2), temperature=0.5,
                       min_new_tokens=1, eos_token_ids=[1])
    # position 0: EOS (1) banned, logits (2, -inf, 0); position 1: (2, 4, 0)
    close(out.logprobs, [[2 - math.log(math.exp(2) + 1), 2 - math.log(math.exp(2) + math.exp(4) + 1)]])
    p = math.exp(2) / (math.exp(2) + 1)
    close(out.entropy[0, 0], -(p * math.log(p) + (1 - p) * math.log(1 - p)))  # the banned token adds 0, not NaN
    close(out.model_logprobs, [[1 - math.log(math.e + math.e**2 + 1)] * 2])  # temperature 1, nothing banned


def test_entropy_uniform_and_near_certain():
    close(score_tokens(torch.full((2, 3, 7), 4.2), identity_head(7), torch.zeros(2, 3, dtype=torch.long),
                       torch.ones(2, 3)).entropy, torch.full((2, 3), math.log(7)))
    assert score_tokens(torch.tensor([[[0.0, 100.0]]]), identity_head(2), torch.tensor([[1]]),
                        torch.ones(1, 1)).entropy.item() < 1e-6


def test_masked_positions_are_zero_and_get_no_gradient():
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = score_tokens(hidden, identity_head(4), torch.ones(2, 3, dtype=torch.long), mask)
    for values in out:
        assert (values[mask == 0] == 0).all() and (values[mask == 1] != 0).all()
    out.logprobs.sum().backward()
    assert (hidden.grad[mask == 0] == 0).all() and (hidden.grad[mask == 1] != 0).any()


# ---------------------------------------------------------------- against the plain computation


def random_case(dtype: torch.dtype, seed: int = 0, vocab: int = 50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 6, 16, generator=g).to(dtype).requires_grad_(True)
    head = LMHead(torch.randn(vocab, 16, generator=g).to(dtype), torch.randn(vocab, generator=g).to(dtype))
    tokens = torch.randint(4, vocab, (3, 6), generator=g)  # never EOS (1, 3) where it is banned
    mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2, [1.0] + [0.0] * 5])
    return hidden, head, tokens, mask


@pytest.mark.parametrize("temperature, min_new_tokens", [(1.0, 0), (0.7, 2)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_values_and_gradients_match_the_plain_computation(dtype, tol, temperature, min_new_tokens, monkeypatch):
    """Chunks of 3 positions (several per row, some straddling rows) give what full logits give. bf16
    weights: the head runs in bf16 and the rest in fp32 on both sides, so they agree as closely."""
    monkeypatch.setattr(kernel, "CHUNK_LOGITS", 3 * 50)
    hidden, head, tokens, mask = random_case(dtype)
    weights = torch.randn(3, 6)  # a loss that weighs every position differently
    out = score_tokens(hidden, head, tokens, mask, temperature, min_new_tokens, [1, 3])
    (out.logprobs * weights).sum().backward()
    grad, hidden.grad = hidden.grad, None
    expected = plain_scores(plain_logits(hidden, head), tokens, mask, temperature, min_new_tokens, [1, 3])
    (expected[0] * weights).sum().backward()
    for got, want in zip(out, expected):
        close(got, want, tol)
    assert grad.dtype == dtype and grad.abs().sum() > 0
    close(grad, hidden.grad, tol if dtype == torch.float32 else 1e-2)


def test_forward_and_backward_project_only_masked_in_positions_a_chunk_at_a_time(monkeypatch):
    monkeypatch.setattr(kernel, "CHUNK_LOGITS", 4 * 50)
    projected, original = [], kernel.chunk_logits

    def recorded(*args):
        logits = original(*args)
        projected.append(tuple(logits.shape))
        return logits

    monkeypatch.setattr(kernel, "chunk_logits", recorded)
    hidden, head, tokens, mask = random_case(torch.float32)  # 11 of 18 positions in the mask
    score_tokens(hidden, head, tokens, mask).logprobs.sum().backward()
    assert projected == [(4, 50), (4, 50), (3, 50)] * 2  # forward, then backward recomputing each chunk


def test_each_chunk_holds_at_most_its_budget_of_logits(monkeypatch):
    monkeypatch.setattr(kernel, "CHUNK_LOGITS", 100)
    assert [(s.start, s.stop) for s in kernel.chunks(5, vocab=50)] == [(0, 2), (2, 4), (4, 5)]
    assert [(s.start, s.stop) for s in kernel.chunks(2, vocab=500)] == [(0, 1), (1, 2)]  # one position at least


# ---------------------------------------------------------------- the head of real models


def tied_t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval().requires_grad_(False)


def tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=3, tie_word_embeddings=True,
    )).eval().requires_grad_(False)


QUERY = torch.tensor([[5, 6, 7, 8, 1], [0, 0, 9, 10, 1]])  # the second row padded on the left
QUERY_MASK = (QUERY != 0).long()
RESPONSE = torch.tensor([[11, 12, 13, 1], [14, 1, 0, 0]])


def own_logits(model, query, query_mask) -> torch.Tensor:
    """The model's own logits that predict each RESPONSE token, from one plain forward."""
    if model.config.is_encoder_decoder:
        start = torch.zeros_like(RESPONSE[:, :1])
        return model(input_ids=query, attention_mask=query_mask,
                     decoder_input_ids=torch.cat([start, RESPONSE[:, :-1]], dim=1)).logits
    ids = torch.cat([query, RESPONSE], dim=1)
    mask = torch.cat([query_mask, torch.ones_like(RESPONSE)], dim=1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -RESPONSE.shape[1] - 1 : -1]


@pytest.mark.parametrize("build", [tied_t5, tied_llama])
def test_tied_head_gives_the_models_own_logits(build):
    """Tied embeddings, and T5's d_model**-0.5 scaling of the decoder output that comes with them."""
    model = build()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if model.config.is_encoder_decoder:
        assert model.config.scale_decoder_outputs
    query, query_mask = (QUERY * QUERY_MASK, QUERY_MASK) if not model.config.is_encoder_decoder else (
        QUERY.flip(1), QUERY_MASK.flip(1))  # T5 pads on the right
    with torch.no_grad():
        out = forward_response(model, query, query_mask, RESPONSE)
        close(plain_logits(out.hidden, out.head), own_logits(model, query, query_mask))
    assert model.lm_head(torch.ones(1, 32)).shape == (1, 40)  # the head is itself again afterwards


@pytest.mark.parametrize("name", ["tiny_t5", "tiny_llama"])
def test_policy_logprobs_and_lora_gradients_match_full_logits(name, request):
    """The training pass through the kernel gives the log-probs and LoRA gradients of full logits."""
    policy = load_policy(ModelConfig(name_or_path=str(request.getfixturevalue(name))))
    torch.manual_seed(1)
    for n, p in policy.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    query = policy.tokenize_prompts(["the person1 said thanks about work", "school talk"], 32, "cpu")
    mask = torch.tensor([[1.0] * 4, [1.0, 1.0, 0.0, 0.0]])
    results = []
    for fused in (True, False):
        policy.model.zero_grad()
        out = policy.module(query["input_ids"], query["attention_mask"], RESPONSE)
        if fused:
            scores = score_tokens(out.hidden, out.head, RESPONSE, mask, 0.7, 1, policy.eos_token_ids)
        else:
            scores = plain_scores(plain_logits(out.hidden, out.head), RESPONSE, mask, 0.7, 1, policy.eos_token_ids)
        scores[0].sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad}
        results.append(([s.detach() for s in scores], grads))
    (fused_scores, fused_grads), (plain, plain_grads) = results
    for got, want in zip(fused_scores, plain):
        close(got, want)
    assert any(g.abs().sum() > 0 for g in plain_grads.values())
    for n, grad in plain_grads.items():
        close(fused_grads[n], grad)


def test_a_trained_lm_head_is_refused(tiny_llama):
    policy = load_policy(ModelConfig(name_or_path=str(tiny_llama), target_modules=["q_proj", "lm_head"]))
    with pytest.raises(DetoxError, match="LM head must stay frozen.*model.target_modules"):
        with head_inputs_as_logits(policy.model):
            pass
