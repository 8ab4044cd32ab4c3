"""PEAR-weighted top-k distillation against a float64 materialised oracle written as loops.

The oracle below imports nothing from pear_kernels (nor tests/oracle.py): the PEAR weight is
written out per sequence from its definition, the logits are materialised in float64 and the
KL is summed term by term; autograd differentiates it. Every backend (torch, native, and
Triton under its CPU interpreter) is compared with it, never with another backend.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from pear_kernels import PEARConfig, PEARDistillLoss, fused_pear_distill_loss, fused_pear_loss
from pear_kernels.kernels import native_cpu

BACKENDS = ["torch"] + (["native"] if native_cpu.available() else [])


# ----------------------------------------------------------------------------- the oracle
def _oracle_log_weights(lr, variant, gamma=0.999, block=4, dclip=(-0.08, 0.3), wclip=(-10.0, 5.0)):
    """Clipped log-weights of ONE sequence's supervised tokens, in order, by the definitions."""
    T = len(lr)
    d = [min(max(x, dclip[0]), dclip[1]) for x in lr]
    out = []
    for t in range(1, T + 1):
        if variant == "none":
            g = 0.0
        elif variant == "token":
            g = (T - t) * math.log(gamma) + sum(d[j - 1] for j in range(t + 1, T + 1))
        elif variant == "block":
            e = min(((t - 1) // block + 1) * block, T)  # last token of t's block
            g = (T - e) * math.log(gamma) + sum(d[j - 1] for j in range(e + 1, T + 1))
        elif variant == "sequence":
            g = sum(d)
        else:
            raise ValueError(variant)
        out.append(min(max(g, wclip[0]), wclip[1]))
    return out


def _sequences(n, row_len, cu):
    if cu is not None:
        c = [int(x) for x in cu]
        return [(c[i], c[i + 1]) for i in range(len(c) - 1)]
    if row_len is not None:
        return [(r * row_len, (r + 1) * row_len) for r in range(n // row_len)]
    return [(0, n)]


def _oracle(hidden, weight, labels, behavior, ids, lq, cu, *, variant="token", tail="renormalize",
            hard_weight=0.0, reduction="mean", num_items=None, temperature=1.0, bias=None, block_size=4,
            ignore_index=-100):
    """Per-token (1 - lam) KL + lam NLL, times the PEAR weight, reduced; float64, loops."""
    H = hidden.shape[-1]
    z = hidden.reshape(-1, H).double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    s = torch.log_softmax(z / temperature, -1)
    n = s.shape[0]
    y = labels.reshape(-1)
    K = ids.shape[-1]
    ids2, lq2 = ids.reshape(-1, K), lq.reshape(-1, K)
    beh = behavior.reshape(-1)
    per = [None] * n
    weights = [0.0] * n
    count = 0
    for a, b in _sequences(n, labels.shape[1] if labels.dim() == 2 else None, cu):
        sup = [i for i in range(a, b) if int(y[i]) != ignore_index]
        count += len(sup)
        lr = [float(s[i, int(y[i])].detach()) - float(beh[i]) for i in sup]
        for i, g in zip(sup, _oracle_log_weights(lr, variant, block=block_size)):
            q = [math.exp(float(x)) for x in lq2[i]]
            Q = sum(q)
            kl = 0.0
            if tail == "renormalize":
                for k in range(K):
                    if q[k] > 0:
                        kl = kl + (q[k] / Q) * (math.log(q[k] / Q) - s[i, int(ids2[i, k])])
            else:
                P = 0.0
                for k in range(K):
                    P = P + torch.exp(s[i, int(ids2[i, k])])
                    if q[k] > 0:
                        kl = kl + q[k] * (math.log(q[k]) - s[i, int(ids2[i, k])])
                r = 1.0 - Q
                if r > 0:
                    kl = kl + r * (math.log(r) - torch.log(1.0 - P))
            tok = (1 - hard_weight) * kl + hard_weight * (-s[i, int(y[i])])
            weights[i] = math.exp(g)
            per[i] = math.exp(g) * tok
    zero = (hidden.sum() + weight.sum()).double() * 0  # not z: a -inf logit would make it NaN
    per = torch.stack([p if p is not None else zero for p in per])
    if reduction == "none":
        return per.reshape(labels.shape)
    if reduction == "sum":
        return per.sum()
    return per.sum() / (num_items if num_items is not None else max(count, 1))


def _oracle_weights(hidden, weight, labels, behavior, cu, variant):
    z = hidden.reshape(-1, hidden.shape[-1]).double() @ weight.double().t()
    s = torch.log_softmax(z, -1)
    y = labels.reshape(-1)
    out = torch.zeros(y.numel(), dtype=torch.float64)
    for a, b in _sequences(y.numel(), labels.shape[1] if labels.dim() == 2 else None, cu):
        sup = [i for i in range(a, b) if int(y[i]) != -100]
        lr = [float(s[i, int(y[i])]) - float(behavior.reshape(-1)[i]) for i in sup]
        for i, g in zip(sup, _oracle_log_weights(lr, variant)):
            out[i] = math.exp(g)
    return out.reshape(labels.shape)


# ----------------------------------------------------------------------------- problems
def _problem(n=19, h=8, v=31, k=8, seed=0, packed=True, dtype=torch.float64, inf_entry=True):
    """Packed rows [0, 8) and [8, 19) with ignore_index gaps (0, 6, 7), a -inf teacher entry."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 6, 7]] = -100
    behavior = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    tlogp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1)
    top = torch.topk(tlogp, k, dim=-1)
    # shuffle the K entries: the loss must not rely on them being sorted
    perm = torch.argsort(torch.rand(n, k, generator=g), dim=-1)
    ids, lq = top.indices.gather(1, perm), top.values.gather(1, perm).clone()
    if k > 1 and inf_entry:
        lq[3, 1] = float("-inf")  # an entry without mass
    cu = torch.tensor([0, 8, 19]) if packed else None
    return hidden, weight, labels, behavior, ids, lq, cu


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


# ----------------------------------------------------------------------------- values, gradients
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 8, 64])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("variant", ["token", "block", "sequence", "none"])
def test_matches_oracle(variant, tail, k, backend):
    """Packed rows, ignore gaps, chunks of 5 cutting both sequences, hard term, temperature,
    bias: loss and the hidden, weight and bias gradients."""
    v = 80 if k == 64 else 31
    hidden, weight, labels, behavior, ids, lq, cu = _problem(k=k, v=v, seed=k)
    bias = torch.randn(v, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kw = dict(variant=variant, tail=tail, hard_weight=0.3, temperature=0.8)
    h1, w1, b1 = _leaf(hidden), _leaf(weight), _leaf(bias)
    loss = fused_pear_distill_loss(h1, w1, labels, behavior, ids, lq, bias=b1, cu_seqlens=cu, chunk_size=5,
                                   backend=backend, **kw)
    loss.backward()
    h2, w2, b2 = _leaf(hidden), _leaf(weight), _leaf(bias)
    ref = _oracle(h2, w2, labels, behavior, ids, lq, cu, bias=b2, **kw)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-11)
    for ours, want in ((h1.grad, h2.grad), (w1.grad, w2.grad), (b1.grad, b2.grad)):
        torch.testing.assert_close(ours, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_rows_with_gaps_reductions_k64(reduction, tail, backend):
    """(B, T) rows (each row a sequence) with ignore_index gaps, K = 64, a random upstream
    gradient for "none"; chunks of 3 tokens cut the rows."""
    g = torch.Generator().manual_seed(4)
    hidden, weight, labels, behavior, ids, lq, _ = _problem(n=12, v=80, k=64, packed=False)
    hidden, labels, behavior = hidden.reshape(3, 4, -1), labels.reshape(3, 4), behavior.reshape(3, 4)
    ids, lq = ids.reshape(3, 4, 64), lq.reshape(3, 4, 64)
    h1, w1 = _leaf(hidden), _leaf(weight)
    out = fused_pear_distill_loss(h1, w1, labels, behavior, ids, lq, tail=tail, reduction=reduction,
                                  chunk_size=3, backend=backend, hard_weight=0.1)
    up = torch.rand(out.shape, generator=g, dtype=torch.float64) if reduction == "none" else 1.0
    (out * up).sum().backward()
    h2, w2 = _leaf(hidden), _leaf(weight)
    ref = _oracle(h2, w2, labels, behavior, ids, lq, None, tail=tail, hard_weight=0.1, reduction=reduction)
    (ref * up).sum().backward()
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_num_items_and_a_second_backward(reduction):
    """num_items_in_batch divides the mean; a second backward through a retained graph gets
    the same gradients again (they are kept, not handed out once)."""
    hidden, weight, labels, behavior, ids, lq, cu = _problem()
    h = _leaf(hidden)
    num = 40 if reduction == "mean" else None
    loss = fused_pear_distill_loss(h, weight, labels, behavior, ids, lq, cu_seqlens=cu, num_items_in_batch=num,
                                   reduction=reduction, chunk_size=7)
    h2 = _leaf(hidden)
    ref = _oracle(h2, weight, labels, behavior, ids, lq, cu, num_items=num, reduction=reduction)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-9, atol=1e-11)
    loss.sum().backward(retain_graph=True)
    ref.sum().backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-8, atol=1e-10)
    first = h.grad.clone()
    (2.0 * loss.sum()).backward()
    torch.testing.assert_close(h.grad, 3.0 * first)


def test_stats_weights_match_the_oracle_weights():
    hidden, weight, labels, behavior, ids, lq, cu = _problem()
    _, stats = fused_pear_distill_loss(hidden, weight, labels, behavior, ids, lq, cu_seqlens=cu, chunk_size=4,
                                       variant="block", return_stats=True)
    want = _oracle_weights(hidden, weight, labels, behavior, cu, "block")
    torch.testing.assert_close(stats.weights.double(), want, rtol=1e-6, atol=1e-7)


def test_module_form_matches_the_oracle():
    hidden, weight, labels, behavior, ids, lq, cu = _problem()
    mod = PEARDistillLoss(PEARConfig(variant="block", block_size=3), tail="bucket", hard_weight=0.2, chunk_size=4)
    out = mod(hidden, weight, labels, behavior, ids, lq, cu_seqlens=cu, reduction="sum")
    ref = _oracle(hidden, weight, labels, behavior, ids, lq, cu, variant="block", block_size=3, tail="bucket",
                  hard_weight=0.2, reduction="sum")
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    assert "bucket" in repr(mod)


def test_hard_weight_one_is_the_pear_sft_loss():
    """lam = 1 leaves only the weighted NLL of the sampled token: fused_pear_loss's value."""
    hidden, weight, labels, behavior, ids, lq, cu = _problem()
    a = fused_pear_distill_loss(hidden, weight, labels, behavior, ids, lq, cu_seqlens=cu, hard_weight=1.0)
    b = fused_pear_loss(hidden, weight, labels, behavior, cu_seqlens=cu)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_tails_differ_and_coincide_on_a_full_vocabulary():
    """With K = V (the whole distribution stored) there is no tail and both modes agree; with
    a real tail they do not (a test that cannot tell them apart would pass a swapped tail)."""
    hidden, weight, labels, behavior, ids, lq, cu = _problem(k=31, inf_entry=False)
    kw = dict(cu_seqlens=cu, chunk_size=6)
    a = fused_pear_distill_loss(hidden, weight, labels, behavior, ids, lq, tail="renormalize", **kw)
    b = fused_pear_distill_loss(hidden, weight, labels, behavior, ids, lq, tail="bucket", **kw)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    hidden, weight, labels, behavior, ids, lq, cu = _problem(k=4)
    a = fused_pear_distill_loss(hidden, weight, labels, behavior, ids, lq, tail="renormalize", **kw)
    b = fused_pear_distill_loss(hidden, weight, labels, behavior, ids, lq, tail="bucket", **kw)
    assert abs(float(a) - float(b)) > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_close_to_float64(dtype):
    """16-bit hidden/weight: loss and gradients within 16-bit tolerance of the float64 oracle
    on the same (rounded) inputs; the loss comes back in float32."""
    hidden, weight, labels, behavior, ids, lq, cu = _problem(k=8)
    h1, w1 = _leaf(hidden.to(dtype)), _leaf(weight.to(dtype))
    ours = fused_pear_distill_loss(h1, w1, labels, behavior, ids, lq, cu_seqlens=cu, tail="bucket",
                                   hard_weight=0.2)
    ours.backward()
    h2, w2 = _leaf(hidden.to(dtype).double()), _leaf(weight.to(dtype).double())
    truth = _oracle(h2, w2, labels, behavior, ids, lq, cu, tail="bucket", hard_weight=0.2)
    truth.backward()
    assert ours.dtype == torch.float32 and h1.grad.dtype == dtype
    assert abs(float(ours.detach()) - float(truth.detach())) < 1e-4 * max(1.0, abs(float(truth.detach())))
    torch.testing.assert_close(h1.grad.double(), h2.grad, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(w1.grad.double(), w2.grad, rtol=2e-2, atol=2e-3)


def _mask_a_free_column(labels, ids, lq, v):
    """A -inf bias on a column no supervised label or teacher id uses, then that column given
    to position 5 as a no-mass (-inf) teacher entry, with two more -inf entries there."""
    sup = labels >= 0
    used = set(ids[sup].reshape(-1).tolist()) | set(labels[sup].tolist())
    free = [c for c in range(v) if c not in used]
    assert free
    bias = torch.zeros(v, dtype=torch.float64)
    bias[free[0]] = float("-inf")
    lq, ids = lq.clone(), ids.clone()
    lq[5, :3] = float("-inf")
    ids[5, 0] = free[0]  # 0 log 0 on the student's -inf column: 0, not NaN
    return bias, ids, lq


def test_masked_columns_and_inf_teacher_entries_stay_finite():
    """A -inf bias column (padded vocabulary) and -inf teacher entries, one of them on that
    column: finite loss and gradients equal to the oracle's."""
    hidden, weight, labels, behavior, ids, lq, cu = _problem(k=4, v=80)
    bias, ids, lq = _mask_a_free_column(labels, ids, lq, 80)
    for tail in ("renormalize", "bucket"):
        h1 = _leaf(hidden)
        out = fused_pear_distill_loss(h1, weight, labels, behavior, ids, lq, bias=bias, cu_seqlens=cu, tail=tail,
                                      chunk_size=5)
        out.backward()
        h2 = _leaf(hidden)
        ref = _oracle(h2, weight, labels, behavior, ids, lq, cu, bias=bias, tail=tail)
        ref.backward()
        assert torch.isfinite(out) and torch.isfinite(h1.grad).all()
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-8, atol=1e-10)


def test_unsupervised_positions_are_not_checked_or_used():
    """Padding rows may carry any ids (the collator fills them): masked positions are ignored."""
    hidden, weight, labels, behavior, ids, lq, cu = _problem()
    ids2, lq2 = ids.clone(), lq.clone()
    ids2[0] = -1  # position 0 is ignore_index
    lq2[6] = float("nan")
    a = fused_pear_distill_loss(hidden, weight, labels, behavior, ids, lq, cu_seqlens=cu)
    b = fused_pear_distill_loss(hidden, weight, labels, behavior, ids2, lq2, cu_seqlens=cu)
    assert float(a) == float(b)


def test_backend_names_pick_their_row_math():
    from pear_kernels.kernels import torch_distill
    from pear_kernels.ops.fused_linear_distill import select_distill_rows

    cpu = torch.device("cpu")
    assert select_distill_rows(cpu, "torch", 8, torch.float32) is torch_distill.TorchDistillRows
    if native_cpu.available():
        assert select_distill_rows(cpu, "native", 8, torch.float32) is torch_distill.NativeDistillRows


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("change,err,match", [
    ("dup", ValueError, "teacher_ids repeat an id at position 2 "),
    ("high", ValueError, r"teacher_ids must be in \[0, 31\)"),
    ("negative", ValueError, r"teacher_ids must be in \[0, 31\)"),
    ("nan", ValueError, "teacher_logprobs are NaN at position 2 "),
    ("positive", ValueError, "teacher_logprobs must be log-probabilities"),
    ("all_inf", ValueError, "teacher_logprobs at position 2 .* all -inf"),
    ("mass", ValueError, "teacher_logprobs at position 2 .* > 1"),
    ("shape", ValueError, "teacher_ids must have shape"),
    ("k_mismatch", ValueError, "teacher_logprobs must have teacher_ids' shape"),
    ("float_ids", TypeError, "teacher_ids must be an integer tensor"),
    ("int_logprobs", TypeError, "teacher_logprobs must be a floating-point tensor"),
    ("not_tensor", TypeError, "teacher_ids must be a torch.Tensor"),
    ("tail", ValueError, "tail must be one of"),
    ("kl", ValueError, "kl must be 'forward'"),
    ("hard", ValueError, "hard_weight must be a number in"),
    ("hard_nan", ValueError, "hard_weight must be a number in"),
    ("hard_bool", ValueError, "hard_weight must be a number in"),
    ("backend", ValueError, "backend"),
])
def test_bad_inputs_are_refused_by_name(change, err, match):
    hidden, weight, labels, behavior, ids, lq, cu = _problem()
    ids, lq = ids.clone(), lq.clone()
    kw = {}
    if change == "dup":
        ids[2, 5] = ids[2, 0]
    elif change == "high":
        ids[2, 1] = 31
    elif change == "negative":
        ids[4, 7] = -1
    elif change == "nan":
        lq[2, 1] = float("nan")
    elif change == "positive":
        lq[2, 1] = 0.5
    elif change == "all_inf":
        lq[2] = float("-inf")
    elif change == "mass":
        lq[2] = math.log(0.2)
    elif change == "shape":
        ids, lq = ids[:-1], lq[:-1]
    elif change == "k_mismatch":
        lq = lq[:, :-1]
    elif change == "float_ids":
        ids = ids.double()
    elif change == "int_logprobs":
        lq = lq.long()
    elif change == "not_tensor":
        ids = ids.tolist()
    elif change in ("tail", "kl", "backend"):
        kw[change] = {"tail": "uniform", "kl": "reverse", "backend": "cuda-magic"}[change]
    elif change == "hard":
        kw["hard_weight"] = 1.5
    elif change == "hard_nan":
        kw["hard_weight"] = float("nan")
    elif change == "hard_bool":
        kw["hard_weight"] = True
    with pytest.raises(err, match=match):
        fused_pear_distill_loss(hidden, weight, labels, behavior, ids, lq, cu_seqlens=cu, **kw)


# ----------------------------------------------------------------------------- Triton interpreter
def _interpreted_triton() -> bool:
    if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    import triton.language
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.zeros, InterpretedFunction)


@pytest.mark.skipif(not _interpreted_triton(), reason="needs triton imported under TRITON_INTERPRET=1 "
                    "(tests/conftest.py sets it on machines without CUDA)")
@pytest.mark.parametrize("tail,hard_weight,reduction", [
    ("renormalize", 0.0, "mean"), ("bucket", 0.3, "mean"), ("bucket", 0.0, "none"), ("renormalize", 0.5, "sum"),
])
def test_triton_rows_under_the_interpreter(tail, hard_weight, reduction):
    """The Triton row kernels (fp32 logits chunks) on tiny shapes against the oracle."""
    hidden, weight, labels, behavior, ids, lq, cu = _problem(n=11, v=64, k=4, dtype=torch.float32)
    cu = torch.tensor([0, 5, 11])
    bias, ids, lq = _mask_a_free_column(labels, ids, lq, 64)
    kw = dict(tail=tail, hard_weight=hard_weight, reduction=reduction, temperature=0.9)
    h1, w1 = _leaf(hidden), _leaf(weight)
    out = fused_pear_distill_loss(h1, w1, labels, behavior, ids, lq, bias=bias.float(), cu_seqlens=cu,
                                  chunk_size=4, backend="triton", **kw)
    out.sum().backward()
    h2, w2 = _leaf(hidden.double()), _leaf(weight.double())
    ref = _oracle(h2, w2, labels, behavior, ids, lq, cu, bias=bias, **kw)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(h1.grad.double(), h2.grad, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(w1.grad.double(), w2.grad, rtol=2e-4, atol=2e-5)


@pytest.mark.skipif(not _interpreted_triton(), reason="needs triton imported under TRITON_INTERPRET=1")
def test_triton_rows_with_the_cuda_gemm_glue(monkeypatch):
    """On CUDA the Triton rows take triton_chunked's logits GEMM and gradient sink; that glue
    run here on CPU fp32 tensors (the interpreter), against the oracle."""
    from pear_kernels.kernels import triton_distill
    from pear_kernels.kernels.triton_chunked import grad_sink

    monkeypatch.setattr(triton_distill.TritonDistillRows, "buffer", staticmethod(triton_distill._CudaLogits))
    monkeypatch.setattr(triton_distill.TritonDistillRows, "sink",
                        staticmethod(lambda problem, need, buffer, post=1.0: grad_sink(problem, need, post)))
    hidden, weight, labels, behavior, ids, lq, _ = _problem(n=11, v=37, k=4, dtype=torch.float32)
    cu = torch.tensor([0, 5, 11])
    kw = dict(tail="bucket", hard_weight=0.25, temperature=1.3, variant="sequence")
    h1, w1 = _leaf(hidden), _leaf(weight)
    out = fused_pear_distill_loss(h1, w1, labels, behavior, ids, lq, cu_seqlens=cu, chunk_size=4, backend="triton",
                                  **kw)
    out.backward()
    h2, w2 = _leaf(hidden.double()), _leaf(weight.double())
    ref = _oracle(h2, w2, labels, behavior, ids, lq, cu, **kw)
    ref.backward()
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(h1.grad.double(), h2.grad, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(w1.grad.double(), w2.grad, rtol=2e-4, atol=2e-5)


@pytest.mark.skipif(not _interpreted_triton(), reason="needs triton imported under TRITON_INTERPRET=1")
def test_fp16_gradients_survive_a_large_normaliser_on_the_cuda_glue(monkeypatch):
    """fp16 on the CUDA glue (dlogits cast to fp16 for the gradient GEMMs) with a normaliser
    of 65536 tokens and a GradScaler-style upstream 65536: the 1/N factor must come after the
    GEMMs (TritonDistillRows.post_scale), or p_u / N flushes to zero in fp16."""
    from pear_kernels.kernels import triton_distill
    from pear_kernels.kernels.triton_chunked import grad_post_scale, grad_sink

    rows = triton_distill.TritonDistillRows
    monkeypatch.setattr(rows, "buffer", staticmethod(triton_distill._CudaLogits))
    monkeypatch.setattr(rows, "sink", staticmethod(lambda problem, need, buffer, post=1.0: grad_sink(problem, need, post)))
    monkeypatch.setattr(rows, "post_scale", staticmethod(grad_post_scale))  # the CUDA rule, on CPU tensors
    hidden, weight, labels, behavior, ids, lq, _ = _problem(n=12, v=48, k=4, dtype=torch.float16)
    kw = dict(tail="bucket", hard_weight=0.25, num_items=65536.0)
    h1, w1 = _leaf(hidden), _leaf(weight)
    out = fused_pear_distill_loss(h1, w1, labels, behavior, ids, lq, chunk_size=5, backend="triton",
                                  tail="bucket", hard_weight=0.25, num_items_in_batch=65536.0)
    (out * 65536.0).backward()
    h2, w2 = _leaf(hidden.double()), _leaf(weight.double())
    ref = _oracle(h2, w2, labels, behavior, ids, lq, None, **kw)
    (ref * 65536.0).backward()
    for got, want in ((h1.grad, h2.grad), (w1.grad, w2.grad)):
        err = float((got.double() - want).abs().max())
        assert err <= 2e-3 * float(want.abs().max()), err


# ----------------------------------------------------------------------------- the example
def test_distillation_example_runs():
    """examples/distill_topk.py end to end at smoke size (teacher, top-k records, three arms)."""
    import subprocess
    import sys

    pytest.importorskip("transformers")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    proc = subprocess.run([sys.executable, os.path.join(root, "examples", "distill_topk.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "distill_pear" in proc.stdout and "wall" in proc.stdout
