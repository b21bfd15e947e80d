"""The math of detoxrl.rl (shared core, PPO, RLOO, GRPO), checked against values worked out by hand."""

import math

import pytest
import torch

from detoxrl.rl.core import (
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    k3_kl,
    loss_divisors,
    masked_mean,
    masked_var,
    masked_whiten,
    response_mask,
    sequence_kl,
)
from detoxrl.rl.grpo import group_normalised_advantages, grpo_losses
from detoxrl.rl.ppo import explained_variance, gae_advantages, kl_penalised_rewards, ppo_losses
from detoxrl.rl.rloo import leave_one_out_advantages


def close(actual, expected, tol=1e-5):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=tol, rtol=tol), (actual, expected)


# Real tokens are 1, 2 (row 0) and 4 (row 1); the padding holds large garbage values.
X = torch.tensor([[1.0, 2.0, 1000.0], [4.0, -500.0, 77.0]])
M = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_ignores_padding():
    close(masked_mean(X, M), 7 / 3)  # (1 + 2 + 4) / 3
    close(masked_mean(X, M, dim=1), [1.5, 4.0])
    close(masked_mean(X, M, dim=0), [2.5, 2.0, 0.0])  # an all-padding column gives 0, not NaN


def test_masked_mean_of_nothing_is_zero_not_nan():
    close(masked_mean(X, torch.zeros_like(M)), 0.0)


def test_masked_var_by_hand():
    # mean 7/3; squared deviations 16/9, 1/9, 25/9 -> sum 42/9 = 14/3
    close(masked_var(X, M), (14 / 3) / 2)  # unbiased


def test_mean_reduced_over_processes_equals_one_process_holding_all():
    # Process 0 holds row 0 of X, process 1 row 1; ``reduce`` adds the other's (sum, count) as all-reduce would.
    def reduce_with(other_x, other_m):
        return lambda totals: totals + torch.stack([(other_x * other_m).sum(), other_m.sum()]).double()

    close(masked_mean(X[:1], M[:1], reduce=reduce_with(X[1:], M[1:])), masked_mean(X, M))
    close(masked_mean(X[1:], M[1:], reduce=reduce_with(X[:1], M[:1])), masked_mean(X, M))


def test_masked_whiten_real_tokens_and_zero_padding():
    out = masked_whiten(X, M)
    std = math.sqrt(7 / 3)  # unbiased variance from above
    expected = [[(1 - 7 / 3) / std, (2 - 7 / 3) / std, 0.0], [(4 - 7 / 3) / std, 0.0, 0.0]]
    close(out, expected, tol=1e-4)
    assert (out[M == 0] == 0).all()
    close(masked_mean(out, M), 0.0)
    close(masked_var(out, M), 1.0, tol=1e-4)


# ---------------------------------------------------------------- response mask


def test_response_mask_up_to_and_including_first_eos():
    eos, pad = 1, 0
    tokens = torch.tensor(
        [
            [5, 1, 0, 0],  # EOS at 1, then padding
            [5, 6, 7, 8],  # no EOS: all ones
            [1, 0, 0, 0],  # EOS first
            [5, 1, 7, 1],  # only the first EOS counts
            [5, 0, 6, 1],  # a pad id before EOS is still a response token
        ]
    )
    expected = [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    out = response_mask(tokens, eos, pad)
    assert out.dtype == torch.float32
    close(out, expected)


def test_response_mask_multiple_eos_ids():
    tokens = torch.tensor([[5, 2, 9, 1], [5, 9, 1, 2], [5, 6, 7, 8]])
    close(response_mask(tokens, [1, 2], 0), [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    # with only id 1 as EOS, token 2 is an ordinary token
    close(response_mask(tokens, [1], 0), [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])


def test_response_mask_pad_equal_to_eos():
    # models whose pad token is their EOS: generate fills finished rows with EOS
    close(response_mask(torch.tensor([[4, 1, 1, 1]]), 1, 1), [[1, 1, 0, 0]])


# ---------------------------------------------------------------- KL-penalised rewards


def test_kl_penalised_rewards_score_on_last_real_token():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-0.3, -0.2, -7.0, -8.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -1.0], [-0.1, -0.7, -1.0, -2.0], [-2.0, -1.0, -1.0, -3.0]])
    scores = torch.tensor([2.0, -1.0, 0.5])
    beta = 0.1
    rewards, kl = kl_penalised_rewards(scores, logprobs, ref, mask, beta)
    # KL per token = log pi - log pi_ref on real tokens, 0 on padding
    expected_kl = [[0.5, -1.0, 0.0, 0.0], [-0.2, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 2.0]]
    close(kl, expected_kl)
    expected_rewards = [
        [-0.05, 0.1, 0.0 + 2.0, 0.0],  # score on column 2, the last real token
        [0.02, -0.05 - 1.0, 0.0, 0.0],  # score on column 1
        [-0.1, 0.0, 0.0, -0.2 + 0.5],  # full row: score on the last column
    ]
    close(rewards, expected_rewards)


