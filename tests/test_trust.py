"""Off the happy path: the autograd contract, sequence isolation, 16-bit logits, bad arguments.

Every expected value comes from tests/oracle.py (direct loops over the definitions, float64),
which shares no code with pear_kernels.
"""

from __future__ import annotations

import math

import pytest
import torch

from pear_kernels import PEARConfig, fused_pear_loss, fused_token_logprobs, reference_pear_loss
from pear_kernels.kernels import native_cpu, torch_chunked

from .oracle import oracle_loss

BACKENDS = ["torch"] + (["native"] if native_cpu.available() else [])


def _packed(n=23, h=12, v=37, seed=0, dtype=torch.float64, cuts=(0, 9, 16, 23)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 1, 10, 12]] = -100  # prompts and a gap inside a sequence
    behavior = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    cu = torch.tensor(cuts)
    return hidden, weight, labels, behavior, cu


# ------------------------------------------------------------------------------------------
# the oracle itself: the fused loss agrees with it, values and gradients, on every backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["token", "block", "sequence", "none"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_fused_matches_direct_loop_oracle(backend, variant, chunk_size):
    hidden, weight, labels, behavior, cu = _packed()
    bias = torch.randn(weight.shape[0], dtype=torch.float64)
    kw = dict(variant=variant, block_size=3, cu_seqlens=cu, temperature=0.7)
    h1 = hidden.clone().requires_grad_(True)
    w1 = weight.clone().requires_grad_(True)
    b1 = bias.clone().requires_grad_(True)
    loss = fused_pear_loss(h1, w1, labels, behavior, bias=b1, chunk_size=chunk_size, backend=backend, **kw)
    loss.backward()
    h2 = hidden.clone().requires_grad_(True)
    w2 = weight.clone().requires_grad_(True)
    b2 = bias.clone().requires_grad_(True)
    ref, _ = oracle_loss(h2, w2, labels, behavior, bias=b2, **kw)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in ((h1.grad, h2.grad), (w1.grad, w2.grad), (b1.grad, b2.grad)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------
# 1. the autograd contract


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_second_backward_through_retained_graph(backend, reduction):
    hidden, weight, labels, behavior, cu = _packed(dtype=torch.float32)
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(True)
    loss = fused_pear_loss(h, w, labels, behavior, cu_seqlens=cu, reduction=reduction, backend=backend)
    if reduction == "none":
        loss = (loss * torch.linspace(0.5, 2.0, loss.numel())).sum()
    loss.backward(retain_graph=True)
    gh, gw = h.grad.clone(), w.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * gh)
    torch.testing.assert_close(w.grad, 2 * gw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_grad_then_backward_fills_weight_grad(backend):
    hidden, weight, labels, behavior, cu = _packed(dtype=torch.float32)
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(True)
    loss = fused_pear_loss(h, w, labels, behavior, cu_seqlens=cu, backend=backend)
    (gh,) = torch.autograd.grad(loss, h, retain_graph=True)
    loss.backward()
    assert w.grad is not None and h.grad is not None
    torch.testing.assert_close(h.grad, gh)
    w64 = weight.detach().double().requires_grad_(True)
    ref, _ = oracle_loss(hidden.detach(), w64, labels, behavior, cu_seqlens=cu)
    ref.backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_second_backward(backend):
    hidden, weight, labels, _, _ = _packed(dtype=torch.float32)
    h = hidden.requires_grad_(True)
    logp = fused_token_logprobs(h, weight, labels, backend=backend)
    s = logp.sum()
    s.backward(retain_graph=True)
    g = h.grad.clone()
    s.backward()
    torch.testing.assert_close(h.grad, 2 * g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["mean", "sum", "none", "token_logprobs"])
def test_double_backward_raises(backend, op):
    hidden, weight, labels, behavior, cu = _packed(dtype=torch.float32)
    h = hidden.requires_grad_(True)
    if op == "token_logprobs":
        loss = fused_token_logprobs(h, weight, labels, backend=backend).sum()
    else:
        loss = fused_pear_loss(h, weight, labels, behavior, cu_seqlens=cu, reduction=op, backend=backend).sum()
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss, h, create_graph=True)
    # a gradient penalty written the other way round (backward with create_graph) too
    with pytest.raises(RuntimeError, match="differentiable once"):
        loss.backward(create_graph=True)


