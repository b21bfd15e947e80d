"""Sampling: exact, reproducible per sample, independent of how samples are batched."""

import torch

from detoxrl.config import GenerationConfig, ModelConfig
from detoxrl.policy import load_policy
from detoxrl.rl.rollout import SeededSampler, generate, sample_seeds


def test_seeded_sampler_samples_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    temperature = 0.8
    counts = torch.zeros(5)
    for seed in range(4000):
        sampler = SeededSampler([seed], temperature, torch.device("cpu"))
        counts[sampler(None, logits).argmax()] += 1
    expected = torch.softmax(logits / temperature, dim=-1)[0]
    torch.testing.assert_close(counts / counts.sum(), expected, atol=0.025, rtol=0)
    assert counts[4] == 0  # a banned token is never drawn
    assert torch.allclose(sampler.logprobs[0], torch.log(expected[sampler(None, logits).argmax()]))


def test_seeded_sampler_records_each_step_from_its_own_scores():
    """The sampler writes every step into the same buffers: what it recorded at a step stays that step's."""
    sampler = SeededSampler([1, 2, 3], 0.7, torch.device("cpu"), record_model_logprobs=True)
    steps = [torch.randn(3, 50, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    chosen = [sampler(None, scores.clone()).argmax(-1, keepdim=True) for scores in steps]
    for scores, token, logp, model_logp in zip(steps, chosen, sampler.logprobs, sampler.model_logprobs):
        torch.testing.assert_close(logp, (scores / 0.7).log_softmax(-1).gather(-1, token).squeeze(-1))
        torch.testing.assert_close(model_logp, scores.log_softmax(-1).gather(-1, token).squeeze(-1))
    assert len({tuple(token.flatten().tolist()) for token in chosen}) > 1


def test_sample_seeds_are_distinct_and_stable():
    seeds = sample_seeds(0, 5, count=8)
    assert len(set(seeds)) == 8
    assert seeds == sample_seeds(0, 5, count=8)
    assert seeds[:4] == sample_seeds(0, 5, count=4)  # a sample's seed depends on its index only
    assert seeds != sample_seeds(0, 6, count=8)


def test_a_sample_does_not_depend_on_its_batch(tiny_llama, tiny_t5):
    for path in (tiny_llama, tiny_t5):
        policy = load_policy(ModelConfig(name_or_path=str(path)))
        settings = GenerationConfig(max_new_tokens=6)
        prompts = ["the person1 said thanks about work and the meeting", "school talk"]
        both = generate(policy, policy.model, prompts, settings, 64, [101, 202])
        alone = generate(policy, policy.model, prompts[1:], settings, 64, [202])
        n = int(alone.mask.sum())
        assert both.responses[1] == alone.responses[0]
        torch.testing.assert_close(both.logprobs[1, :n], alone.logprobs[0, :n], atol=1e-5, rtol=1e-5)
        other = generate(policy, policy.model, prompts[1:], settings, 64, [303])
        assert other.response_ids.tolist() != alone.response_ids.tolist()


def test_evaluation_samples_are_keyed_by_prompt_and_index(tmp_path):
    """Sample j of a prompt is the same response whatever k, the batch size or the prompts' order."""
    from tiny import save_tiny_llama, tiny_run_config

    from detoxrl.sampling import keyed_seeds, sample, texts_of

    config = tiny_run_config(save_tiny_llama(tmp_path / "llama"), tmp_path / "run", **{"generation.max_new_tokens": 6})
    policy = load_policy(config.model)
    a, b = "the meeting about work", "a car and a home"
    two = texts_of(sample(policy, policy.model, [a, b], config, 2, batch_size=4))
    three = texts_of(sample(policy, policy.model, [b, a], config, 3, batch_size=1))
    assert len(set(three)) > 1  # the samples differ: equal draws below are the same seeds, not a constant model
    assert two[:2] == three[3:5] and two[2:] == three[:2]
    assert len(set(keyed_seeds(0, 1, [a, b], 3))) == 6 and keyed_seeds(0, 1, [a], 1) != keyed_seeds(1, 1, [a], 1)


def test_generate_samples_the_nucleus_its_config_asks_for(tiny_llama):
    """Evaluation's top_p reaches the sampler: a nucleus of one token is greedy whatever the seeds, and the
    log-probs recorded are of that truncated distribution (0), the model's own ones of the full one."""
    policy = load_policy(ModelConfig(name_or_path=str(tiny_llama)))
    settings = GenerationConfig(max_new_tokens=6, top_p=1e-6)
    prompts = ["the meeting about work", "school talk"]
    one = generate(policy, policy.model, prompts, settings, 64, [1, 2], record_model_logprobs=True)
    other = generate(policy, policy.model, prompts, settings, 64, [3, 4])
    assert one.response_ids.tolist() == other.response_ids.tolist()
    assert torch.equal(one.logprobs, torch.zeros_like(one.logprobs))
    assert (one.model_logprobs[one.mask.bool()] < 0).all()
