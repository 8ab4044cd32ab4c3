"""GRPO loss (fused, from hidden states) against a plain PyTorch GRPO loss on materialised logits."""

import pytest
import torch

from pear_kernels.rl.advantages import group_advantages
from pear_kernels.rl.grpo_loss import AGGREGATIONS, fused_grpo_loss, grpo_loss

B, L, H, V = 4, 7, 16, 23
EPS_LOW, EPS_HIGH, LMAX = 0.2, 0.28, 9


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V, (B, L), generator=g)
    lengths = [7, 3, 5, 1]
    starts = [0, 2, 1, 4]
    mask = torch.zeros(B, L, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(starts, lengths)):
        mask[i, s : s + n] = True
    labels = labels.masked_fill(~mask, -100)
    with torch.no_grad():
        logp_now = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # old and reference policies: shifted so that ratios land on both sides of both clips
    old = (logp_now + 0.4 * torch.randn(B, L, generator=g, dtype=torch.float64)).masked_fill(~mask, 0.0)
    ref = (logp_now + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)).masked_fill(~mask, 0.0)
    adv = torch.tensor([1.3, -0.7, 0.5, -1.1], dtype=torch.float64)
    return hidden, weight, labels, mask, old, ref, adv


def reference_loss(hidden, weight, labels, mask, old, ref, adv, kl_coef, aggregation):
    """Plain GRPO: full logits, case analysis on the sign of A, Python loops for aggregation."""
    logits = hidden @ weight.T
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    total, seq_means, count = 0.0, [], 0
    for i in range(B):
        row = 0.0
        n_i = 0
        for t in range(L):
            if not mask[i, t]:
                continue
            r = torch.exp(logp[i, t] - old[i, t])
            a = adv[i]
            if a >= 0:
                term = -torch.minimum(r, torch.tensor(1 + EPS_HIGH, dtype=r.dtype)) * a
            else:
                term = -torch.maximum(r, torch.tensor(1 - EPS_LOW, dtype=r.dtype)) * a
            if kl_coef:
                x = ref[i, t] - logp[i, t]
                term = term + kl_coef * (torch.exp(x) - x - 1)
            row = row + term
            n_i += 1
        total = total + row
        count += n_i
        seq_means.append(row / max(n_i, 1))
    if aggregation == "token-mean":
        return total / count
    if aggregation == "seq-mean-token-mean":
        return sum(seq_means) / B
    return total / (B * LMAX)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_fused_grpo_matches_plain_reference(aggregation, kl_coef):
    hidden, weight, labels, mask, old, ref, adv = make_inputs()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = fused_grpo_loss(
        h1, w1, labels, old, adv, ref_logp=ref, eps_low=EPS_LOW, eps_high=EPS_HIGH,
        kl_coef=kl_coef, aggregation=aggregation, max_completion_length=LMAX,
    )
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = reference_loss(h2, w2, labels, mask, old, ref, adv, kl_coef, aggregation)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-9, atol=1e-12)
    # the fixture is built so that some tokens are clipped and some are not
    assert 0.0 < metrics["clip_fraction"] < 1.0
    assert metrics["entropy"] > 0.0
    assert metrics["kl"] > 0.0


def test_metrics_match_direct_counts():
    hidden, weight, labels, mask, old, ref, adv = make_inputs(seed=3)
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    _, m = grpo_loss(logp, old, adv, mask, ref_logp=ref, eps_low=EPS_LOW, eps_high=EPS_HIGH)
    r = torch.exp(logp - old)
    a = adv.unsqueeze(1).expand(B, L)
    low = ((r < 1 - EPS_LOW) & (a < 0))[mask].double().mean()
    high = ((r > 1 + EPS_HIGH) & (a > 0))[mask].double().mean()
    x = (ref - logp)[mask]
    assert m["clip_low"] == pytest.approx(float(low))
    assert m["clip_high"] == pytest.approx(float(high))
    assert m["clip_fraction"] == pytest.approx(float(low + high))
    assert m["kl"] == pytest.approx(float((x.exp() - x - 1).mean()))


def test_on_policy_gradient_is_advantage_weighted_logprob_gradient():
    # ratio == 1 at the first update: d loss / d logp_t = -A_i / #tokens (token-mean)
    hidden, weight, labels, mask, _, _, adv = make_inputs(seed=1)
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = logp.masked_fill(~mask, 0.0).detach().requires_grad_()
    loss, m = grpo_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    expected = (-adv.unsqueeze(1) / mask.sum()).expand(B, L) * mask
    torch.testing.assert_close(logp.grad, expected)
    assert m["clip_fraction"] == 0.0


def test_bad_arguments():
    hidden, weight, labels, mask, old, ref, adv = make_inputs()
    logp = torch.zeros(B, L, dtype=torch.float64)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logp, old, adv, mask, aggregation="constant-length")
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(logp, old, adv, mask, aggregation="sum")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old, adv[:2], mask)


def test_group_advantages_grpo_and_dr_grpo():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    a = group_advantages(rewards, 4)
    g = rewards.view(3, 4)
    expected = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).reshape(-1)
    torch.testing.assert_close(a, expected)
    assert torch.all(a[4:8] == 0)  # all-equal group: no signal, no NaN
    d = group_advantages(rewards, 4, scale_by_std=False)
    torch.testing.assert_close(d, (g - g.mean(1, keepdim=True)).reshape(-1))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards, 5)


# -- issue: bad arguments are refused by name; a retained graph can be back-propagated twice


@pytest.mark.parametrize("kw,name", [
    (dict(eps_low=float("nan")), "eps_low"),
    (dict(eps_high=float("nan")), "eps_high"),
    (dict(eps_high=float("inf")), "eps_high"),
])
def test_grpo_refuses_nan_eps(kw, name):
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=name):
        grpo_loss(logp, logp, torch.ones(2), torch.ones(2, 3, dtype=torch.bool), **kw)


def test_grpo_refuses_nan_old_logprobs_on_completion_tokens():
    logp = torch.zeros(2, 3)
    old = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    old[0, 2] = float("nan")  # masked: allowed
    grpo_loss(logp, old, torch.ones(2), mask)
    old[1, 0] = float("nan")
    with pytest.raises(ValueError, match="old_logp"):
        grpo_loss(logp, old, torch.ones(2), mask)


def test_fused_grpo_second_backward_through_retained_graph():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[:, :2] = -100
    old = -torch.rand(2, 5, generator=g)
    loss, _ = fused_grpo_loss(hidden, weight, labels, old, torch.tensor([1.0, -0.5]))
    loss.backward(retain_graph=True)
    first = hidden.grad.clone()
    loss.backward()
    torch.testing.assert_close(hidden.grad, 2 * first)


def test_nan_reward_refused():
    with pytest.raises(ValueError, match="rewards contain NaN at index 2"):
        group_advantages(torch.tensor([1.0, 0.0, float("nan"), 1.0]), 2)
