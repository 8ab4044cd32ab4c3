"""fused_pear_loss (chunked PyTorch path, native row pass) against the direct-loop oracle.

The expected values come from tests/oracle.py (float64 loops over the definitions, sharing no
code with pear_kernels); reference_pear_loss appears only as the same-dtype PyTorch baseline
of the 16-bit error rule and where a test is about reference_pear_loss itself."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from pear_kernels import PEARConfig, PEARLoss, fused_pear_loss, fused_token_logprobs, reference_pear_loss

from .conftest import leaf, make_problem
from .oracle import oracle_loss

# every test here runs on each CPU backend: chunked PyTorch, and the native row pass if built
pytestmark = pytest.mark.usefixtures("cpu_backend")

VARIANTS = ["token", "block", "sequence", "none"]
# wide delta clip so the log-ratios are not all clipped: gradients then depend on the weights
WIDE = dict(delta_clip=(-1.0, 1.0))


def run(fn, hidden, weight, labels, behavior, bias, upstream=None, **kw):
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    loss = fn(h, w, labels, behavior, bias=b, **kw)
    scalar = loss if upstream is None else (loss * upstream).sum()
    params = [h, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(scalar, params)
    return loss.detach(), [g.detach() for g in grads]


def oracle(hidden, weight, labels, behavior, bias=None, compute_dtype=None, **kw):
    """tests/oracle.py with reference_pear_loss's call shape (always float64 inside)."""
    return oracle_loss(hidden, weight, labels, behavior, bias=bias, **kw)[0]


def assert_matches(got, want, rtol, atol):
    (l1, g1), (l2, g2) = got, want
    torch.testing.assert_close(l1.to(l2.dtype), l2, rtol=rtol, atol=atol)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.to(b.dtype), b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, None])
