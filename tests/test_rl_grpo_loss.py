"""GRPO loss (fused, from hidden states) against a plain PyTorch GRPO loss on materialised logits."""

import math

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


# -- loss types, GSPO, dual clip, per-token advantages, reduction none, entropy bonus: each
#    against a transcription of the peers' formulas written as direct loops


def _fixed():
    g = torch.Generator().manual_seed(11)
    B, L = 3, 5
    logp = (-torch.rand(B, L, generator=g) * 2).double()
    old = (logp + 0.3 * torch.randn(B, L, generator=g).double()).clamp(max=0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)
    return logp, old, mask, adv


def _loop_loss(logp, old, mask, adv, *, loss_type, eps_low=0.2, eps_high=0.28, max_len=None, num_items=None,
               seq_level=False, dual_c=None, ent=None, ent_coef=0.0):
    """TRL GRPOTrainer._compute_loss / verl compute_policy_loss, as loops over tokens."""
    B, L = logp.shape
    per = [[0.0] * L for _ in range(B)]
    for i in range(B):
        n_i = sum(1 for t in range(L) if mask[i, t])
        seq_lr = sum(float(logp[i, t] - old[i, t]) for t in range(L) if mask[i, t]) / max(n_i, 1)
        for t in range(L):
            if not mask[i, t]:
                continue
            a = float(adv[i]) if adv.dim() == 1 else float(adv[i, t])
            lr = seq_lr if seq_level else float(logp[i, t] - old[i, t])
            r = math.exp(lr)
            loss1 = -a * r
            loss2 = -a * min(max(r, 1 - eps_low), 1 + eps_high)
            x = max(loss1, loss2)
            if dual_c is not None and a < 0:
                x = min(x, -a * dual_c)
            if ent is not None:
                x -= ent_coef * float(ent[i, t])
            per[i][t] = x
    tot = sum(per[i][t] for i in range(B) for t in range(L))
    ntok = sum(1 for i in range(B) for t in range(L) if mask[i, t])
    if loss_type == "grpo":
        return sum(sum(per[i]) / max(sum(1 for t in range(L) if mask[i, t]), 1) for i in range(B)) / B
    if loss_type == "bnpo":
        return tot / ntok
    if loss_type == "dr_grpo":
        return tot / (B * max_len)
    if loss_type == "dapo":
        return tot / num_items
    return per


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_types_match_peer_formulas(loss_type):
    logp, old, mask, adv = _fixed()
    kw = dict(max_completion_length=5, num_items_in_batch=20.0)
    loss, _ = grpo_loss(logp, old, adv, mask, loss_type=loss_type, **kw)
    want = _loop_loss(logp, old, mask, adv, loss_type=loss_type, max_len=5, num_items=20.0)
    assert float(loss) == pytest.approx(want, rel=1e-12)


def test_gspo_sequence_level_ratio():
    logp, old, mask, adv = _fixed()
    loss, _ = grpo_loss(logp, old, adv, mask, loss_type="grpo", importance_sampling_level="sequence")
    assert float(loss) == pytest.approx(_loop_loss(logp, old, mask, adv, loss_type="grpo", seq_level=True), rel=1e-12)


def test_dual_clip_caps_negative_advantages():
    logp, old, mask, adv = _fixed()
    old = old - 2.0  # ratios of e^2: the dual clip bites for the negative advantage
    loss, m = grpo_loss(logp, old, adv, mask, loss_type="bnpo", dual_clip=3.0)
    assert float(loss) == pytest.approx(_loop_loss(logp, old, mask, adv, loss_type="bnpo", dual_c=3.0), rel=1e-12)
    assert m["dual_clip_fraction"] > 0
    with pytest.raises(ValueError, match="dual_clip"):
        grpo_loss(logp, old, adv, mask, dual_clip=0.5)


def test_per_token_advantages_and_reduction_none():
    logp, old, mask, _ = _fixed()
    adv = torch.linspace(-1, 1, 15).reshape(3, 5).double()
    out, _ = grpo_loss(logp, old, adv, mask, reduction="none")
    want = _loop_loss(logp, old, mask, adv, loss_type="none")
    assert out.shape == (3, 5)
    torch.testing.assert_close(out, torch.tensor(want, dtype=torch.float64))


def test_entropy_bonus_has_gradient():
    logp, old, mask, adv = _fixed()
    ent = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    loss, m = grpo_loss(logp, old, adv, mask, entropy=ent, entropy_coef=0.01)
    assert float(loss.detach()) == pytest.approx(_loop_loss(logp, old, mask, adv, loss_type="bnpo", ent=ent.detach(),
                                                   ent_coef=0.01), rel=1e-12)
    loss.backward()
    torch.testing.assert_close(ent.grad, -0.01 * mask.double() / mask.sum())
    assert "entropy" in m


def test_aggregation_names_map_to_loss_types():
    logp, old, mask, adv = _fixed()
    for agg, lt in (("token-mean", "bnpo"), ("seq-mean-token-mean", "grpo"), ("constant-length", "dr_grpo")):
        a, _ = grpo_loss(logp, old, adv, mask, aggregation=agg, max_completion_length=5)
        b, _ = grpo_loss(logp, old, adv, mask, loss_type=lt, max_completion_length=5)
        assert float(a) == float(b)


@pytest.mark.parametrize("mode", ["group", "batch", "none"])
def test_scale_rewards_modes_and_unequal_groups(mode):
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    adv = group_advantages(r, group_ids=ids, scale_rewards=mode)
    groups = {0: [0, 1, 2], 1: [3, 4], 2: [5, 6]}
    all_mean = sum(r.tolist()) / 7
    all_std = math.sqrt(sum((x - all_mean) ** 2 for x in r.tolist()) / 6)
    for members in groups.values():
        vals = [float(r[i]) for i in members]
        mu = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))
        for i in members:
            want = float(r[i]) - mu
            if mode == "group":
                want /= sd + 1e-4
            elif mode == "batch":
                want /= all_std + 1e-4
            assert float(adv[i]) == pytest.approx(want, rel=1e-5, abs=1e-6)
