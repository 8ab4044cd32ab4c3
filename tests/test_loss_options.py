"""Loss options the peers have (softcap, z-loss, label smoothing, return_lse, shift), against
the direct-loop oracle (tests/oracle.py), values and gradients, and the backends' contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pear_kernels import fused_pear_loss

from .oracle import oracle_loss


def _problem(seed=0, n=21, h=10, v=29, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype) * 2
    weight = torch.randn(v, h, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(v, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 7, 8]] = -100
    behavior = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    return hidden, weight, bias, labels, behavior, torch.tensor([0, 9, n])


OPTIONS = [
    dict(softcap=3.0),
    dict(lse_square_scale=1e-2),
    dict(label_smoothing=0.1),
    dict(softcap=2.5, lse_square_scale=3e-3, label_smoothing=0.2),
]


def _native_with_options():
    from pear_kernels.kernels import native_cpu

    if not native_cpu.supports_options():
        pytest.skip("the native extension is not built (or predates the loss options)")


def _triton_interpreted():
    """Triton's kernels run on CPU tensors only under its interpreter (tests/conftest.py sets
    TRITON_INTERPRET=1 before anything imports triton on machines without CUDA)."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 before triton is imported")
    import triton.language
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.zeros, InterpretedFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")


def _backend_available(backend):
    if backend == "native":
        _native_with_options()
    elif backend == "triton":
        _triton_interpreted()


