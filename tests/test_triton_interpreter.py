"""The Triton backend, run on CPU tensors under Triton's interpreter, against the oracle.

Every expected value comes from ``reference_pear_loss`` (materialised logits, autograd) or
plain PyTorch, never from the torch_chunked backend. Shapes are tiny: the interpreter runs
each program in NumPy (a few ms per program and loop iteration).

Triton reads TRITON_INTERPRET=1 when it is first imported (its standard library is @jit code)
and when each kernel is decorated, so it has to be set before anything imports triton:
tests/conftest.py does that on machines without CUDA. Where it is not set (a GPU machine),
or triton was imported before it was set, these tests skip; the GPU benchmark file carries a
compiled correctness check instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install pear_kernels[triton])", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("Triton interpreter tests need TRITON_INTERPRET=1 before triton is imported "
                "(tests/conftest.py sets it on machines without CUDA)", allow_module_level=True)

import triton.language  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if not isinstance(triton.language.zeros, InterpretedFunction):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: its kernels cannot be "
                "interpreted in this process", allow_module_level=True)

from pear_kernels import PEARConfig, fused_pear_loss, fused_token_logprobs, reference_pear_loss  # noqa: E402
from pear_kernels.importance import build_layout, compute_log_weights  # noqa: E402
from pear_kernels.kernels import torch_chunked  # noqa: E402
from pear_kernels.ops import dispatch  # noqa: E402

KERNEL_MODULES = (
    "pear_kernels.kernels.triton_utils",
    "pear_kernels.kernels.triton_rows",
    "pear_kernels.kernels.triton_scan",
    "pear_kernels.kernels.triton_fused",
    "pear_kernels.kernels.triton_pear",
)
VARIANTS = ("token", "block", "sequence", "none")
DTYPES = (torch.float32, torch.bfloat16)


def _load_kernels():
    # triton is interpreted (checked above), so kernels decorated now or earlier are too
    return {name: importlib.import_module(name) for name in KERNEL_MODULES}


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    saved = {k: os.environ.get(k) for k in (dispatch.ENV_VAR, "PEAR_KERNELS_TRITON_FUSED")}
    os.environ.pop(dispatch.ENV_VAR, None)
    os.environ.pop("PEAR_KERNELS_TRITON_FUSED", None)
    mods = _load_kernels()
    yield mods
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def tp(interpreter):
    return interpreter["pear_kernels.kernels.triton_pear"]


def _close(actual, expected, rtol, name=""):
    """max |a - e| <= rtol * max |e| (floored at 1e-3): relative to the largest entry."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, (name, a.shape, e.shape)
    assert torch.isfinite(a).all(), name
    err = float((a - e).abs().max()) if a.numel() else 0.0
    scale = max(1e-3, float(e.abs().max())) if e.numel() else 1.0
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol:.1g} * {scale:.3g}"


def _problem(seed, dtype, n=37, h=40, v=100, bias=True, scale=0.3, masked=(0, 5, 6, 20)):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g).to(dtype)
    w = (torch.randn(v, h, generator=g) * scale).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    y[[i for i in masked if i < n]] = -100
    beh = -torch.rand(n, generator=g) * 5
    return hid, w, b, y, beh


def _run(fn, hid, w, b, y, beh, **kw):
    leaves = [t.clone().requires_grad_() for t in (hid, w) + ((b,) if b is not None else ())]
    bias = leaves[2] if b is not None else None
    loss = fn(leaves[0], leaves[1], y, beh, bias=bias, **kw)
    upstream = torch.linspace(-1, 1, loss.numel()).reshape(loss.shape) if loss.dim() else torch.tensor(1.0)
    (loss * upstream.to(loss.dtype)).sum().backward()
    return loss.detach(), [t.grad for t in leaves]


