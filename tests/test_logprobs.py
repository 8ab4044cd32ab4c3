import pytest
import torch

from pear_kernels import fused_token_logprobs

from .conftest import leaf, make_problem


@pytest.mark.parametrize("chunk_size", [1, 5, None])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_entropy_and_grads_match_materialised(chunk_size, temperature):
    hidden, weight, labels, _, bias = make_problem((3, 10), 16, 301, torch.float64, bias=True, seed=3)
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    lp, ent = fused_token_logprobs(h, w, labels, bias=b, temperature=temperature,
                                   return_entropy=True, chunk_size=chunk_size)
    h2, w2, b2 = leaf(hidden), leaf(weight), leaf(bias)
    logsm = torch.log_softmax((h2 @ w2.t() + b2) / temperature, -1)
    mask = labels != -100
    ref = logsm.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
    ref_ent = -(logsm.exp() * logsm).sum(-1) * mask
    torch.testing.assert_close(lp, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent.detach(), rtol=1e-10, atol=1e-12)
    up = torch.randn(labels.shape, dtype=torch.float64)
    g1 = torch.autograd.grad((lp * up).sum(), [h, w, b])
    g2 = torch.autograd.grad((ref * up).sum(), [h2, w2, b2])
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_entropy_is_differentiable_against_materialised_autograd():
    """An entropy bonus needs dH/dh and dH/dW: compare with autograd on full logits (float64),
    with a -inf bias column, temperature and chunks that cut the batch."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(13, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(13, generator=g, dtype=torch.float64)
    bias[3] = float("-inf")
    labels = torch.randint(0, 13, (2, 6), generator=g)
    labels[labels == 3] = 4
    labels[0, :2] = -100
    a, b = torch.linspace(-1, 1, 12).reshape(2, 6).double(), torch.linspace(0.5, 2, 12).reshape(2, 6).double()
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    logp, ent = fused_token_logprobs(leaves[0], leaves[1], labels, bias=bias, temperature=0.7,
                                     return_entropy=True, chunk_size=4, backend="torch")
    ((logp * a).sum() + (ent * b).sum()).backward()
    ref = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    # the oracle's -inf is -1e9: the same p (exactly 0 in float64) with finite autograd terms
    z = (ref[0] @ ref[1].t() + torch.where(torch.isinf(bias), -1e9, bias)) / 0.7
    lp_all = torch.log_softmax(z, -1)
    p = lp_all.exp()
    mask = labels != -100
    lp = lp_all.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    h_ent = (torch.logsumexp(z, -1) - (p * z).sum(-1)) * mask
    ((lp * a).sum() + (h_ent * b).sum()).backward()
    torch.testing.assert_close(ent, h_ent.detach())
    for x, y in zip(leaves, ref):
        torch.testing.assert_close(x.grad, y.grad)