class _CountingSink(torch_chunked.GradSink):
    made = 0

    def __init__(self, *a, **k):
        type(self).made += 1
        super().__init__(*a, **k)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_input_requires_grad"])
def test_no_gradient_work_without_grad(monkeypatch, mode):
    monkeypatch.setattr(torch_chunked, "GradSink", _CountingSink)
    _CountingSink.made = 0
    hidden, weight, labels, behavior, cu = _packed(dtype=torch.float32)
    if mode != "no_input_requires_grad":
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode)
    with ctx() if ctx else torch.enable_grad():
        loss = fused_pear_loss(hidden, weight, labels, behavior, cu_seqlens=cu, backend="torch")
    assert _CountingSink.made == 0
    ref, _ = oracle_loss(hidden.detach(), weight.detach(), labels, behavior, cu_seqlens=cu)
    assert abs(float(loss) - float(ref)) < 1e-5
    # and with grad enabled the same call does the gradient work
    hidden.requires_grad_(True)
    fused_pear_loss(hidden, weight, labels, behavior, cu_seqlens=cu, backend="torch")
    assert _CountingSink.made == 1


# ------------------------------------------------------------------------------------------
# 16-bit inputs: logits reach the softmax in fp32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_logits_are_not_rounded_before_softmax(backend, dtype):
    g = torch.Generator().manual_seed(3)
    n, h, v = 40, 64, 300
    # logits of magnitude ~30: rounding them to 16 bits moves log-probs by ~0.1
    hidden = (torch.randn(n, h, generator=g) * 0.8).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.8).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    behavior = -torch.rand(n, generator=g) * 3
    logp = fused_token_logprobs(hidden, weight, labels, backend=backend)
    # truth from the very same 16-bit input values, computed in float64
    z = hidden.double() @ weight.double().t()
    truth = torch.log_softmax(z, -1).gather(1, labels[:, None]).squeeze(1)
    err = (logp.double() - truth).abs().max().item()
    # fp32 accumulation of exact 16-bit products: ~1e-5; a 16-bit logit would be off by ~1e-1
    assert err < 1e-3, err
    loss = fused_pear_loss(hidden, weight, labels, behavior, variant="none", backend=backend)
    assert abs(float(loss) - float(-truth.mean())) < 1e-3


# ------------------------------------------------------------------------------------------
# 2. sequences never influence each other


def _poison(hidden, behavior, kind, seq):
    """Put a non-finite / huge value into one sequence's hidden state or log-ratio."""
    h, b = hidden.clone(), behavior.clone()
    pos = {1: 13, 2: 20}[seq]
    if kind == "nan_hidden":
        h[pos] = float("nan")
    elif kind == "inf_hidden":
        h[pos, 0] = float("inf")
    elif kind == "huge_ratio":
        b[pos] = -1e30
    elif kind == "nan_behavior_free":  # -inf behavior: an infinite log-ratio, valid input
        b[pos] = float("-inf")
    return h, b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["nan_hidden", "inf_hidden", "huge_ratio", "nan_behavior_free"])
