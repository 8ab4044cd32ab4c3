"""CPU benchmarks: the fused PEAR loss against the naive loss, the peers and the matmul floor.

Each case is one (shape, loss) pair measured in a fresh child process (time of forward +
backward, best of the repeats, and peak extra memory); pytest-benchmark times the whole child
(spawn included) and carries the inner figures in extra_info. The tables and the plot are
written by conftest.py at the end of the session.

Groups (default: rl, interpreter and the two round-robin targets at N=2048, H=1024, V=151936;
the rest with --large):
    target    round-robin per shape: fused, the unchunked matmul floor, the chunked floor, the
              peers (cut-cross-entropy torch_compile, torch linear_cross_entropy with its default
              chunks and with ours), and forward only (fused under no_grad vs one logits GEMM);
              N in {2048, 8192} x H in {1024, 2048} x V in {151936, 128256}
    sequence  the sequence variant against its 4-GEMM floor, round-robin
    rl        a small model's head (H=128, V=151936): the regime of RL on toy tasks
    scaling   Qwen2.5-like head (V=151936, H=896), N from 1k up: memory flat, time linear
    llama     Llama-3-like head (V=128256, H=2048)
    large     more large shapes

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

    # default (with the round-robin targets below): under 10 minutes on 2 idle cores
    add("rl", ALL, n=2048, h=128, v=QWEN_V, seq_len=512, prompt_frac=0.25)
    # Liger runs on CPU only under the Triton interpreter; torch's default chunking (a few rows
    # per chunk at these vocabularies, 5-10x slower) is shown at this small shape too
    add("interpreter", ("fused", "floor", "naive", "torch_lce", "torch_lce_matched", "liger"),
        n=256, h=64, v=4096, seq_len=128)

    # --large
    for n in (1024, 2048, 4096):
        add("scaling", ALL if n <= 2048 else CHUNKED, large=True, n=n, h=896, v=QWEN_V)
    add("llama", ALL, large=True, n=1024, h=2048, v=LLAMA_V)
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
# The performance targets: fused <= 1.10x the unchunked floor, faster than cut-cross-entropy
# (torch_compile) and torch's linear_cross_entropy (its default chunking and ours), memory <= the
# best peer's; forward only <= 1.10x one matmul; the sequence variant <= 1.10x its 4-GEMM floor.
PEERS = ("cce_compile", "torch_lce", "torch_lce_matched")
TARGET = ("fused", "floor", "floor_chunked") + PEERS + ("fused_fwd", "floor_fwd")
INTERLEAVED = {
    "target-N2048-H1024-V151936": [Case(loss=x, n=2048, h=1024, v=QWEN_V) for x in TARGET],
    "sequence-N2048-H1024-V151936": [Case(loss=x, n=2048, h=1024, v=QWEN_V, variant="sequence")
                                     for x in ("fused", "floor", "floor_chunked")],
}
for _n in (2048, 8192):
    for _h in (1024, 2048):
        for _v in (QWEN_V, LLAMA_V):
            if (_n, _h, _v) != (2048, 1024, QWEN_V):
                INTERLEAVED[f"target-N{_n}-H{_h}-V{_v}"] = [Case(loss=x, n=_n, h=_h, v=_v) for x in TARGET]


@pytest.mark.parametrize(
    "name",
    [pytest.param(k, marks=[pytest.mark.large, pytest.mark.timeout(7200)]
                  if k not in ("target-N2048-H1024-V151936", "sequence-N2048-H1024-V151936") else [])
     for k in INTERLEAVED],
)
def test_cpu_interleaved(name, bench_record, bench_repeats):
    out = measure_interleaved(INTERLEAVED[name], rounds=bench_repeats or 2)
    for row in out:
        bench_record(row, name.split("-N")[0])
        assert row.get("status") == "ok", row