def test_kl_penalised_rewards_all_padding_row_gets_nothing():
    mask = torch.tensor([[0.0, 0.0]])
    rewards, kl = kl_penalised_rewards(torch.tensor([3.0]), torch.tensor([[-1.0, -2.0]]), torch.zeros(1, 2), mask, 0.2)
    close(rewards, [[0.0, 0.0]])
    close(kl, [[0.0, 0.0]])


# ---------------------------------------------------------------- GAE


def test_gae_three_tokens_by_hand_with_padding():
    # Row 0: 3 real tokens, gamma=1, lam=0.95, then a padding column with garbage.
    #   t=2: delta = 1.0 + 0 - 0.8 = 0.2                  A2 = 0.2
    #   t=1: delta = -0.2 + 0.8 - 0.4 = 0.2               A1 = 0.2 + 0.95 * 0.2 = 0.39
    #   t=0: delta = 0.1 + 0.4 - 0.5 = 0.0                A0 = 0.0 + 0.95 * 0.39 = 0.3705
    #   returns = A + V = 0.8705, 0.79, 1.0
    # Row 1: all padding -> zeros.
    rewards = torch.tensor([[0.1, -0.2, 1.0, 5.0], [3.0, 3.0, 3.0, 3.0]])
    values = torch.tensor([[0.5, 0.4, 0.8, 7.0], [1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    close(adv, [[0.3705, 0.39, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]])
    close(ret, [[0.8705, 0.79, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_gae_with_discount_by_hand():
    # gamma=0.9, lam=0.5, two tokens: r = (1, 2), V = (0.5, 1.0)
    #   t=1: delta = 2 - 1.0 = 1.0                       A1 = 1.0
    #   t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4           A0 = 1.4 + 0.45 * 1.0 = 1.85
    adv, ret = gae_advantages(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 1.0]]), torch.ones(1, 2), 0.9, 0.5)
    close(adv, [[1.85, 1.0]])
    close(ret, [[2.35, 2.0]])


def test_gae_gamma_lam_one_gives_reward_to_go():
    rewards = torch.tensor([[0.3, -1.0, 0.7, 2.0, 9.0], [1.0, 1.0, 4.0, 4.0, 4.0]])
    values = torch.tensor([[0.2, 0.1, -0.4, 1.5, 6.0], [0.5, -0.5, 8.0, 8.0, 8.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    expected_ret, expected_adv = [], []
    for b in range(2):
        n = int(mask[b].sum())
        r, v = rewards[b, :n].tolist(), values[b, :n].tolist()
        to_go = [sum(r[t:]) for t in range(n)]
        pad = [0.0] * (5 - n)
        expected_ret.append(to_go + pad)
        expected_adv.append([g - vt for g, vt in zip(to_go, v)] + pad)
    close(ret, expected_ret)
    close(adv, expected_adv)


# ---------------------------------------------------------------- PPO losses


def _ppo_case():
    eps = 0.2
    # ratios: 1.5, 1.0, 1.5, 0.5 on real tokens; the padding token has a huge log-ratio
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.5, -3.0]])
    logratio = torch.tensor([[math.log(1.5), 0.0, math.log(1.5), math.log(0.5), 4.0]])
    logprobs = (old + logratio).requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, -2.0, -2.0, 100.0]])
    old_values = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1, -0.5, 0.0, 50.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 1.0, 0.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    out = ppo_losses(logprobs, old, values, old_values, advantages, returns, mask, eps, 0.2, vf_coef=0.1)
    return out, logprobs, values


def test_ppo_policy_loss_and_clipping_by_hand():
    out, logprobs, _ = _ppo_case()
    # per-token max(-A * r, -A * clip(r, 0.8, 1.2)):
    #   t0: A=+1, r=1.5: max(-1.5, -1.2) = -1.2  (clipped)
    #   t1: A=+1, r=1.0: -1.0
    #   t2: A=-2, r=1.5: max(3.0, 2.4) = 3.0     (unclipped: pessimistic side)
    #   t3: A=-2, r=0.5: max(1.0, 1.6) = 1.6     (clipped)
    close(out.policy_loss, (-1.2 - 1.0 + 3.0 + 1.6) / 4)
    close(out.clip_fraction, 2 / 4)