CPU_BACKENDS = ["torch", "native"]
ALL_BACKENDS = ["torch", "native", "triton"]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "+".join(o))
@pytest.mark.parametrize("variant", ["token", "sequence", "none"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_options_match_oracle(opts, variant, reduction, backend):
    if backend == "native":
        _native_with_options()
    hidden, weight, bias, labels, behavior, cu = _problem()
    kw = dict(variant=variant, cu_seqlens=cu, temperature=0.8, reduction=reduction, **opts)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = fused_pear_loss(leaves[0], leaves[1], labels, behavior, bias=leaves[2], chunk_size=4,
                           backend=backend, **kw)
    up = torch.linspace(0.3, 1.7, loss.numel()).reshape(loss.shape).double() if reduction == "none" else 1.0
    (loss * up).sum().backward()
    ref_leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    ref, _ = oracle_loss(ref_leaves[0], ref_leaves[1], labels, behavior, bias=ref_leaves[2], **kw)
    (ref * up).sum().backward()
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-11)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "+".join(o))
@pytest.mark.parametrize("variant,reduction", [("token", "none"), ("sequence", "mean")])
def test_options_match_oracle_triton(opts, variant, reduction):
    """The Triton option kernels (triton_options) under the interpreter, float32 (the Triton
    backend hands float64 to the PyTorch path); sequence with chunk 8 < 19 tokens takes the
    log-prob pre-pass, token/none the recompute backward with per-token upstream factors."""
    _triton_interpreted()
    hidden, weight, bias, labels, behavior, cu = _problem()
    kw = dict(variant=variant, cu_seqlens=cu, temperature=0.8, reduction=reduction, **opts)
    leaves = [t.float().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = fused_pear_loss(leaves[0], leaves[1], labels, behavior, bias=leaves[2], chunk_size=8,
                           backend="triton", **kw)
    up = torch.linspace(0.3, 1.7, loss.numel()).reshape(loss.shape) if reduction == "none" else 1.0
    (loss * up).sum().backward()
    ref_leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    ref, _ = oracle_loss(ref_leaves[0], ref_leaves[1], labels, behavior, bias=ref_leaves[2], **kw)
    (ref * up).sum().backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_softcap_tanh_precision_over_its_range(backend):
    """Each backend's tanh (torch.tanh; a rational approximation in the C++ pass; an exp form
    with a Taylor branch below 1/16 in Triton) against float64 on logits chosen to cross every
    branch: r / c from 1e-7 through the series cut and the rational's clamp to saturation, both
    signs, and a -inf logit. H = 1 and hidden = 1, so the logits are the weight column itself
    and dW is d loss / d r column by column (the softcap derivative 1 - tanh^2 per column)."""
    _backend_available(backend)
    c = 7.0
    ratios = [1e-7, 3e-4, 5e-4, 0.02, 0.06, 0.0626, 0.07, 0.3, 1.0, 2.5, 7.0, 7.95, 12.0]
    cols = [x for r in ratios for x in (r * c, -r * c)] + [0.0]
    w64 = torch.tensor(cols, dtype=torch.float64)[:, None]
    w64[-1] = float("-inf")
    n = 6
    h64 = torch.ones(n, 1, dtype=torch.float64)
    labels = torch.arange(n) * 3
    behavior = -torch.ones(n, dtype=torch.float64)
    opts = dict(softcap=c, label_smoothing=0.3, lse_square_scale=0.05, variant="none")
    w = w64.float().requires_grad_(True)
    loss = fused_pear_loss(h64.float(), w, labels, behavior, backend=backend, **opts)
    loss.backward()
    w_ref = w64.clone().requires_grad_(True)
    ref, _ = oracle_loss(h64, w_ref, labels, behavior, **opts)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w_ref.grad, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_label_smoothing_plain_sft_equals_torch_cross_entropy(backend):
    _backend_available(backend)
    hidden, weight, _, labels, behavior, _ = _problem(dtype=torch.float32)
    ours = fused_pear_loss(hidden, weight, labels, behavior, variant="none", label_smoothing=0.15,
                           backend=backend)
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, label_smoothing=0.15)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_z_loss_and_lse_returned_apart(backend):
    _backend_available(backend)
    hidden, weight, _, labels, behavior, _ = _problem()
    if backend == "triton":
        hidden, weight = hidden.float(), weight.float()
    loss, z, lse = fused_pear_loss(hidden, weight, labels, behavior, lse_square_scale=0.01,
                                   return_z_loss=True, return_lse=True, backend=backend)
    plain = fused_pear_loss(hidden, weight, labels, behavior, backend=backend)
    # return_lse alone (no option): the same logsumexp, the loss unchanged
    plain2, lse2 = fused_pear_loss(hidden, weight, labels, behavior, return_lse=True, backend=backend)
    torch.testing.assert_close(plain2, plain)
    torch.testing.assert_close(lse2, lse)
    mask = labels != -100
    want_lse = torch.logsumexp(hidden.double() @ weight.double().t(), -1)
    torch.testing.assert_close(lse[mask].double(), want_lse[mask], rtol=1e-6, atol=1e-6)
    assert (lse[~mask] == 0).all()
    want_z = 0.01 * (want_lse[mask] ** 2).mean()
    tol = dict(rtol=1e-5, atol=1e-6) if backend == "triton" else {}
    torch.testing.assert_close(z.double(), want_z, **tol)
    torch.testing.assert_close(loss.double(), plain.double() + want_z, **tol)
    # with stats too: (loss, z, stats) in that order
    out = fused_pear_loss(hidden, weight, labels, behavior, lse_square_scale=0.01, return_z_loss=True,
                          return_stats=True, backend=backend)
    assert len(out) == 3 and hasattr(out[2], "ess")


