"""CPU benchmarks: the fused PEAR loss against the naive loss, the peers and the matmul floor.

Each case is one (shape, loss) pair measured in a fresh child process (time of forward +
backward, best of the repeats, and peak extra memory); pytest-benchmark times the whole child
(spawn included) and carries the inner figures in extra_info. The tables and the plot are
written by conftest.py at the end of the session.

Groups:
    scaling   Qwen2.5-like head (V=151936, H=896), N from 1k up: memory flat, time linear
    llama     Llama-3-like head (V=128256, H=2048)
    rl        a small model's head (H=128, V=151936): the regime of RL on toy tasks
    sequence  the sequence variant (4 matmuls: a log-prob pre-pass, then the gradient pass)
    target    the issue's target shape, N=8192, H=2048, V=151936 (--large)
    large     more large shapes (--large)

The naive loss and cut-cross-entropy's torch_compile path materialise N x V logits (several
copies), so they run only where that stays a few GiB, except at the target shape (--large,
about 15 GiB for the naive case).
"""

from __future__ import annotations

import pytest

from benchmarks.harness import Case, measure_in_child, measure_interleaved

QWEN_V, LLAMA_V = 151936, 128256
CHUNKED = ("fused", "floor", "torch_lce_matched")
ALL = CHUNKED + ("naive", "cce_compile")


def _cases():
    out = []

    def add(group, losses, large=False, **shape):
        for loss in losses:
            out.append((group, Case(loss=loss, **shape), large))

    # default: about 10 minutes on 2 idle cores (2-4x that when the CPU is shared)
    for n in (1024, 2048, 4096):
        losses = ALL if n <= 2048 else CHUNKED
        add("scaling", losses, n=n, h=896, v=QWEN_V)
    add("llama", ALL, n=1024, h=2048, v=LLAMA_V)
    add("rl", ALL, n=2048, h=128, v=QWEN_V, seq_len=512, prompt_frac=0.25)
    add("sequence", ("fused", "floor", "naive", "torch_lce_matched"), n=2048, h=896, v=QWEN_V,
        variant="sequence")
    # Liger runs on CPU only under the Triton interpreter; torch's default chunking (a few rows
    # per chunk at these vocabularies, 5-10x slower) is shown at this small shape too
    add("interpreter", ("fused", "floor", "naive", "torch_lce", "torch_lce_matched", "liger"),
        n=256, h=64, v=4096, seq_len=128)

    # --large
    add("target", ALL + ("torch_lce",), large=True, n=8192, h=2048, v=QWEN_V)
    for n in (1024, 4096, 16384):
        add("large", CHUNKED, large=True, n=n, h=2048, v=QWEN_V)
    add("scaling", CHUNKED, large=True, n=8192, h=896, v=QWEN_V)
    add("large", CHUNKED, large=True, n=8192, h=2048, v=LLAMA_V)
    add("large", CHUNKED + ("naive",), large=True, n=16384, h=128, v=QWEN_V, seq_len=512,
        prompt_frac=0.25)
    return out


def _repeats(case: Case) -> int:
    """3 repeats for small cases, 2 above ~5 TFLOP of matmuls, 1 for the big naive ones."""
    flop = 6 * case.n * case.h * case.v
    if case.loss in ("naive", "cce_compile") and case.n * case.v > 2**30:
        return 1
    return 3 if flop < 5e12 else 2


def _id(item):
    group, c, _ = item
    return f"{group}-N{c.n}-H{c.h}-V{c.v}-{c.variant}-{c.loss}"


CASES = _cases()


@pytest.mark.parametrize(
    "item",
    [pytest.param(x, marks=[pytest.mark.large, pytest.mark.timeout(3600)] if x[2] else [], id=_id(x)) for x in CASES],
)
def test_cpu(item, benchmark, bench_record, bench_repeats):
    group, case, _ = item
    case.repeats = bench_repeats or _repeats(case)
    out = {}

    def run():
        out.update(measure_in_child(case, timeout=3000))

    benchmark.pedantic(run, rounds=1, iterations=1)
    row = bench_record(out, group)
    if row.get("status") != "ok":
        pytest.skip(f"{case.loss} not runnable here: {row.get('reason')}")
    benchmark.extra_info.update(
        loss=case.loss, seconds=row["seconds"], times=row["times"],
        extra_mib=row["extra_bytes"] / 2**20, prime_seconds=row.get("prime_seconds"),
    )
    assert row["seconds"] > 0


# Ratios that the targets are about, measured round-robin so that the load of a shared machine
# drifts over all of them alike (best of the rounds for each).
INTERLEAVED = {
    "interleaved-N2048-H2048": [Case(loss=x, n=2048, h=2048, v=QWEN_V) for x in ("fused", "floor", "naive")],
    "target-interleaved-N8192-H2048": [Case(loss=x, n=8192, h=2048, v=QWEN_V) for x in ("fused", "floor", "naive")],
}


@pytest.mark.parametrize(
    "name",
    [pytest.param(k, marks=[pytest.mark.large, pytest.mark.timeout(7200)] if k.startswith("target") else [])
     for k in INTERLEAVED],
)
def test_cpu_interleaved(name, bench_record, bench_repeats):
    out = measure_interleaved(INTERLEAVED[name], rounds=bench_repeats or 2)
    for row in out:
        bench_record(row, name.split("-N")[0])
        assert row.get("status") == "ok", row