# ---------------------------------------------------------------- row kernels


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_row_kernels_match_log_softmax(interpreter, temperature):
    rows = interpreter["pear_kernels.kernels.triton_rows"]
    g = torch.Generator().manual_seed(0)
    v = 4099  # one full 4096-wide interpreter tile and a ragged 3-column tail: the online path
    logits = torch.randn(3, v, generator=g) * 8
    logits[1, 7] = 90.0  # a dominant logit: the running max must rescale the earlier tiles
    logits[2, v - 1] = 60.0  # max in the ragged tail tile
    y = torch.tensor([5, 7, v - 1])
    logp, lse, ent = rows.row_stats(logits, y, temperature, with_entropy=True)
    z = logits.double() / temperature
    ref = torch.log_softmax(z, 1)
    _close(lse, torch.logsumexp(z, 1), 1e-6, "lse")
    _close(logp, ref.gather(1, y[:, None]).squeeze(1), 1e-6, "logp")
    # H = lse - E_p[z] cancels two fp32 numbers of size ~130: ~1e-5 absolute
    _close(ent, -(ref.exp() * ref).sum(1), 5e-5, "entropy")
    coef = torch.tensor([0.5, -2.0, 1.5])
    d = rows.row_dlogits_(logits.clone(), y, lse, coef, temperature)
    want = (ref.exp() - torch.nn.functional.one_hot(y, v)) * (coef.double() / temperature)[:, None]
    # fp32 z - lse with |lse| ~ 130 carries ~1e-5 absolute error into p
    _close(d, want, 3e-5, "dlogits")


@pytest.mark.parametrize("splits", [1, 3])
def test_fused_forward_vocab_splits(interpreter, splits):
    """The fused forward with the vocabulary split over programs (one split left empty: 100
    columns are two 64-wide tiles) merges its partials into the exact log-softmax."""
    fused = interpreter["pear_kernels.kernels.triton_fused"]
    hid, w, b, y, _ = _problem(12, torch.float32, n=18, masked=())
    rows = torch.arange(1, 18, 2)
    logp, lse, ent = fused.fused_lse_forward(hid, w, b, rows, y[rows], 1.1, True, v_splits=splits)
    z = (hid[rows].double() @ w.double().t() + b.double()) / 1.1
    ref = torch.log_softmax(z, 1)
    _close(lse, torch.logsumexp(z, 1), 1e-6, "lse")
    _close(logp, ref.gather(1, y[rows][:, None]).squeeze(1), 1e-5, "logp")
    _close(ent, -(ref.exp() * ref).sum(1), 1e-5, "entropy")


# ---------------------------------------------------------------- scan kernels