@pytest.mark.parametrize("packed", [False, True])
def test_shift_equals_shifting_by_hand(packed):
    g = torch.Generator().manual_seed(5)
    if packed:
        hidden = torch.randn(13, 6, generator=g, dtype=torch.float64)
        ids = torch.randint(0, 17, (13,), generator=g)
        cu = torch.tensor([0, 5, 13])
        beh = -torch.rand(13, generator=g, dtype=torch.float64)
        # by hand: inside each segment, position i predicts i + 1
        h_hand = torch.cat([hidden[0:4], hidden[5:12]])
        y_hand = torch.cat([ids[1:5], ids[6:13]])
        b_hand = torch.cat([beh[1:5], beh[6:13]])
        cu_hand = torch.tensor([0, 4, 11])
    else:
        hidden = torch.randn(2, 7, 6, generator=g, dtype=torch.float64)
        ids = torch.randint(0, 17, (2, 7), generator=g)
        cu = None
        beh = -torch.rand(2, 7, generator=g, dtype=torch.float64)
        h_hand, y_hand, b_hand, cu_hand = hidden[:, :-1], ids[:, 1:], beh[:, 1:], None
    weight = torch.randn(17, 6, generator=g, dtype=torch.float64)
    ours = fused_pear_loss(hidden, weight, ids, beh, cu_seqlens=cu, shift=True)
    hand = fused_pear_loss(h_hand.contiguous(), weight, y_hand, b_hand, cu_seqlens=cu_hand)
    torch.testing.assert_close(ours, hand)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_options_16bit_and_float32_against_float64_oracle(backend, dtype):
    """Gemma's softcap 30 with logits large enough to saturate tanh (the C++ pass uses a
    rational tanh in float, the Triton kernel an exp form), plus z-loss and smoothing, 16-bit
    and fp32 inputs; the expected values are the float64 oracle on the same (rounded) inputs."""
    _backend_available(backend)
    hidden, weight, bias, labels, behavior, cu = _problem(seed=3, n=37, h=16, v=61)
    hidden = hidden * 6  # raw logits up to ~100: tanh(r / 30) saturates on many columns
    hidden, weight, bias = (t.to(dtype) for t in (hidden, weight, bias))
    opts = dict(softcap=30.0, lse_square_scale=1e-3, label_smoothing=0.1, variant="block", block_size=3,
                cu_seqlens=cu)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = fused_pear_loss(leaves[0], leaves[1], labels, behavior, bias=leaves[2], chunk_size=5,
                           backend=backend, **opts)
    loss.backward()
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    ref, _ = oracle_loss(ref_leaves[0], ref_leaves[1], labels, behavior, bias=ref_leaves[2], **opts)
    ref.backward()
    assert loss.dtype == torch.float32
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss.double(), ref, **tol)
    for a, b in zip(leaves, ref_leaves):
        assert a.grad.dtype == dtype
        scale = b.grad.abs().max()
        torch.testing.assert_close(a.grad.double() / scale, b.grad / scale, **tol)


def test_native_build_without_options_auto_falls_back_and_forced_is_refused(monkeypatch):
    """An extension built from an older csrc/ lacks the option passes: "auto" must not pick it
    for an option, and a forced backend='native' must say which options it lacks."""
    from pear_kernels.kernels import native_cpu, torch_chunked
    from pear_kernels.ops import dispatch

    if not native_cpu.available():
        pytest.skip("the native extension is not built")
    monkeypatch.setattr(native_cpu, "supports_options", lambda: False)
    assert dispatch.select_backend("cpu", "auto", 10, options=True) is torch_chunked
    assert dispatch.select_backend("cpu", "auto", 10, options=False) is native_cpu
    hidden, weight, _, labels, behavior, _ = _problem(dtype=torch.float32)
    with pytest.raises(ValueError, match="softcap"):
        fused_pear_loss(hidden, weight, labels, behavior, softcap=30.0, backend="native")
    got = fused_pear_loss(hidden, weight, labels, behavior, softcap=30.0)
    want, _ = oracle_loss(hidden, weight, labels, behavior, softcap=30.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw,name", [
    (dict(softcap=0.0), "softcap"), (dict(softcap=float("nan")), "softcap"),
    (dict(lse_square_scale=-1.0), "lse_square_scale"), (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(label_smoothing="0.1"), "label_smoothing"),
])
def test_bad_option_values_are_named(kw, name):
    hidden, weight, _, labels, behavior, _ = _problem(dtype=torch.float32)
    with pytest.raises((ValueError, TypeError), match=name):
        fused_pear_loss(hidden, weight, labels, behavior, **kw)


def test_16bit_inputs_return_float32():
    hidden, weight, _, labels, behavior, _ = _problem(dtype=torch.bfloat16)
    assert fused_pear_loss(hidden, weight, labels, behavior).dtype == torch.float32
    assert fused_pear_loss(hidden, weight, labels, behavior, softcap=5.0).dtype == torch.float32