def test_ppo_clipped_tokens_get_zero_policy_gradient():
    out, logprobs, _ = _ppo_case()
    out.loss.backward()
    # d/dlogp of -A * r = -A * r; clipped tokens (t0, t3) and padding (t4) get none.
    #   t1: -1 * 1.0 / 4 = -0.25     t2: 2 * 1.5 / 4 = 0.75
    close(logprobs.grad, [[0.0, -0.25, 0.75, 0.0, 0.0]])


def test_ppo_value_loss_and_value_clipping_by_hand():
    out, _, values = _ppo_case()
    # cliprange_value 0.2, old values 0:
    #   t0: v=1.0 -> clipped 0.2; max((1-1)^2, (0.2-1)^2) = 0.64   (clipped)
    #   t1: v=0.1 inside the range;  (0.1-1)^2 = 0.81
    #   t2: v=-0.5 -> clipped -0.2; max(2.25, 1.44) = 2.25
    #   t3: v=0 = R: 0
    value_loss = 0.5 * (0.64 + 0.81 + 2.25 + 0.0) / 4
    close(out.value_loss, value_loss)
    close(out.value_clip_fraction, 1 / 4)
    approx_kl = ((0.5 - math.log(1.5)) * 2 + (-0.5 - math.log(0.5)) + 0.0) / 4
    close(out.approx_kl, approx_kl)
    close(out.loss, (-1.2 - 1.0 + 3.0 + 1.6) / 4 + 0.1 * value_loss)
    out.loss.backward()
    # d/dv of 0.1 * 0.5 * (v - R)^2 / 4 = 0.1 * (v - R) / 4 on unclipped tokens; t0 is clipped.
    close(values.grad, [[0.0, 0.1 * -0.9 / 4, 0.1 * -1.5 / 4, 0.0, 0.0]])
    for name in ("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl"):
        assert not getattr(out, name).requires_grad


