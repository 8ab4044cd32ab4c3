"""Distillation from stored teacher top-k (K = 8, bucket tail): the fused loss against the
naive one (materialised logits), forward + backward, each case in a child process, measured
round-robin (best of the rounds), peak extra memory recorded. Liger's LigerFusedLinearJSD
needs the teacher's hidden states and head online (both models in memory), a different
workload: it is cross-checked in docs/distillation.md, not timed here."""

from __future__ import annotations

import pytest

from benchmarks.harness import Case, measure_interleaved

SHAPES = [dict(n=1024, h=896, v=151936), dict(n=2048, h=256, v=32000)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s['n']}-H{s['h']}-V{s['v']}")
def test_distill_fused_vs_naive(shape, bench_record, bench_repeats):
    cases = [Case(loss=x, **shape) for x in ("distill_fused", "distill_naive")]
    rows = measure_interleaved(cases, rounds=bench_repeats or 2)
    for row in rows:
        bench_record(row, "distill")
        assert row.get("status") == "ok", row