def test_reference_loss_takes_the_same_options():
    from pear_kernels import reference_pear_loss

    hidden, weight, bias, labels, behavior, cu = _problem()
    opts = dict(softcap=2.0, lse_square_scale=0.01, label_smoothing=0.1, variant="block", block_size=2)
    ref = reference_pear_loss(hidden, weight, labels, behavior, bias=bias, cu_seqlens=cu, **opts)
    want, _ = oracle_loss(hidden, weight, labels, behavior, bias=bias, cu_seqlens=cu, **opts)
    torch.testing.assert_close(ref, want)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_token_logprobs_and_entropy_with_softcap_against_autograd(backend):
    """fused_token_logprobs(softcap=...): log-probs and entropies of the capped distribution,
    and the gradients of a loss using both (an RL policy term plus an entropy bonus), against
    float64 autograd on materialised capped logits."""
    from pear_kernels import fused_token_logprobs

    _backend_available(backend)
    hidden, weight, bias, labels, _, _ = _problem(seed=7, n=13, h=6, v=23)
    hidden = hidden * 3
    dtype = torch.float32 if backend == "triton" else torch.float64
    leaves = [t.detach().to(dtype).clone().requires_grad_(True) for t in (hidden, weight, bias)]
    lp, ent = fused_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], softcap=4.0, temperature=0.7,
                                   return_entropy=True, chunk_size=5, backend=backend)
    g = torch.linspace(-1.0, 1.0, labels.numel(), dtype=dtype)
    ((lp * g).sum() + 0.3 * ent.sum()).backward()

    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    h, w, b = ref_leaves
    mask = labels != -100
    z = 4.0 * torch.tanh((h @ w.t() + b) / 4.0) / 0.7
    logp_all = torch.log_softmax(z, -1)
    want_lp = torch.where(mask, logp_all.gather(1, labels.clamp(min=0)[:, None]).squeeze(1), 0.0)
    want_ent = torch.where(mask, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    ((want_lp * g.double()).sum() + 0.3 * want_ent.sum()).backward()
    tol = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(lp.double(), want_lp, **tol)
    torch.testing.assert_close(ent.double(), want_ent, **tol)
    for a, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), r.grad, **tol)
    # log-probs alone: the plain recompute backward (no entropy term)
    for t in leaves:
        t.grad = None
    lp = fused_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], softcap=4.0, temperature=0.7,
                              chunk_size=5, backend=backend)
    (lp * g).sum().backward()
    for t in ref_leaves:
        t.grad = None
    z = 4.0 * torch.tanh((h @ w.t() + b) / 4.0) / 0.7
    (torch.where(mask, torch.log_softmax(z, -1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1), 0.0)
     * g.double()).sum().backward()
    for a, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), r.grad, **tol)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_dtypes_of_16bit_inputs(backend, dtype):
    """The documented contract (docs/loss_options.md): 16-bit inputs give float32 losses,
    z-loss, lse, log-probs and entropies (what the fp32 softmax computed; the peers return the
    input dtype), and gradients in each input's own dtype; every reduction, every backend."""
    from pear_kernels import fused_token_logprobs

    _backend_available(backend)
    hidden, weight, bias, labels, behavior, cu = _problem(seed=2, n=11, h=8, v=19)
    hidden, weight, bias = (t.to(dtype).requires_grad_(True) for t in (hidden, weight, bias))
    for reduction in ("mean", "sum", "none"):
        loss, z, lse = fused_pear_loss(hidden, weight, labels, behavior, bias=bias, reduction=reduction,
                                       lse_square_scale=1e-3, softcap=20.0, return_z_loss=True,
                                       return_lse=True, backend=backend)
        assert (loss.dtype, z.dtype, lse.dtype) == (torch.float32,) * 3, reduction
        assert loss.shape == (() if reduction != "none" else labels.shape)
        loss.sum().backward()
        assert (hidden.grad.dtype, weight.grad.dtype, bias.grad.dtype) == (dtype,) * 3
        assert bool(torch.isfinite(hidden.grad.float()).all())
        hidden.grad = weight.grad = bias.grad = None
    lp, ent = fused_token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, backend=backend)
    assert (lp.dtype, ent.dtype) == (torch.float32, torch.float32)
    (lp.sum() + ent.sum()).backward()
    assert (hidden.grad.dtype, weight.grad.dtype) == (dtype, dtype)
