"""The native C++ row pass and scan (csrc/) against the direct-loop oracle (tests/oracle.py)."""

from __future__ import annotations

import pytest
import torch

from pear_kernels import fused_pear_loss, fused_token_logprobs, native_status, reference_pear_loss
from pear_kernels.kernels import native_cpu
from pear_kernels.ops import dispatch

from .conftest import leaf, make_problem
from .oracle import oracle_loss

pytestmark = pytest.mark.skipif(not native_cpu.available(), reason=str(native_cpu.unavailable_reason()))

VARIANTS = ["token", "block", "sequence", "none"]
WIDE = dict(delta_clip=(-1.0, 1.0))


def oracle(hidden, weight, labels, behavior, bias=None, compute_dtype=None, **kw):
    return oracle_loss(hidden, weight, labels, behavior, bias=bias, **kw)[0]


def _run(fn, hidden, weight, labels, behavior, bias, up=None, **kw):
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    loss = fn(h, w, labels, behavior, bias=b, **kw)
    grads = torch.autograd.grad(loss if up is None else (loss * up).sum(), [h, w] + ([b] if b is not None else []))
    return loss.detach(), grads


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_matches_oracle(variant, reduction, dtype):
    hidden, weight, labels, behavior, bias = make_problem((3, 17), 24, 1001, dtype, bias=True, seed=21)
    up = torch.randn(labels.shape, dtype=dtype) if reduction == "none" else None
    kw = dict(variant=variant, block_size=3, reduction=reduction, temperature=0.8, **WIDE)
    got = _run(fused_pear_loss, hidden, weight, labels, behavior, bias, up, backend="native", chunk_size=5, **kw)
    want = _run(oracle, hidden, weight, labels, behavior, bias, up, **kw)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=3e-5, atol=3e-6)
    torch.testing.assert_close(got[0].double(), want[0].double(), **tol)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a.double(), b.double(), **tol)


@pytest.mark.parametrize("variant", ["token", "block"])
def test_native_scan_packed_rows_and_chunk_carry(variant):
    hidden, weight, labels, behavior, _ = make_problem((37,), 16, 301, torch.float64, seed=22, prompt=2)
    cu = torch.tensor([0, 1, 12, 30, 37])
    for chunk in (1, 4, 7, 100):
        got = fused_pear_loss(hidden, weight, labels, behavior, cu_seqlens=cu, variant=variant, block_size=4,
                              backend="native", chunk_size=chunk, return_stats=True, **WIDE)
        want, weights = oracle_loss(hidden, weight, labels, behavior, cu_seqlens=cu, variant=variant, block_size=4,
                                    **WIDE)
        torch.testing.assert_close(got[0], want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got[1].weights.double(), weights, rtol=1e-6, atol=1e-7)


def test_native_bf16_within_pytorch_error():
    args = make_problem((3, 21), 32, 1001, torch.bfloat16, seed=23)
    truth = _run(oracle, *args, **WIDE)
    ours = _run(fused_pear_loss, *args, backend="native", chunk_size=8, **WIDE)
    same = _run(reference_pear_loss, *args, **WIDE)

    def err(r):
        return [float((r[0].double() - truth[0]).abs())] + [
            float((a.double() - b).abs().max()) for a, b in zip(r[1], truth[1])
        ]

    for o, t in zip(err(ours), err(same)):
        assert o <= 1.5 * t + 2e-3


def test_native_logprobs_and_extreme_logits():
    hidden, weight, labels, _, bias = make_problem((2, 9), 8, 50, torch.float32, bias=True, seed=24)
    bias[7] = float("-inf")  # a banned token: exp must give exactly 0, never NaN
    labels[labels == 7] = 8
    lp = fused_token_logprobs(hidden * 40, weight, labels, bias=bias, backend="native")
    z = (hidden.double() * 40) @ weight.double().t() + bias.double()
    ref = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != -100)
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-4)


def test_dispatch_uses_native_only_where_it_wins():
    cpu = torch.device("cpu")
    assert dispatch.select_backend(cpu, "auto", dispatch.NATIVE_MAX_HIDDEN) is native_cpu
    assert dispatch.select_backend(cpu, "auto", dispatch.NATIVE_MAX_HIDDEN + 1) is not native_cpu
    assert dispatch.select_backend(cpu, "torch", 8) is not native_cpu
    assert "built" in native_status()
