"""PEAR-weighted top-k distillation against a float64 materialised oracle written as loops."""

from __future__ import annotations

import math

import pytest
import torch

from pear_kernels import fused_pear_distill_loss

from .oracle import oracle_log_weights, sequences_of


def _problem(n=19, h=8, v=31, k=8, seed=0, packed=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64) * 1.5
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 6, 7]] = -100
    behavior = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    tlog = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    tlogp = torch.log_softmax(tlog, -1)
    top = torch.topk(tlogp, k, dim=-1)
    ids, lq = top.indices, top.values.clone()
    lq[3, -1] = float("-inf")  # an entry without mass
    cu = torch.tensor([0, 8, 19]) if packed else None
    return hidden, weight, labels, behavior, ids, lq, cu


def _oracle(hidden, weight, labels, behavior, ids, lq, cu, *, variant, tail, hard_weight, reduction="mean",
            num_items=None, temperature=1.0, block_size=4):
    z = hidden.reshape(-1, hidden.shape[-1]) @ weight.t() / temperature
    s = torch.log_softmax(z, -1)
    n, V = s.shape
    y = labels.reshape(-1)
    K = ids.shape[-1]
    ids2, lq2 = ids.reshape(-1, K), lq.reshape(-1, K)
    per = [None] * n
    count = 0
    for a, b in sequences_of(n, labels.shape[1] if labels.dim() == 2 else None, cu):
        sup = [i for i in range(a, b) if int(y[i]) != -100]
        count += len(sup)
        lr = [float(s[i, int(y[i])].detach()) - float(behavior.reshape(-1)[i]) for i in sup]
        lw = oracle_log_weights(lr, variant=variant, block_size=block_size)
        for i, g in zip(sup, lw):
            q = [math.exp(float(x)) for x in lq2[i]]
            Q = sum(q)
            kl = 0.0
            if tail == "renormalize":
                for k in range(K):
                    if q[k] > 0:
                        qq = q[k] / Q
                        kl = kl + qq * (math.log(qq) - s[i, int(ids2[i, k])])
            else:
                P = 0.0
                for k in range(K):
                    P = P + torch.exp(s[i, int(ids2[i, k])])
                    if q[k] > 0:
                        kl = kl + q[k] * (math.log(q[k]) - s[i, int(ids2[i, k])])
                r = max(1.0 - Q, 0.0)
                if r > 0:
                    kl = kl + r * (math.log(r) - torch.log(1.0 - P))
            tok = (1 - hard_weight) * kl + hard_weight * (-s[i, int(y[i])])
            per[i] = math.exp(g) * tok
    zero = z.sum() * 0
    per = torch.stack([p if p is not None else zero for p in per])
    if reduction == "none":
        return per.reshape(labels.shape)
    if reduction == "sum":
        return per.sum()
    return per.sum() / (num_items if num_items is not None else max(count, 1))


@pytest.mark.parametrize("variant", ["token", "block", "sequence", "none"])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("k", [1, 8])
def test_matches_oracle(variant, tail, k):
    hidden, weight, labels, behavior, ids, lq, cu = _problem(k=k)
    if k == 1:
        lq = lq.clone()
        lq[3, -1] = -0.3
    kw = dict(variant=variant, tail=tail, hard_weight=0.3)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = fused_pear_distill_loss(h1, w1, labels, behavior, ids, lq, cu_seqlens=cu, chunk_size=5, **kw)
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref = _oracle(h2, w2, labels, behavior, ids, lq, cu, **kw)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_rows_and_k64(reduction):
    g = torch.Generator().manual_seed(4)
    hidden, weight, labels, behavior, ids, lq, _ = _problem(n=12, v=80, k=64, packed=False)
    hidden, labels, behavior = hidden.reshape(3, 4, -1), labels.reshape(3, 4), behavior.reshape(3, 4)
    ids, lq = ids.reshape(3, 4, 64), lq.reshape(3, 4, 64)
    h1 = hidden.clone().requires_grad_(True)
    out = fused_pear_distill_loss(h1, weight, labels, behavior, ids, lq, tail="bucket", reduction=reduction,
                                  chunk_size=3)
    up = torch.rand(out.shape, generator=g, dtype=torch.float64) if reduction == "none" else 1.0
    (out * up).sum().backward()
    h2 = hidden.clone().requires_grad_(True)
    ref = _oracle(h2, weight, labels, behavior, ids, lq, None, variant="token", tail="bucket", hard_weight=0.0,
                  reduction=reduction)
    (ref * up).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-8, atol=1e-10)


def test_num_items_and_second_backward():
    hidden, weight, labels, behavior, ids, lq, cu = _problem()
    h = hidden.clone().requires_grad_(True)
    loss = fused_pear_distill_loss(h, weight, labels, behavior, ids, lq, cu_seqlens=cu, num_items_in_batch=40)
    ref = _oracle(hidden, weight, labels, behavior, ids, lq, cu, variant="token", tail="renormalize",
                  hard_weight=0.0, num_items=40)
    torch.testing.assert_close(loss, ref.detach())
    loss.backward(retain_graph=True)
    g = h.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * g)


def test_bf16_close_to_float64():
    hidden, weight, labels, behavior, ids, lq, cu = _problem()
    ours = fused_pear_distill_loss(hidden.bfloat16(), weight.bfloat16(), labels, behavior, ids, lq, cu_seqlens=cu)
    truth = _oracle(hidden.bfloat16().double(), weight.bfloat16().double(), labels, behavior, ids, lq, cu,
                    variant="token", tail="renormalize", hard_weight=0.0)
    assert ours.dtype == torch.float32
    assert abs(float(ours) - float(truth)) < 1e-4 * max(1.0, abs(float(truth)))


@pytest.mark.parametrize("change,match", [
    ("dup", "repeat an id"), ("range", "teacher_ids must be in"), ("nan", "NaN"), ("pos", "<= 0"),
    ("shape", "teacher_ids must have shape"), ("tail", "tail"), ("kl", "kl must be"), ("hard", "hard_weight"),
])
def test_bad_teacher_inputs_are_named(change, match):
    hidden, weight, labels, behavior, ids, lq, cu = _problem()
    ids, lq = ids.clone(), lq.clone()
    kw = {}
    if change == "dup":
        ids[2, 1] = ids[2, 0]
    elif change == "range":
        ids[2, 1] = 31
    elif change == "nan":
        lq[2, 1] = float("nan")
    elif change == "pos":
        lq[2, 1] = 0.5
    elif change == "shape":
        ids, lq = ids[:-1], lq[:-1]
    elif change == "tail":
        kw["tail"] = "uniform"
    elif change == "kl":
        kw["kl"] = "reverse"
    elif change == "hard":
        kw["hard_weight"] = 1.5
    with pytest.raises((ValueError, TypeError), match=match):
        fused_pear_distill_loss(hidden, weight, labels, behavior, ids, lq, cu_seqlens=cu, **kw)


def test_distillation_example_runs(tmp_path):
    """examples/distill_topk.py end to end at smoke size (teacher, top-k records, three arms)."""
    import subprocess
    import sys

    pytest.importorskip("transformers")
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    proc = subprocess.run([sys.executable, os.path.join(root, "examples", "distill_topk.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "distill_pear" in proc.stdout and "wall" in proc.stdout