def test_ppo_equal_logprobs_give_zero_kl_and_no_clipping():
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    adv = torch.tensor([[0.5, -1.0, 2.0]])
    v = torch.tensor([[0.1, 0.2, 0.3]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    out = ppo_losses(lp, lp.clone(), v, v.clone(), adv, v.clone(), mask, 0.2, 0.2, 0.5)
    assert out.approx_kl.item() == 0.0
    assert out.clip_fraction.item() == 0.0
    assert out.value_clip_fraction.item() == 0.0
    close(out.policy_loss, -(0.5 - 1.0) / 2)  # ratio 1: -mean(A) over real tokens
    close(out.value_loss, 0.0)


def test_ppo_divisors_override_the_counts():
    # Same tokens as _ppo_case, but divided by 8 (e.g. the token count of the whole mini-batch
    # over all processes) instead of this shard's 4 real tokens: sums / 8.
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.5, -3.0]])
    logprobs = old + torch.tensor([[math.log(1.5), 0.0, math.log(1.5), math.log(0.5), 4.0]])
    adv = torch.tensor([[1.0, 1.0, -2.0, -2.0, 100.0]])
    values = torch.tensor([[1.0, 0.1, -0.5, 0.0, 50.0]])
    returns = torch.tensor([[1.0, 1.0, 1.0, 0.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    out = ppo_losses(logprobs, old, values, torch.zeros(1, 5), adv, returns, mask, 0.2, 0.2, 0.1, divisor=8.0,
                     value_divisor=8.0)
    close(out.policy_loss, (-1.2 - 1.0 + 3.0 + 1.6) / 8)
    close(out.value_loss, 0.5 * (0.64 + 0.81 + 2.25) / 8)
    close(out.loss, 2.4 / 8 + 0.1 * 0.5 * 3.7 / 8)
    # Sequence normalisation: the policy loss over 2 responses, the value loss still over the 8 tokens.
    out = ppo_losses(logprobs, old, values, torch.zeros(1, 5), adv, returns, mask, 0.2, 0.2, 0.1, divisor=2.0,
                     normalization="sequence", value_divisor=8.0)
    close(out.policy_loss, (-1.2 - 1.0 + 3.0 + 1.6) / 4 / 2)
    close(out.value_loss, 0.5 * (0.64 + 0.81 + 2.25) / 8)


# ---------------------------------------------------------------- explained variance


def test_explained_variance_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    # residuals (0, 0, 1): unbiased var 1/3; var(returns) = 1 -> 1 - 1/3
    assert explained_variance(torch.tensor([[1.0, 2.0, 2.0, -100.0]]), returns, mask) == pytest.approx(2 / 3, abs=1e-6)
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 4), returns, mask) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(explained_variance(torch.zeros(1, 4), torch.tensor([[2.0, 2.0, 2.0, 9.0]]), mask))


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(6.6, n_steps=256)  # error 6.6/6 - 1 = 0.1 -> * (1 + 0.1 * 256 / 10000)
    assert ctl.value == pytest.approx(0.2 * 1.00256)
    ctl.update(60.0, n_steps=256)  # error 9 clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * 1.00256 * 1.00512)
    ctl.update(0.0, n_steps=1000)  # error -1 clipped to -0.2
    assert ctl.value == pytest.approx(0.2 * 1.00256 * 1.00512 * 0.98)
    ctl.update(6.0, n_steps=1000)  # on target: unchanged
    assert ctl.value == pytest.approx(0.2 * 1.00256 * 1.00512 * 0.98)


def test_adaptive_kl_controller_state_roundtrip():
    ctl = AdaptiveKLController(0.2, 6.0, 100)
    ctl.update(12.0, 10)
    other = AdaptiveKLController(0.5, 6.0, 100)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value == pytest.approx(0.2 * 1.02)


def test_fixed_kl_controller_never_changes():
    ctl = FixedKLController(0.3)
    for kl, n in [(0.0, 10), (100.0, 1000), (-5.0, 1), (float("inf"), 3)]:
        ctl.update(kl, n)
        assert ctl.value == 0.3


# ---------------------------------------------------------------- shared pieces of the critic-free losses


def test_sequence_kl_sums_real_tokens():
    logprobs = torch.tensor([[-1.0, -2.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    close(sequence_kl(logprobs, ref, torch.tensor([[1.0, 1.0, 0.0]])), [0.5 - 1.0])


def test_k3_kl_by_hand_and_never_negative():
    logprobs = torch.tensor([-1.0, -2.0, -3.0])
    ref = torch.tensor([-2.0, -2.0, -1.0])
    # r = ref - logp: -1, 0, 2 -> e^r - r - 1
    close(k3_kl(logprobs, ref, torch.ones(3)), [math.exp(-1) + 1 - 1, 0.0, math.exp(2) - 2 - 1])
    assert (k3_kl(torch.randn(100), torch.randn(100), torch.ones(100)) >= 0).all()
    close(k3_kl(logprobs, ref, torch.tensor([1.0, 1.0, 0.0])), [math.exp(-1) + 1 - 1, 0.0, 0.0])  # padding is 0


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_grpo_loss_and_gradients_stay_finite_when_a_pad_token_is_very_unlikely(normalization):
    # On padding the reference log-prob is 0 but the policy's is whatever the model gives the pad token;
    # exp(0 - (-95)) overflows float32, and inf * 0 was NaN.
    logprobs = torch.tensor([[-1.0, -95.0], [-2.0, -3.0]], requires_grad=True)
    old = logprobs.detach().clone()
    ref = torch.tensor([[-2.0, 0.0], [-2.5, -3.0]])
    advantages, mask = torch.tensor([[1.0, 0.0], [-1.0, -1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    loss, stats = grpo_losses(logprobs, old, ref, advantages, mask, 0.2, 0.5, normalization)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(stats["loss/kl"]) and torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[0, 1] == 0  # the pad token gets no gradient
    # The KL term is the one of the real tokens only: (e^-1 + 1 - 1, e^-0.5 + 0.5 - 1, 0).
    kl = [math.exp(-1), math.exp(-0.5) - 0.5, 0.0]
    close(stats["loss/kl"], sum(kl) / 3 if normalization == "token" else (kl[0] + (kl[1] + kl[2]) / 2) / 2)


def test_aggregate_loss_token_and_sequence_normalisation_by_hand():
    per_token = torch.tensor([[1.0, 3.0, 100.0], [6.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    close(aggregate_loss(per_token, mask, "token"), (1 + 3 + 6) / 3)
    close(aggregate_loss(per_token, mask, "sequence"), ((1 + 3) / 2 + 6) / 2)
    close(aggregate_loss(per_token, mask, "token", divisor=5.0), 10 / 5)
    close(aggregate_loss(per_token, mask, "sequence", divisor=4.0), 8 / 4)


def test_loss_divisors_by_hand():
    # This process: 3 tokens in 2 responses; the other: 5 tokens in 2 responses; 2 processes x 2 accumulation steps.
    other = torch.tensor([5.0, 2.0], dtype=torch.float64)
    divisors = loss_divisors(M, 4, reduce=lambda totals: totals + other)
    close(divisors["token"], 8 / 4)
    close(divisors["sequence"], 4 / 4)
    close(loss_divisors(M, 1)["token"], 3.0)  # one process, no accumulation: the micro-batch's own count


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_micro_batch_losses_average_to_the_whole_mini_batch_loss(normalization):
    # 8 responses of different lengths: 2 processes x 2 accumulated micro-batches of 2. DDP averages the
    # processes' gradients and accelerate divides each micro-batch loss by the accumulation steps, so the
    # update follows the mean of the 4 micro-batch losses: it must be the loss of all 8 at once.
    torch.manual_seed(0)
    per_token = torch.randn(8, 5)
    mask = (torch.arange(5) < torch.tensor([1, 5, 2, 4, 3, 1, 5, 2])[:, None]).float()
    shares = [slice(0, 4), slice(4, 8)]  # each process's share of the mini-batch
    totals = [torch.stack([mask[s].sum(), torch.tensor(4.0)]).double() for s in shares]
    losses = []
    for rank, share in enumerate(shares):
        divisor = loss_divisors(mask[share], 4, reduce=lambda t: t + totals[1 - rank])[normalization]
        for micro in (slice(share.start, share.start + 2), slice(share.start + 2, share.stop)):
            losses.append(aggregate_loss(per_token[micro], mask[micro], normalization, divisor))
    close(torch.stack(losses).mean(), aggregate_loss(per_token, mask, normalization))


# ---------------------------------------------------------------- RLOO


def test_leave_one_out_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, k = 3
    # prompt 0: 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - (1+2)/2 = 4.5; prompt 1: -1.5, -1.5, 3
    close(leave_one_out_advantages(rewards, 3), [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])


def test_leave_one_out_with_equal_rewards_gives_no_signal():
    close(leave_one_out_advantages(torch.full((4,), 2.5), 2), [0.0] * 4)


def test_leave_one_out_refuses_partial_groups():
    with pytest.raises(ValueError, match="groups of k=2"):
        leave_one_out_advantages(torch.zeros(3), 2)
    with pytest.raises(ValueError):
        leave_one_out_advantages(torch.zeros(3), 1)


# ---------------------------------------------------------------- GRPO


def test_group_normalised_advantages_by_hand():
    scores = torch.tensor([1.0, 3.0, 5.0, 5.0])  # k = 2: groups (1, 3) and (5, 5)
    close(group_normalised_advantages(scores, 2, scale=False), [-1.0, 1.0, 0.0, 0.0])
    std = math.sqrt(2.0)  # unbiased std of (1, 3)
    close(group_normalised_advantages(scores, 2, scale=True), [-1 / (std + 1e-4), 1 / (std + 1e-4), 0.0, 0.0])


def test_grpo_loss_is_surrogate_plus_weighted_k3_by_hand():
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    logprobs = torch.tensor([[-1.0, -1.0 + math.log(1.5), -7.0]], requires_grad=True)
    ref = torch.tensor([[-2.0, -1.0 + math.log(1.5), 0.0]])
    advantages = torch.tensor([[2.0, 2.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = grpo_losses(logprobs, old, ref, advantages, mask, cliprange=0.2, kl_coef=0.5)
    surrogate = (-2.0 * 1.0 + -2.0 * 1.2) / 2  # ratio 1; ratio 1.5 clipped to 1.2 (A > 0)
    kl = (math.exp(-1) + 1 - 1 + 0.0) / 2  # k3 with r = -1 and r = 0
    close(stats["loss/policy"], surrogate)
    close(stats["loss/kl"], kl)
    close(loss, surrogate + 0.5 * kl)
    close(stats["policy/clipfrac"], 0.5)
    loss.backward()
    # t0: d/dlogp [-A r] = -2 * 1 / 2 = -1; k3 gradient 0.5 * (1 - e^r) / 2 at r = -1; t1 clipped, k3 grad 0
    close(logprobs.grad, [[-1.0 + 0.5 * (1 - math.exp(-1)) / 2, 0.0, 0.0]])
