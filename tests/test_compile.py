"""torch.compile: the fused loss is one custom op (pear_kernels::pear_loss), so a function or
a patched Hugging Face model compiles with fullgraph=True and dynamic shapes, and the compiled
loss and gradients equal eager. CPU, inductor; compile time dominates, so the cases are few."""

from __future__ import annotations

import copy

import pytest
import torch

from pear_kernels import PEARConfig, fused_pear_loss


def _inputs(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, T, 8, generator=g).requires_grad_(True)
    w = torch.randn(17, 8, generator=g).requires_grad_(True)
    y = torch.randint(0, 17, (2, T), generator=g)
    y[:, 0] = -100
    b = -torch.rand(2, T, generator=g)
    return h, w, y, b


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fullgraph_dynamic_matches_eager(reduction):
    def f(h, w, y, b):
        out = fused_pear_loss(h, w, y, b, reduction=reduction, variant="block", block_size=3, softcap=4.0)
        return out.sum() if reduction == "none" else out

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, dynamic=True, backend="inductor")
    for T in (7, 12):  # two sequence lengths, one graph
        h, w, y, b = _inputs(T)
        loss = cf(h, w, y, b)
        loss.backward()
        gh, gw = h.grad.clone(), w.grad.clone()
        h.grad = w.grad = None
        ref = f(h, w, y, b)
        ref.backward()
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(gh, h.grad)
        torch.testing.assert_close(gw, w.grad)


def test_compiled_op_still_validates_its_arguments():
    def f(h, w, y, b):
        return fused_pear_loss(h, w, y, b)

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="eager")
    h, w, y, b = _inputs(5)
    y = y.clone()
    y[1, 3] = 99  # outside the vocabulary
    with pytest.raises(Exception, match="labels must be in"):
        cf(h, w, y, b)


def test_patched_hf_model_compiles_fullgraph():
    pytest.importorskip("transformers")
    from pear_kernels.transformers import apply_pear_kernel

    from . import hf_utils

    torch._dynamo.reset()
    m = hf_utils.model(seed=0).train()
    apply_pear_kernel(m, PEARConfig(variant="token"))
    m2 = copy.deepcopy(m)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 40, (2, 9), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    beh = -torch.rand(2, 9, generator=g)
    out = torch.compile(m, fullgraph=True, dynamic=True)(input_ids=ids, labels=labels, behavior_logprobs=beh)
    out.loss.backward()
    ref = m2(input_ids=ids, labels=labels, behavior_logprobs=beh)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)
    for (name, p1), p2 in zip(m.named_parameters(), m2.parameters()):
        if p1.grad is not None:
            torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_token_logprobs_with_entropy_compiles_fullgraph_dynamic():
    """fused_token_logprobs is the custom op pear_kernels::token_logprobs: an RL objective
    (policy term plus an entropy bonus, on softcapped logits) compiles with fullgraph=True,
    one graph for two sequence lengths (a recompile raises), and its value and gradients equal
    eager."""
    from pear_kernels import fused_token_logprobs

    def f(h, w, y):
        lp, ent = fused_token_logprobs(h, w, y, return_entropy=True, softcap=5.0, temperature=0.9)
        return (lp * 0.7).sum() + 0.1 * ent.sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, dynamic=True, backend="inductor")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for T in (7, 12):
            h, w, y, _ = _inputs(T, seed=T)
            loss = cf(h, w, y)
            loss.backward()
            gh, gw = h.grad.clone(), w.grad.clone()
            h.grad = w.grad = None
            ref = f(h, w, y)
            ref.backward()
            torch.testing.assert_close(loss, ref)
            torch.testing.assert_close(gh, h.grad)
            torch.testing.assert_close(gw, w.grad)