@pytest.mark.parametrize("max_block", [3, None], ids=["scan-pieces-of-3", "one-scan-per-chunk"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_scan_matches_weight_math_at_every_chunk_split(interpreter, monkeypatch, variant, max_block):
    """Chunks of 1..5 tokens cut sequences and blocks at every position; the carry must join
    them (also when one chunk is scanned in several pieces, as chunks over 4096 tokens are)."""
    scan = interpreter["pear_kernels.kernels.triton_scan"]
    if max_block is not None:
        monkeypatch.setattr(scan, "MAX_SCAN_BLOCK", max_block)
    g = torch.Generator().manual_seed(1)
    n = 23
    mask = torch.rand(n, generator=g) > 0.2
    mask[10:14] = False  # a fully masked segment
    cu = torch.tensor([0, 9, 10, 14, 23])
    config = PEARConfig(variant=variant, block_size=3, gamma=0.9, delta_clip=(-0.5, 0.4),
                        log_weight_clip=(-1.5, 0.6))
    layout = build_layout(mask, block_size=3, cu_seqlens=cu)
    m = layout.num_supervised
    logp = (torch.randn(m, generator=g) * 0.5 - 1).float()
    beh = (torch.randn(m, generator=g) * 0.5 - 1).double()
    want_clipped, want_raw = compute_log_weights(logp.double() - beh, layout, config)
    for rows in (1, 2, 4, 5, m):
        d = torch.full((m,), float("nan"), dtype=torch.float64)
        incl, raw = d.clone(), d.clone()
        coef = torch.empty(m, dtype=torch.float32)
        ends = list(range(m, 0, -rows))
        for end in ends:
            start = max(0, end - rows)
            scan.pear_scan_(logp[start:end], beh, layout, config, d, incl, start, end)
            if variant != "sequence":
                coef[start:end] = scan.pear_log_weights(d, incl, layout, config, start, end, raw, coef_scale=0.25)
        if variant == "sequence":
            coef = scan.pear_log_weights(d, incl, layout, config, 0, m, raw, coef_scale=0.25)
        _close(raw, want_raw, 1e-12, f"log G, chunk rows {rows}")
        _close(coef, want_clipped.exp() * 0.25, 1e-6, f"coef, chunk rows {rows}")


# ---------------------------------------------------------------- whole loss vs the oracle


def _tol(dtype):
    if dtype == torch.float32:
        return 2e-5, 2e-5
    # no path rounds bf16 logits (the fused tiles and the chunked GEMM keep fp32 results of
    # exact bf16 products), so values meet float64 truth; bf16 gradients carry 1 ulp (2^-8)
    return 2e-5, 1.6e-2


@pytest.mark.parametrize("fused", [False, True], ids=["chunked", "fused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_and_grads_match_reference_packed(tp, monkeypatch, variant, dtype, fused):
    """Packed rows (cu_seqlens), masked gaps, bias, temperature; chunk of 3 tokens with blocks of
    4: chunk boundaries fall inside sequences and inside blocks."""
    monkeypatch.setenv("PEAR_KERNELS_TRITON_FUSED", "1" if fused else "0")
    hid, w, b, y, beh = _problem(2, dtype)
    cu = torch.tensor([0, 10, 25, 25, 37])
    kw = dict(variant=variant, block_size=4, cu_seqlens=cu, temperature=0.9)
    loss, grads = _run(fused_pear_loss, hid, w, b, y, beh, chunk_size=3, backend="triton", **kw)
    ref, ref_grads = _run(reference_pear_loss, hid, w, b, y, beh, **kw, compute_dtype=torch.float64)
    tol_v, tol_g = _tol(dtype)
    _close(loss, ref, tol_v, "loss")
    for name, gt, gr in zip(("dh", "dW", "db"), grads, ref_grads):
        _close(gt, gr, tol_g, name)


@pytest.mark.parametrize("fused", [False, True], ids=["chunked", "fused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_logits_are_not_rounded_before_softmax(tp, monkeypatch, dtype, fused):
    """Training (forward with gradients: the chunked path unless fused) and evaluation (no
    gradients: the fused kernel) see the same log-probs, those of fp32 logits: logits of ~30
    rounded to bf16 would move them by ~0.1."""
    monkeypatch.setenv("PEAR_KERNELS_TRITON_FUSED", "1" if fused else "0")
    g = torch.Generator().manual_seed(3)
    n, h, v = 24, 64, 300
    hid = (torch.randn(n, h, generator=g) * 0.8).to(dtype)
    w = (torch.randn(v, h, generator=g) * 0.8).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    beh = -torch.rand(n, generator=g) * 3
    truth = torch.log_softmax(hid.double() @ w.double().t(), -1).gather(1, y[:, None]).squeeze(1)
    _, st = fused_pear_loss(hid.clone().requires_grad_(), w, y, beh, chunk_size=7, backend="triton",
                            return_stats=True)
    assert float((st.token_logprobs.double() - truth).abs().max()) < 1e-4
    with torch.no_grad():
        _, st_eval = fused_pear_loss(hid, w, y, beh, chunk_size=7, backend="triton", return_stats=True)
    assert float((st_eval.token_logprobs.double() - truth).abs().max()) < 1e-4


@pytest.mark.parametrize("fused", [False, True], ids=["chunked", "fused"])
def test_float16_inputs(tp, monkeypatch, fused):
    monkeypatch.setenv("PEAR_KERNELS_TRITON_FUSED", "1" if fused else "0")
    hid, w, b, y, beh = _problem(13, torch.float16, n=21)
    kw = dict(variant="block", block_size=3, cu_seqlens=torch.tensor([0, 8, 21]))
    loss, grads = _run(fused_pear_loss, hid, w, b, y, beh, chunk_size=5, backend="triton", **kw)
    ref, ref_grads = _run(reference_pear_loss, hid, w, b, y, beh, **kw, compute_dtype=torch.float64)
    _close(loss, ref, 2e-5, "loss")
    for name, gt, gr in zip(("dh", "dW", "db"), grads, ref_grads):
        _close(gt, gr, 2e-3, name)  # fp16: 2^-11 per rounding


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["token", "block", "sequence"])
def test_reductions_batched_rows(tp, variant, dtype, reduction):
    """(B, T) rows, an all-masked row, no bias; "none" takes the recompute backward with a
    non-uniform upstream gradient."""
    hid, w, _, y, beh = _problem(3, dtype, n=24, bias=False, masked=())
    y = y.reshape(3, 8)
    y[1] = -100  # an all-masked row
    y[2, :3] = -100  # a prompt
    kw = dict(variant=variant, block_size=2, reduction=reduction)
    hid3, beh2 = hid.reshape(3, 8, -1), beh.reshape(3, 8)
    loss, grads = _run(fused_pear_loss, hid3, w, None, y, beh2, chunk_size=5, backend="triton", **kw)
    ref, ref_grads = _run(reference_pear_loss, hid3, w, None, y, beh2, **kw, compute_dtype=torch.float64)
    tol_v, tol_g = _tol(dtype)
    _close(loss, ref, tol_v, "loss")
    if reduction == "none":
        assert bool((loss[1] == 0).all())
    for name, gt, gr in zip(("dh", "dW"), grads, ref_grads):
        _close(gt, gr, tol_g, name)


@pytest.mark.parametrize("fused", [False, True], ids=["chunked", "fused"])
def test_reduction_none_recompute_paths(tp, monkeypatch, fused):
    monkeypatch.setenv("PEAR_KERNELS_TRITON_FUSED", "1" if fused else "0")
    hid, w, b, y, beh = _problem(4, torch.float32, n=19, v=70)
    kw = dict(variant="block", block_size=3, reduction="none", temperature=1.3)
    loss, grads = _run(fused_pear_loss, hid, w, b, y, beh, chunk_size=4, backend="triton", **kw)
    ref, ref_grads = _run(reference_pear_loss, hid, w, b, y, beh, compute_dtype=torch.float64, **kw)
    _close(loss, ref, 2e-5, "loss")
    for name, gt, gr in zip(("dh", "dW", "db"), grads, ref_grads):
        _close(gt, gr, 2e-5, name)


def test_mean_with_num_items_and_sequence_prepass(tp):
    """Sequence variant with more tokens than a chunk: the fused log-prob pre-pass, then the
    gradient pass; the normalizer is the caller's num_items_in_batch."""
    hid, w, b, y, beh = _problem(5, torch.float32, n=30)
    kw = dict(variant="sequence", num_items_in_batch=11, cu_seqlens=torch.tensor([0, 17, 30]))
    loss, grads = _run(fused_pear_loss, hid, w, b, y, beh, chunk_size=4, backend="triton", **kw)
    ref, ref_grads = _run(reference_pear_loss, hid, w, b, y, beh, compute_dtype=torch.float64, **kw)
    _close(loss, ref, 2e-5, "loss")
    for name, gt, gr in zip(("dh", "dW", "db"), grads, ref_grads):
        _close(gt, gr, 2e-5, name)


@pytest.mark.parametrize("fused", [False, True], ids=["chunked", "fused"])
def test_all_masked_batch(tp, monkeypatch, fused):
    monkeypatch.setenv("PEAR_KERNELS_TRITON_FUSED", "1" if fused else "0")
    hid, w, b, y, beh = _problem(6, torch.float32, n=6, masked=range(6))
    loss, grads = _run(fused_pear_loss, hid, w, b, y, beh, backend="triton")
    ref, ref_grads = _run(reference_pear_loss, hid, w, b, y, beh)
    _close(loss, ref, 0, "loss")
    for gt in grads:
        assert gt is not None and bool((gt == 0).all())


def test_extreme_logits_and_confident_teacher_stay_finite(tp):
    """Logits of magnitude ~500 and a teacher far above the student: every weight clips."""
    hid, w, b, y, beh = _problem(7, torch.float32, n=20, scale=15.0)
    beh = torch.zeros_like(beh)
    kw = dict(variant="token", log_weight_clip=(-10.0, 5.0), delta_clip=(-20.0, 0.3), gamma=0.5)
    loss, grads = _run(fused_pear_loss, hid, w, b, y, beh, chunk_size=6, backend="triton", **kw)
    ref, ref_grads = _run(reference_pear_loss, hid, w, b, y, beh, compute_dtype=torch.float64, **kw)
    _close(loss, ref, 1e-4, "loss")
    for name, gt, gr in zip(("dh", "dW", "db"), grads, ref_grads):
        _close(gt, gr, 1e-4, name)


def test_behavior_logprob_minus_infinity(tp):
    """log pi_beta = -inf (the behavior policy gave the token probability 0): the log-ratio is
    +inf and the per-decision clip must turn it into delta_max, not a NaN."""
    hid, w, b, y, beh = _problem(14, torch.float32, n=16)
    beh[[3, 9, 15]] = float("-inf")
    kw = dict(variant="block", block_size=2)
    loss, grads = _run(fused_pear_loss, hid, w, b, y, beh, chunk_size=5, backend="triton", **kw)
    ref, ref_grads = _run(reference_pear_loss, hid, w, b, y, beh, compute_dtype=torch.float64, **kw)
    _close(loss, ref, 2e-5, "loss")
    for name, gt, gr in zip(("dh", "dW", "db"), grads, ref_grads):
        _close(gt, gr, 2e-5, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_token_logprobs_and_entropy(tp, dtype):
    hid, w, b, y, _ = _problem(8, dtype, n=21, v=90)
    hid_r = hid.clone().requires_grad_()
    logp, ent = fused_token_logprobs(hid_r, w, y, bias=b, temperature=0.8, return_entropy=True, backend="triton")
    (logp * torch.linspace(-1, 2, logp.numel())).sum().backward()
    h64 = hid.double().requires_grad_()
    z = (h64 @ w.double().t() + b.double()) / 0.8
    lp = torch.log_softmax(z, 1)
    mask = y != -100
    want = torch.where(mask, lp.gather(1, y.clamp(min=0)[:, None]).squeeze(1), torch.zeros(()))
    want_ent = torch.where(mask, -(lp.exp() * lp).sum(1), torch.zeros(()))
    (want * torch.linspace(-1, 2, logp.numel()).double()).sum().backward()
    _close(logp, want, 2e-5, "logp")
    _close(ent, want_ent, 2e-5, "entropy")
    _close(hid_r.grad, h64.grad, 2e-5 if dtype == torch.float32 else 1.6e-2, "dh")


def test_float64_is_served_by_the_chunked_torch_kernels(tp):
    hid, w, b, y, beh = _problem(9, torch.float64, n=10)
    loss, grads = _run(fused_pear_loss, hid, w, b, y, beh, backend="triton")
    ref, ref_grads = _run(reference_pear_loss, hid, w, b, y, beh)
    _close(loss, ref, 1e-10, "loss")
    for gt, gr in zip(grads, ref_grads):
        _close(gt, gr, 1e-10, "grad")


# ---------------------------------------------------------------- dispatch


def test_dispatch_choices(tp, monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert dispatch.select_backend(cpu) is torch_chunked
    assert dispatch.select_backend(cuda) is tp
    assert dispatch.select_backend(cuda, "torch") is torch_chunked
    assert dispatch.select_backend(cpu, "triton") is tp
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.select_backend(cpu) is tp
    assert dispatch.select_backend(cpu, "torch") is torch_chunked  # the argument wins
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.select_backend(cuda) is torch_chunked
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="PEAR_KERNELS_BACKEND"):
        dispatch.select_backend(cpu)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(tp, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.select_backend(torch.device("cpu"), "triton")
    hid, w, b, y, beh = _problem(10, torch.float32, n=4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_pear_loss(hid, w, y, beh, backend="triton")


def test_triton_imported_before_the_interpreter_is_a_clear_error(tp, monkeypatch):
    monkeypatch.setattr(triton.language, "zeros", object())  # what a compiled-mode import leaves
    with pytest.raises(RuntimeError, match="before triton is first imported"):
        dispatch.select_backend(torch.device("cpu"), "triton")


# ---------------------------------------------------------------- trust: oracle, isolation


@pytest.mark.parametrize("fused", [False, True], ids=["chunked", "fused"])
@pytest.mark.parametrize("variant", ["token", "block", "sequence"])
def test_matches_direct_loop_oracle(tp, monkeypatch, variant, fused):
    """Against tests/oracle.py (direct loops, no code shared with pear_kernels)."""
    from .oracle import oracle_loss

    monkeypatch.setenv("PEAR_KERNELS_TRITON_FUSED", "1" if fused else "0")
    hid, w, b, y, beh = _problem(21, torch.float32, n=19, h=16, v=40)
    cu = torch.tensor([0, 7, 19])
    kw = dict(variant=variant, block_size=3, cu_seqlens=cu)
    loss, grads = _run(fused_pear_loss, hid, w, b, y, beh, chunk_size=4, backend="triton", **kw)
    ref, ref_grads = _run(lambda *a, **k: oracle_loss(*a, **k)[0], hid, w, b, y, beh, **kw)
    _close(loss, ref, 2e-5, "loss")
    for name, gt, gr in zip(("dh", "dW", "db"), grads, ref_grads):
        _close(gt, gr, 2e-5, name)


@pytest.mark.parametrize("fused", [False, True], ids=["chunked", "fused"])
@pytest.mark.parametrize("kind", ["nan_hidden", "huge_ratio", "inf_ratio"])
def test_poison_in_one_sequence_stays_there(tp, monkeypatch, kind, fused):
    """A NaN hidden state, a 1e30 or an infinite log-ratio in sequence 1 (unbounded delta
    clip) leaves sequences 0 and 2 bit-identical, chunk boundaries inside sequences."""
    monkeypatch.setenv("PEAR_KERNELS_TRITON_FUSED", "1" if fused else "0")
    hid, w, b, y, beh = _problem(22, torch.float32, n=18, h=16, v=40, masked=(0,))
    cu = torch.tensor([0, 6, 12, 18])
    kw = dict(variant="token", cu_seqlens=cu, reduction="none", chunk_size=4, backend="triton",
              delta_clip=(-float("inf"), float("inf")), bias=b)
    clean = fused_pear_loss(hid, w, y, beh, **kw)
    hp, bp = hid.clone(), beh.clone()
    if kind == "nan_hidden":
        hp[8] = float("nan")
    elif kind == "huge_ratio":
        bp[8] = -1e30
    else:
        bp[8] = -float("inf")
    bad = fused_pear_loss(hp, w, y, bp, **kw)
    others = torch.cat([torch.arange(0, 6), torch.arange(12, 18)])
    torch.testing.assert_close(bad[others], clean[others], rtol=0, atol=0)
    if kind != "nan_hidden":
        assert torch.isfinite(bad).all()


# ---------------------------------------------------------------- the GPU path as it will run


@pytest.mark.parametrize("splits", [1, 3])
def test_minus_inf_bias_masks_padded_vocabulary(interpreter, splits):
    """A -inf bias on the last third of the vocabulary (padding): forced vocabulary splits make
    one split entirely -inf; log-probs and entropies stay finite and right, row kernels too."""
    fused = interpreter["pear_kernels.kernels.triton_fused"]
    rows_mod = interpreter["pear_kernels.kernels.triton_rows"]
    g = torch.Generator().manual_seed(31)
    n, h, v = 20, 16, 96
    hid = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * 0.5
    b = torch.zeros(v)
    b[64:] = float("-inf")
    y = torch.randint(0, 64, (n,), generator=g)
    z = (hid.double() @ w.double().t() + b.double())
    logp_ref = torch.log_softmax(z, -1)
    want_lp = logp_ref.gather(1, y[:, None]).squeeze(1)
    p = logp_ref.exp()
    want_ent = -(torch.where(p > 0, p * logp_ref, torch.zeros_like(p))).sum(-1)
    lp, _, ent = fused.fused_lse_forward(hid, w, b, torch.arange(n), y, 1.0, True, v_splits=splits)
    _close(lp, want_lp, 1e-5, "fused logp")
    _close(ent, want_ent, 1e-5, "fused entropy")
    logits = (hid @ w.t() + b).contiguous()
    lp2, _, ent2 = rows_mod.row_stats(logits, y, 1.0, with_entropy=True)
    _close(lp2, want_lp, 1e-5, "row logp")
    _close(ent2, want_ent, 1e-5, "row entropy")
    # and the chunked torch path's entropy
    lp3, ent3 = fused_token_logprobs(hid, w, y, bias=b, return_entropy=True, backend="torch")
    _close(ent3, want_ent, 1e-5, "torch entropy")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp16_gradients_survive_a_large_normaliser(tp, backend):
    """fp16 with a normaliser of 65536 tokens (num_items_in_batch) and a GradScaler-style
    upstream scale of 65536: the 1/N factor must not be folded into 16-bit dlogits or a 16-bit
    dh before the scale is applied, or most entries flush to zero."""
    hid, w, _, y, beh = _problem(41, torch.float16, n=12, h=16, v=48, masked=())
    kw = dict(variant="token", num_items_in_batch=65536.0)
    h1 = hid.clone().requires_grad_()
    w1 = w.clone().requires_grad_()
    loss = fused_pear_loss(h1, w1, y, beh, backend=backend, chunk_size=5, **kw)
    (loss * 65536.0).backward()
    h2 = hid.double().requires_grad_()
    w2 = w.double().requires_grad_()
    ref = reference_pear_loss(h2, w2, y, beh, **kw)
    (ref * 65536.0).backward()
    _close(h1.grad, h2.grad, 2e-3, "dh")
    _close(w1.grad, w2.grad, 2e-3, "dW")


def test_tf32_flag_read_through_the_new_api(interpreter):
    utils = interpreter["pear_kernels.kernels.triton_utils"]
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    old = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert utils.fp32_matmul_uses_tf32() is True
        matmul.fp32_precision = "ieee"
        assert utils.fp32_matmul_uses_tf32() is False
    finally:
        matmul.fp32_precision = old


def test_launches_run_in_the_tensors_device(tp, monkeypatch):
    import types

    entered = []

    class Recorder:
        def __init__(self, device):
            entered.append(torch.device(device))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    with tp.device_context(types.SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert entered == [torch.device("cuda", 1)]
    for fn in (tp.forward, tp.backward, tp.token_logprobs):
        assert getattr(fn, "__wrapped__", None) is not None  # every entry point is wrapped


def test_deterministic_mode_avoids_atomics(tp):
    try:
        torch.use_deterministic_algorithms(True)
        assert tp._use_fused(True) is False
    finally:
        torch.use_deterministic_algorithms(False)
    assert tp._use_fused(True) is True


def test_autotune_keys_include_row_bucket(interpreter):
    fused = interpreter["pear_kernels.kernels.triton_fused"]
    for kernel in (fused._fused_forward_kernel, fused._fused_backward_kernel):
        keys = getattr(kernel, "keys", None)
        if keys is None:
            pytest.skip("the interpreter's autotuner keeps no keys")
        assert "R_BUCKET" in keys
