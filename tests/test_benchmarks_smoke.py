"""Smoke run of the benchmark machinery at tiny shapes (the real suite: pytest benchmarks).

Checks that every loss the suite compares runs and agrees with the float64 oracle, that a
case measured in a child process reports time and memory, and that the report writer produces
the markdown table, the README snippet and the plot. A few seconds; no timing is asserted.
"""

from __future__ import annotations

import json
import os

import pytest

from benchmarks.harness import (
    LOSSES,
    Case,
    PeerUnavailable,
    crosscheck,
    measure_in_child,
    run_case,
)

TINY = dict(n=48, h=16, v=97, seq_len=16, prompt_frac=0.25)
# in-process: no torch.compile (cut-cross-entropy compiles for ~10 s), no Triton interpreter
FAST = [name for name in LOSSES if name not in ("cce_compile", "liger", "flash_attn_ce")]
# the distillation entries compute another loss than the oracle's PEAR SFT loss
ORACLE_CHECKED = [name for name in FAST if not name.startswith("distill")]
# the floors do the matmuls only; the forward-only entry returns no gradients
NO_GRADS = ("floor", "floor_chunked", "floor_fwd", "fused_fwd")


@pytest.mark.parametrize("variant", ["token", "sequence"])
def test_losses_agree_with_oracle(variant):
    res = crosscheck(Case(variant=variant, chunk_size=5, **TINY), ORACLE_CHECKED)
    for name in ORACLE_CHECKED:
        assert res[name]["status"] == "ok", (name, res[name])
        if name not in NO_GRADS:
            assert res[name]["loss_err"] < 1e-5 and res[name]["dh_err"] < 1e-4 and res[name]["dw_err"] < 1e-4, (name, res[name])


@pytest.mark.parametrize("name", FAST)
def test_run_case_in_process(name):
    r = run_case(Case(loss=name, repeats=2, **TINY))
    assert r.seconds > 0 and len(r.times) == 2 and r.extra_bytes >= 0
    assert r.grad_bytes == (48 * 16 + 97 * 16) * 4


def test_liger_without_interpreter_is_reported(monkeypatch):
    pytest.importorskip("liger_kernel")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(PeerUnavailable, match="TRITON_INTERPRET"):
        run_case(Case(loss="liger", **TINY))


def test_measure_in_child_and_report(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import bench_report

    rows = []
    for name, n in (("fused", 32), ("naive", 32), ("floor", 32), ("fused", 64)):
        case = Case(loss=name, **{**TINY, "n": n})
        # one case through a child process, the rest in this one (a spawn costs ~2 s)
        r = measure_in_child(case) if (name, n) == ("fused", 32) else run_case(case).to_dict()
        assert r["status"] == "ok" and r["seconds"] > 0
        r["group"] = "scaling"
        rows.append(r)
    rows.append({**rows[0], "loss": "torch_lce", "status": "unavailable", "reason": "not here"})
    paths = bench_report.write_results(rows, str(tmp_path), "cpu", None)
    table = open(paths["md"]).read()
    assert "pear_kernels fused" in table and "not run" in table and "not here" in table
    assert os.path.getsize(paths["png"]) > 1000
    assert "Forward + backward, N=32" in open(paths["readme"]).read()
    assert len(json.load(open(paths["json"]))["rows"]) == 5


@pytest.mark.filterwarnings("ignore::pytest.PytestUnknownMarkWarning")  # "large" is registered by benchmarks/conftest.py
def test_suite_cases_name_known_losses():
    from benchmarks import test_cpu_bench

    names = {c.loss for _, c, _ in test_cpu_bench.CASES}
    names |= {c.loss for cases in test_cpu_bench.INTERLEAVED.values() for c in cases}
    assert names <= set(LOSSES)
    # the targets' grid, each shape with the floors, the peers and forward only
    grid = {(c.n, c.h, c.v) for k, cases in test_cpu_bench.INTERLEAVED.items() if k.startswith("target")
            for c in cases}
    assert grid == {(n, h, v) for n in (2048, 8192) for h in (1024, 2048) for v in (151936, 128256)}
    for k, cases in test_cpu_bench.INTERLEAVED.items():
        if k.startswith("target"):
            assert {c.loss for c in cases} >= {"fused", "floor", "floor_chunked", "cce_compile", "torch_lce",
                                               "torch_lce_matched", "fused_fwd", "floor_fwd"}, k


def test_flash_attn_cross_entropy_cross_check_under_the_interpreter():
    """flash-attn's Triton cross-entropy (with z-loss and label smoothing) under the interpreter
    agrees with our fused loss's options (plain SFT): a peer cross-check where its Python files
    can be installed without the CUDA build; skipped, saying how, where they cannot."""
    import torch

    from benchmarks.harness import flash_attn_cross_entropy, load_flash_attn_cross_entropy
    from pear_kernels import fused_pear_loss

    try:
        load_flash_attn_cross_entropy()
    except PeerUnavailable as e:
        pytest.skip(str(e))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(12, 16, generator=g)
    w = torch.randn(40, 16, generator=g)
    y = torch.randint(0, 40, (12,), generator=g)
    y[[0, 5]] = -100
    b = torch.zeros(12)
    theirs, z = flash_attn_cross_entropy((h @ w.t()).contiguous(), y, label_smoothing=0.1, lse_square_scale=0.01)
    mask = y != -100
    ours, z_ours = fused_pear_loss(h, w, y, b, variant="none", label_smoothing=0.1, lse_square_scale=0.01,
                                   return_z_loss=True)
    torch.testing.assert_close(ours, theirs[mask].mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_ours, z[mask].mean(), rtol=1e-5, atol=1e-6)


def test_distill_entries_agree():
    """The fused and the materialised distillation entries of the benchmark compute one loss."""
    import torch

    case = Case(**TINY)
    from benchmarks.harness import make_inputs

    h, w, y, b, cu = make_inputs(case)
    a = LOSSES["distill_fused"](h, w, y, b, cu, "token")
    c = LOSSES["distill_naive"](h.detach(), w.detach(), y, b, cu, "token")
    torch.testing.assert_close(a.detach(), c.to(a.dtype), rtol=1e-4, atol=1e-5)


def test_report_writes_crosscheck_rows_without_gradients(tmp_path):
    """Forward-only and floor entries carry no gradient errors: the report shows them as such
    instead of failing at the end of a benchmark session."""
    from benchmarks import bench_report

    row = run_case(Case(loss="fused", **TINY)).to_dict()
    row["group"] = "scaling"
    cc = {"tiny": {"fused": {"status": "ok", "loss_err": 1e-9, "dh_err": 1e-8, "dw_err": 1e-8},
                   "fused_fwd": {"status": "ok", "loss_err": 1e-9},
                   "floor": {"status": "ok", "note": "matmuls only, not a loss"}}}
    paths = bench_report.write_results([row], str(tmp_path), "cpu", cc)
    text = open(paths["md"]).read()
    assert "| tiny | fused_fwd | 1.0e-09 | - (forward only) | - |" in text
