"""Distillation from stored teacher top-k: the fused loss against the naive one and Liger's
fused linear JSD, forward + backward on CPU, float32.

    pytest benchmarks/test_distill_bench.py --bench-results benchmarks/results/distill

Cases (benchmarks/harness.py, one child process per measurement, peak extra resident memory):

    distill_fused         fused_pear_distill_loss, K = 8, bucket tail, token variant (auto backend)
    distill_fused_torch / _native   the same pinned to a row-math backend
    floor                 the three matmuls of the fused path alone, same chunks (its lower bound)
    distill_naive         materialised logits: log_softmax, gather the top-k, bucket KL, PEAR weights
    distill_liger_jsd     Liger's chunked LigerFusedLinearJSDLoss (PyTorch, eager), beta = 0 (forward
                          KL) over the full vocabulary of an online teacher that has the student's head
                          (the teacher's own forward is not counted, nor its memory)

The cases of a shape run round-robin (``measure_interleaved``, best of the rounds), so their
ratios see the same machine load. Liger's Triton LigerFusedLinearJSD runs on CPU only under
Triton's interpreter: it is a value cross-check at a tiny shape here (with the chunked one),
not a timing. The file takes about 3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.harness import Case, measure_interleaved

SHAPES = [
    (dict(n=1024, h=896, v=151936),
     ("distill_fused", "distill_fused_torch", "distill_fused_native", "floor", "distill_naive", "distill_liger_jsd")),
    (dict(n=2048, h=256, v=32000),
     ("distill_fused", "distill_fused_torch", "distill_fused_native", "floor", "distill_naive", "distill_liger_jsd")),
]


@pytest.mark.parametrize("shape,losses", SHAPES, ids=lambda s: f"N{s['n']}-H{s['h']}-V{s['v']}" if isinstance(s, dict) else "")
def test_distill_fused_vs_naive_and_liger(shape, losses, bench_record, bench_repeats):
    cases = [Case(loss=x, **shape) for x in losses]
    rows = measure_interleaved(cases, rounds=bench_repeats or 2)
    for row in rows:
        bench_record(row, "distill")
        assert row.get("status") in ("ok", "unavailable"), row


_CROSSCHECK = r"""
import json, sys
import torch
from pear_kernels import fused_pear_distill_loss
g = torch.Generator().manual_seed(0)
n, h, v = 12, 16, 40
hs, ws = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.5
ht, wt = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.5
y = torch.randint(0, v, (n,), generator=g)
y[[0, 5]] = -100
with torch.no_grad():
    top = torch.topk(torch.log_softmax(ht @ wt.t(), -1), v, -1)   # K = V: the whole teacher distribution

def run(fn):
    a, b = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    loss = fn(a, b)
    loss.backward()
    return loss.detach(), a.grad, b.grad

ours = run(lambda a, b: fused_pear_distill_loss(a, b, y, torch.zeros(n), top.indices, top.values, variant="none",
                                                backend="torch"))
out = {}
try:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
except ImportError as exc:
    print(json.dumps({"unavailable": str(exc)}))
    sys.exit(0)
peers = {
    "liger_chunked_jsd": lambda a, b: LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0,
                                                             compiled=False)(a, b, ht, wt, y),
    "liger_triton_jsd_interpreted": lambda a, b: LigerFusedLinearJSD(jsd_beta=0.0)(a, b, ht, wt, y),
}
for name, fn in peers.items():
    theirs = run(fn)
    out[name] = {k + "_err": float((t - o).abs().max() / o.abs().max())
                 for k, t, o in zip(("loss", "dh", "dw"), theirs, ours)}
    out[name]["status"] = "ok"
print(json.dumps(out))
"""


def test_distill_crosscheck_liger_jsd(bench_crosscheck):
    """With K = V (the whole teacher distribution stored), no PEAR weight and no hard term, our
    loss is the forward KL that Liger's JSD computes at beta = 0: values and student gradients
    agree with the chunked (PyTorch) and the Triton implementation (under the interpreter)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", _CROSSCHECK], capture_output=True, text=True, env=env,
                          timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if "unavailable" in res:
        pytest.skip(res["unavailable"])
    bench_crosscheck["distillation, K = V, N=12 H=16 V=40: peer vs fused_pear_distill_loss (fp32)"] = res
    for name, errs in res.items():
        assert max(errs[k] for k in ("loss_err", "dh_err", "dw_err")) < 1e-5, (name, errs)