@pytest.mark.parametrize("chunk_size", [None, 3, 6, 7])
@pytest.mark.parametrize("variant", ["token", "block", "sequence"])
def test_poison_in_one_sequence_stays_there(backend, kind, chunk_size, variant):
    hidden, weight, labels, behavior, cu = _packed(dtype=torch.float32)
    kw = dict(cu_seqlens=cu, variant=variant, block_size=2, reduction="none", chunk_size=chunk_size,
              backend=backend, delta_clip=(-math.inf, math.inf))
    h_clean = hidden.clone().requires_grad_(True)
    clean = fused_pear_loss(h_clean, weight, labels, behavior, **kw)
    clean.sum().backward()
    hp, bp = _poison(hidden, behavior, kind, seq=1)  # sequence 1 = tokens [9, 16)
    h_bad = hp.requires_grad_(True)
    bad = fused_pear_loss(h_bad, weight, labels, bp, **kw)
    bad.sum().backward()
    others = torch.cat([torch.arange(0, 9), torch.arange(16, 23)])
    torch.testing.assert_close(bad[others], clean[others], rtol=0, atol=0)
    torch.testing.assert_close(h_bad.grad[others], h_clean.grad[others], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["nan_hidden", "inf_hidden", "huge_ratio"])
@pytest.mark.parametrize("chunk_size", [None, 5, 7])
@pytest.mark.parametrize("variant", ["token", "block", "sequence"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_poison_in_one_row_of_a_batch(backend, kind, chunk_size, variant, reduction):
    """(B, T) rows are sequences: a NaN/inf hidden state or a 1e30 log-ratio in row 1 leaves
    rows 0 and 2 (their losses and their hidden-state gradients) bit for bit as they were.
    Both gradient paths: saved in forward ("sum") and recomputed in backward ("none")."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 8, 6, generator=g)
    weight = torch.randn(11, 6, generator=g)
    labels = torch.randint(0, 11, (3, 8), generator=g)
    labels[:, 0] = -100
    behavior = -torch.rand(3, 8, generator=g)
    kw = dict(variant=variant, block_size=3, backend=backend, chunk_size=chunk_size,
              delta_clip=(-math.inf, math.inf))
    hp, bp = hidden.clone(), behavior.clone()
    if kind == "nan_hidden":
        hp[1, 6] = float("nan")
    elif kind == "inf_hidden":
        hp[1, 6, 0] = float("inf")
    else:
        bp[1, 6] = -1e30

    def run(h, b):
        h = h.clone().requires_grad_(True)
        per_token = fused_pear_loss(h, weight, labels, b, reduction="none", **kw)
        h2 = h.detach().clone().requires_grad_(True)
        loss = fused_pear_loss(h2, weight, labels, b, reduction=reduction, **kw)
        (loss if reduction == "sum" else (loss * torch.linspace(0.5, 1.5, 24).view(3, 8)).sum()).backward()
        return per_token.detach(), h2.grad

    clean, g_clean = run(hidden, behavior)
    bad, g_bad = run(hp, bp)
    torch.testing.assert_close(bad[[0, 2]], clean[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(g_bad[[0, 2]], g_clean[[0, 2]], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["token", "block", "sequence"])
def test_unbounded_delta_clip_with_minus_inf_behavior_is_finite(backend, variant):
    hidden, weight, labels, behavior, cu = _packed()
    behavior = behavior.clone()
    behavior[14] = float("-inf")
    kw = dict(cu_seqlens=cu, variant=variant, block_size=2, delta_clip=(-math.inf, math.inf), reduction="none")
    out = fused_pear_loss(hidden, weight, labels, behavior, backend=backend, **kw)
    ref, wts = oracle_loss(hidden, weight, labels, behavior, **kw)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------
# 5. arguments: clear errors that name the argument


def _args():
    hidden, weight, labels, behavior, cu = _packed(dtype=torch.float32)
    return hidden, weight, labels, behavior


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 0, -3, torch.tensor([4.0, 5.0])])
def test_num_items_in_batch_refused(bad):
    with pytest.raises((ValueError, TypeError), match="num_items_in_batch"):
        fused_pear_loss(*_args(), num_items_in_batch=bad)


def test_ignore_index_none_refused():
    with pytest.raises(TypeError, match="ignore_index"):
        fused_pear_loss(*_args(), ignore_index=None)


def test_config_as_dict_is_accepted():
    a = fused_pear_loss(*_args(), config={"variant": "block", "block_size": 2})
    b = fused_pear_loss(*_args(), config=PEARConfig(variant="block", block_size=2))
    assert float(a) == float(b)
    with pytest.raises(TypeError, match="config"):
        fused_pear_loss(*_args(), config={"varient": "block"})
    with pytest.raises(TypeError, match="config"):
        fused_pear_loss(*_args(), config=["token"])


def test_block_size_beyond_int64_refused():
    with pytest.raises(ValueError, match="block_size"):
        fused_pear_loss(*_args(), variant="block", block_size=2**70)


def test_overflowing_log_weight_clip_refused():
    with pytest.raises(ValueError, match="log_weight_clip"):
        fused_pear_loss(*_args(), log_weight_clip=(-10.0, 200.0))
    with pytest.raises(ValueError, match="log_weight_clip"):
        reference_pear_loss(*_args(), log_weight_clip=(-10.0, math.inf))


def test_tiny_temperature_refused():
    with pytest.raises(ValueError, match="temperature"):
        fused_pear_loss(*_args(), temperature=1e-40)


def test_token_logprobs_labels_list_named():
    hidden, weight, labels, _ = _args()
    with pytest.raises(TypeError, match="labels"):
        fused_token_logprobs(hidden, weight, labels.tolist())


def test_reference_sends_no_gradient_into_behavior():
    hidden, weight, labels, behavior = _args()
    behavior = behavior.clone().requires_grad_(True)
    loss = reference_pear_loss(hidden.requires_grad_(True), weight, labels, behavior)
    loss.backward()
    assert behavior.grad is None


def test_stats_of_plain_sft_have_no_clip_fractions():
    _, stats = fused_pear_loss(*_args(), variant="none", return_stats=True)
    s = stats.scalars()
    assert "pear/ratio_clip_fraction" not in s and "pear/weight_clip_fraction" not in s
    assert s["pear/mean_weight"] == 1.0
    _, stats = fused_pear_loss(*_args(), variant="token", return_stats=True)
    assert "pear/ratio_clip_fraction" in stats.scalars()


def test_check_values_switch_skips_only_value_checks():
    hidden, weight, labels, behavior = _args()
    bad = behavior.clone()
    bad[(labels != -100).nonzero()[0]] = float("nan")
    with pytest.raises(ValueError, match="behavior_logprobs"):
        fused_pear_loss(hidden, weight, labels, bad)
    out = fused_pear_loss(hidden, weight, labels, bad, check_values=False, reduction="none", variant="sequence")
    assert torch.isnan(out).any()  # the caller's promise, not a silent clean number
    with pytest.raises(ValueError, match="labels must have shape"):
        fused_pear_loss(hidden, weight, labels[:-1], behavior[:-1], check_values=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisations are a CUDA matter")
def test_host_synchronisations_per_call_stay_within_the_documented_budget():
    """docs/triton_backend.md ("Host synchronisations"): with check_values=False a loss call
    synchronises for the supervised-token layout (its size sets the chunking) and, with a
    tensor num_items_in_batch, to read it; none per chunk, none in backward."""
    import warnings

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g).to(dev).requires_grad_(True)
    w = torch.randn(50, 32, generator=g).to(dev).requires_grad_(True)
    y = torch.randint(0, 50, (64,), generator=g).to(dev)
    y[::7] = -100
    lb = -torch.rand(64, generator=g).to(dev)
    fused_pear_loss(h, w, y, lb, backend="torch", check_values=False).backward()  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss = fused_pear_loss(h, w, y, lb, backend="torch", chunk_size=8, check_values=False,
                                   num_items_in_batch=torch.tensor(40.0, device=dev))
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [m for m in seen if "synchroniz" in str(m.message).lower()]
    assert len(syncs) <= 4, [str(m.message) for m in syncs]
