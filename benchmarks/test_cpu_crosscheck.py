"""Correctness of every benchmarked loss against the float64 oracle, at small shapes.

The benchmark compares speeds of losses that must agree; this checks they do (Liger through the
Triton interpreter, in a child process that sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest

from benchmarks.harness import LOSSES, Case, crosscheck_in_child

CASES = {
    "token-packed": Case(n=192, h=48, v=1000, seq_len=64, prompt_frac=0.25, variant="token", chunk_size=40),
    "block-packed": Case(n=192, h=48, v=1000, seq_len=64, prompt_frac=0.25, variant="block", chunk_size=40),
    "sequence-packed": Case(n=192, h=48, v=1000, seq_len=64, prompt_frac=0.25, variant="sequence", chunk_size=40),
}


@pytest.mark.parametrize("name", list(CASES))
def test_crosscheck(name, bench_crosscheck):
    # the distillation entries compute another loss than the oracle's (test_distill_bench checks them)
    names = [n for n in LOSSES if not n.startswith("distill")]
    res = crosscheck_in_child(CASES[name], names)
    bench_crosscheck[name] = res
    assert res["fused"]["status"] == "ok" and res["naive"]["status"] == "ok"
    for loss, r in res.items():
        if r.get("status") == "ok" and "loss_err" in r:
            assert r["loss_err"] < 1e-5, (loss, r)
            if "dh_err" in r:  # (forward-only entries return no gradients)
                assert r["dh_err"] < 1e-4, (loss, r)
                assert r["dw_err"] < 1e-4, (loss, r)
