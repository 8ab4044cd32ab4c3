"""The native C++ row pass (csrc/) against the chunked PyTorch path, per shape.

Both run the same chunks and the same three matmuls; only the row work around each logits
chunk differs (two memory passes for the statistics and one for dlogits, against about five
and two). So the native path can only win where the row work is a visible share of the time:
small hidden sizes. `pear_kernels.ops.dispatch.NATIVE_MAX_HIDDEN` is set from this table.
Cases run round-robin (one repeat per child, best of the rounds) so machine load drifts over
both backends alike.
"""

from __future__ import annotations

import pytest

from benchmarks.harness import Case, measure_interleaved

# default run: the ends of the range and the dispatch threshold; --large: the full sweep
DEFAULT = [(2048, 64, 32000), (2048, 512, 32000), (2048, 64, 151936)]
SWEEP = [(2048, h, 32000) for h in (128, 256, 1024, 2048)] + [(2048, h, 151936) for h in (256, 896)]
SHAPES = [pytest.param(s, id=f"N{s[0]}-H{s[1]}-V{s[2]}") for s in DEFAULT] + [
    pytest.param(s, id=f"N{s[0]}-H{s[1]}-V{s[2]}", marks=pytest.mark.large) for s in SWEEP
]


@pytest.mark.parametrize("shape", SHAPES)
def test_native_vs_torch(shape, bench_record, bench_repeats):
    n, h, v = shape
    cases = [Case(loss=name, n=n, h=h, v=v) for name in ("fused_torch", "fused_native")]
    rows = measure_interleaved(cases, rounds=bench_repeats or 3)
    for row in rows:
        bench_record(row, "native")
    if any(row.get("status") != "ok" for row in rows):
        pytest.skip(f"not runnable here: {[row.get('reason') for row in rows]}")
    torch_s, native_s = (row["seconds"] for row in rows)
    print(f"N={n} H={h} V={v}: torch {torch_s:.3f} s, native {native_s:.3f} s, native/torch {native_s / torch_s:.3f}")