def test_float64_matches_oracle_tightly(variant, reduction, chunk_size):
    hidden, weight, labels, behavior, bias = make_problem((3, 13), 24, 1001, torch.float64, bias=True, seed=1)
    kw = dict(variant=variant, block_size=3, reduction=reduction, temperature=0.9, **WIDE)
    up = torch.randn(labels.shape, dtype=torch.float64) if reduction == "none" else None
    got = run(fused_pear_loss, hidden, weight, labels, behavior, bias, up, chunk_size=chunk_size, **kw)
    want = run(oracle, hidden, weight, labels, behavior, bias, up, **kw)
    assert_matches(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk_size", [7, None])
def test_packed_rows_odd_shapes(variant, chunk_size):
    # N = 37 tokens packed into 4 segments of uneven length (one of length 1), H = 24, V = 1001
    hidden, weight, labels, behavior, _ = make_problem((37,), 24, 1001, torch.float64, seed=2, prompt=2)
    cu = torch.tensor([0, 1, 12, 30, 37])
    labels[12:14] = -100  # the next segment's prompt
    labels[30] = -100
    kw = dict(variant=variant, block_size=4, cu_seqlens=cu, **WIDE)
    got = run(fused_pear_loss, hidden, weight, labels, behavior, None, chunk_size=chunk_size, **kw)
    want = run(oracle, hidden, weight, labels, behavior, None, **kw)
    assert_matches(got, want, rtol=1e-10, atol=1e-12)
    # packing is not a no-op: one long sequence gives other weights (unless weights are trivial)
    if variant != "none":
        single = run(oracle, hidden, weight, labels, behavior, None, variant=variant, **WIDE)
        assert not torch.allclose(single[0], want[0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_equal_packed_segments(variant):
    hidden, weight, labels, behavior, _ = make_problem((4, 9), 16, 257, torch.float64, seed=3)
    rows = fused_pear_loss(hidden, weight, labels, behavior, variant=variant, chunk_size=5, **WIDE)
    packed = fused_pear_loss(
        hidden.view(36, 16), weight, labels.view(36), behavior.view(36),
        cu_seqlens=torch.tensor([0, 9, 18, 27, 36]), variant=variant, chunk_size=5, **WIDE,
    )
    torch.testing.assert_close(rows, packed, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_against_float64_truth(variant):
    args = make_problem((3, 21), 32, 1001, torch.float32, seed=4, bias=True)
    truth = run(oracle, *args, variant=variant, **WIDE)
    got = run(fused_pear_loss, *args, variant=variant, chunk_size=8, **WIDE)
    assert_matches(got, truth, rtol=2e-5, atol=2e-6)


def _max_err(result, truth):
    (loss, g), (lt, gt) = result, truth
    errs = [float((loss.double() - lt).abs() / lt.abs().clamp_min(1e-6))]
    errs += [float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(g, gt)]
    return errs


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_within_pytorch_error(variant, dtype):
    """Our error against float64 truth may not exceed the same-dtype PyTorch error + a margin."""
    args = make_problem((3, 21), 32, 1001, dtype, seed=5)
    truth = run(oracle, *args, variant=variant, **WIDE)
    ours = _max_err(run(fused_pear_loss, *args, variant=variant, chunk_size=8, **WIDE), truth)
    torch_same_dtype = _max_err(run(reference_pear_loss, *args, variant=variant, **WIDE), truth)
    for o, t in zip(ours, torch_same_dtype):
        assert o <= 1.5 * t + 2e-3, (ours, torch_same_dtype)


def test_none_variant_equals_cross_entropy():
    hidden, weight, labels, behavior, bias = make_problem((2, 17), 24, 500, torch.float64, seed=6, bias=True)
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    ours = fused_pear_loss(h, w, labels, behavior, bias=b, variant="none", chunk_size=6)
    g1 = torch.autograd.grad(ours, [h, w, b])
    h2, w2, b2 = leaf(hidden), leaf(weight), leaf(bias)
    ce = F.cross_entropy((h2 @ w2.t() + b2).view(-1, 500), labels.view(-1), ignore_index=-100)
    g2 = torch.autograd.grad(ce, [h2, w2, b2])
    torch.testing.assert_close(ours, ce, rtol=1e-12, atol=1e-12)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", ["token", "sequence"])
def test_gradient_accumulation_with_num_items_equals_one_batch(variant):
    hidden, weight, labels, behavior, _ = make_problem((4, 11), 16, 300, torch.float64, seed=7)
    total = int((labels != -100).sum())
    full = run(fused_pear_loss, hidden, weight, labels, behavior, None, variant=variant, **WIDE)
    w = leaf(weight)
    acc_loss = 0.0
    grad_w = torch.zeros_like(weight)
    for rows in (slice(0, 1), slice(1, 4)):
        h = leaf(hidden[rows])
        loss = fused_pear_loss(h, w, labels[rows], behavior[rows], variant=variant,
                               num_items_in_batch=torch.tensor(total), chunk_size=3, **WIDE)
        (gw,) = torch.autograd.grad(loss, [w])
        grad_w += gw
        acc_loss += float(loss)
    assert acc_loss == pytest.approx(float(full[0]), rel=1e-12)
    torch.testing.assert_close(grad_w, full[1][1], rtol=1e-10, atol=1e-13)


def test_upstream_scale_and_module():
    hidden, weight, labels, behavior, _ = make_problem((2, 9), 16, 100, torch.float64, seed=8)
    h = leaf(hidden)
    (3.0 * fused_pear_loss(h, weight, labels, behavior)).backward()
    h2 = leaf(hidden)
    (3.0 * oracle(h2, weight, labels, behavior)).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-10, atol=1e-13)
    mod = PEARLoss(PEARConfig(variant="block"), chunk_size=2, block_size=2)
    assert mod.config.block_size == 2
    torch.testing.assert_close(
        mod(hidden, weight, labels, behavior),
        oracle(hidden, weight, labels, behavior, variant="block", block_size=2),
        rtol=1e-12, atol=1e-12,
    )


def test_all_masked_gives_zero_loss_and_zero_grads():
    hidden, weight, labels, behavior, bias = make_problem((2, 5), 8, 50, torch.float32, bias=True)
    labels[:] = -100
    for reduction in ("mean", "sum"):
        loss, grads = run(fused_pear_loss, hidden, weight, labels, behavior, bias, reduction=reduction)
        assert loss.item() == 0.0 and all((g == 0).all() for g in grads)
    loss, stats = fused_pear_loss(hidden, weight, labels, behavior, return_stats=True)
    assert stats.num_tokens == 0 and torch.isfinite(stats.ess)


@pytest.mark.parametrize("variant", VARIANTS)
def test_huge_log_ratios_give_finite_results(variant):
    hidden, weight, labels, behavior, _ = make_problem((2, 30), 8, 50, torch.float32, seed=9)
    big = torch.where(torch.arange(60).view(2, 30) % 2 == 0, torch.tensor(-1e4), torch.tensor(-1e-3))
    loss, grads = run(
        fused_pear_loss, hidden * 50, weight, labels, big, None, variant=variant,
        delta_clip=(-1e5, 1e5), chunk_size=7,
    )
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    truth = run(oracle, hidden * 50, weight, labels, big, None, variant=variant, delta_clip=(-1e5, 1e5))
    assert_matches((loss, grads), truth, rtol=1e-4, atol=1e-5)


def test_length_one_sequences_and_no_grad():
    hidden, weight, labels, behavior, _ = make_problem((5, 1), 8, 40, torch.float64, prompt=0, gaps=False, pad_last=0)
    for variant in VARIANTS:
        got = fused_pear_loss(hidden, weight, labels, behavior, variant=variant)
        want = oracle(hidden, weight, labels, behavior, variant=variant)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        out = fused_pear_loss(leaf(hidden), leaf(weight), labels, behavior)
    assert not out.requires_grad


@pytest.mark.parametrize("variant", VARIANTS)
def test_stats_match_oracle(variant):
    hidden, weight, labels, behavior, _ = make_problem((3, 12), 16, 200, torch.float64, seed=10)
    _, s1 = fused_pear_loss(hidden, weight, labels, behavior, variant=variant, return_stats=True, chunk_size=4)
    _, s2 = reference_pear_loss(hidden, weight, labels, behavior, variant=variant, return_stats=True)
    _, oracle_weights = oracle_loss(hidden, weight, labels, behavior, variant=variant)
    torch.testing.assert_close(s1.weights.double(), oracle_weights, rtol=1e-6, atol=1e-7)
    for name in ("token_logprobs", "log_weights", "weights", "mean_weight", "ess", "ess_per_sequence",
                 "ratio_clip_fraction", "weight_clip_fraction"):
        torch.testing.assert_close(getattr(s1, name), getattr(s2, name), rtol=1e-6, atol=1e-7)
    assert torch.equal(s1.mask, labels != -100)
    assert s1.num_tokens == int((labels != -100).sum())
    # masked positions carry zeros; the ESS of a sequence lies in [1, T]
    assert (s1.weights[~s1.mask] == 0).all()
    T = (labels != -100).sum(1).float()
    assert ((s1.ess_per_sequence >= 1 - 1e-5) & (s1.ess_per_sequence <= T + 1e-5)).all()
    expected = {"pear/mean_weight", "pear/ess"} | ({"pear/ratio_clip_fraction"} if variant != "none" else set())
    assert set(s1.scalars()) >= expected


def test_chunking_does_not_change_results():
    hidden, weight, labels, behavior, _ = make_problem((2, 23), 16, 300, torch.float32, seed=11)
    base = run(fused_pear_loss, hidden, weight, labels, behavior, None, variant="block", block_size=4,
               chunk_size=1000, **WIDE)
    for cs in (1, 3, 4, 6, 17):
        other = run(fused_pear_loss, hidden, weight, labels, behavior, None, variant="block", block_size=4,
                    chunk_size=cs, **WIDE)
        assert_matches(other, base, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("needs", list(itertools.product([True, False], repeat=2)))
def test_partial_requires_grad(needs):
    hidden, weight, labels, behavior, _ = make_problem((2, 7), 8, 30, torch.float64)
    h = hidden.clone().requires_grad_(needs[0])
    w = weight.clone().requires_grad_(needs[1])
    loss = fused_pear_loss(h, w, labels, behavior)
    if any(needs):
        loss.backward()
        h2, w2 = leaf(hidden), leaf(weight)
        oracle(h2, w2, labels, behavior).backward()
        if needs[0]:
            torch.testing.assert_close(h.grad, h2.grad)
        if needs[1]:
            torch.testing.assert_close(w.grad, w2.grad)


def test_autocast_region_runs_in_autocast_dtype():
    hidden, weight, labels, behavior, bias = make_problem((2, 9), 16, 100, torch.float32, bias=True, seed=12)
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_pear_loss(h, w, labels, behavior, bias=b, **WIDE)
        lp = fused_token_logprobs(h, w, labels, bias=b)
    loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    # same as casting to bf16 by hand, outside autocast
    h2, w2, b2 = (leaf(t.to(torch.bfloat16)) for t in (hidden, weight, bias))
    want = fused_pear_loss(h2, w2, labels, behavior, bias=b2, **WIDE)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(h.grad, h2.grad.float())
    assert lp.dtype == torch.float32


def test_in_place_change_before_recompute_backward_is_caught():
    hidden, weight, labels, behavior, _ = make_problem((2, 7), 8, 30, torch.float64)
    h = leaf(hidden)
    x = h * 1.0
    loss = fused_pear_loss(x, weight, labels, behavior, reduction="none")
    x.add_(1.0)  # the recompute pass would read changed hidden states
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


def test_chunk_budget_sets_the_rows_and_keeps_the_result(monkeypatch):
    """set_chunk_budget / PEAR_KERNELS_CHUNK_MIB choose the chunk rows (the loss and gradients
    do not change, only how many chunks compute them); bad budgets name the setting."""
    import pear_kernels
    from pear_kernels.inputs import chunk_budget
    from pear_kernels.kernels import backend as kb
    from pear_kernels.kernels import torch_chunked

    g = torch.Generator().manual_seed(3)
    h = torch.randn(40, 8, generator=g, dtype=torch.float64)
    w = torch.randn(1000, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 1000, (40,), generator=g)
    lb = -torch.rand(40, generator=g, dtype=torch.float64)
    seen = []
    real = torch_chunked.forward

    def spy(problem, *a, **k):
        seen.append(problem.rows())
        return real(problem, *a, **k)

    monkeypatch.setattr(torch_chunked, "forward", spy)
    monkeypatch.delenv("PEAR_KERNELS_CHUNK_MIB", raising=False)
    out = {}
    try:
        for name, mib in (("default", None), ("small", 0.02), ("env", "0.05")):
            if name == "env":
                pear_kernels.set_chunk_budget(None)
                monkeypatch.setenv("PEAR_KERNELS_CHUNK_MIB", mib)
            else:
                pear_kernels.set_chunk_budget(mib)
            hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
            loss = fused_pear_loss(hh, ww, y, lb, backend="torch", variant="sequence")
            loss.backward()
            out[name] = (loss.detach(), hh.grad, ww.grad)
    finally:
        pear_kernels.set_chunk_budget(None)
    # a row of the buffer is V * 4 bytes = 4000 here
    assert seen[0] == kb.default_chunk_size(1000, 8) == min(kb.MAX_CHUNK_ROWS, kb.CHUNK_BUDGET_BYTES // 4000)
    assert seen[1] == int(0.02 * 2**20) // 4000 == 5 and seen[2] == int(0.05 * 2**20) // 4000 == 13
    for name in ("small", "env"):
        for a, b in zip(out[name], out["default"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    monkeypatch.setenv("PEAR_KERNELS_CHUNK_MIB", "lots")
    with pytest.raises(ValueError, match="PEAR_KERNELS_CHUNK_MIB"):
        chunk_budget()
    with pytest.raises(ValueError, match="chunk budget"):
        pear_kernels.set_chunk_budget(-1)
