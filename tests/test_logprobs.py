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
