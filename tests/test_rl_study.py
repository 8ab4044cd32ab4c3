"""The issue-12 study: statistics against direct computations, and a tiny end-to-end smoke run."""

import importlib.util
import json
import os
import random
import statistics
import sys

import pytest

from pear_kernels.rl.study_stats import (
    Gate,
    bootstrap_mean_ci,
    is_natural_order,
    paired_differences,
    seeds_above,
    written_order,
)


def test_paired_differences_match_direct():
    arm = {0: 0.5, 1: 0.25, 2: 0.75, 5: 0.1}
    base = {0: 0.25, 1: 0.5, 2: 0.75, 3: 0.9}
    d = paired_differences(arm, base)
    assert d == {0: 0.25, 1: -0.25, 2: 0.0}  # seeds in both only
    assert seeds_above(d) == (1, 3)
    with pytest.raises(TypeError):
        paired_differences([0.1], base)


def test_bootstrap_interval_against_direct_loop():
    vals = [0.1, -0.05, 0.2, 0.03, 0.0, 0.12, -0.02, 0.07]
    mean, lo, hi = bootstrap_mean_ci(vals, resamples=2000, seed=3)
    # direct recomputation with the same generator, written as an explicit loop
    rng = random.Random(3)
    means = []
    for _ in range(2000):
        s = 0.0
        for _ in range(len(vals)):
            s += vals[rng.randrange(len(vals))]
        means.append(s / len(vals))
    means.sort()
    assert mean == pytest.approx(statistics.fmean(vals))
    assert lo == pytest.approx(means[50]) and hi == pytest.approx(means[1949])
    assert lo <= mean <= hi
    # nearest-rank indices on a small run: level 0.8 of 10 resamples -> sorted means[1], means[8]
    vals2 = [0.1, -0.0513, 0.2071, 0.0337, 0.0011]
    rng = random.Random(0)
    small = sorted(sum(vals2[rng.randrange(5)] for _ in range(5)) / 5 for _ in range(10))
    assert len(set(small)) == 10  # distinct, so an off-by-one index is caught
    assert bootstrap_mean_ci(vals2, level=0.8, resamples=10, seed=0)[1:] == (small[1], small[8])
    # exhaustive check for n=2: the resampled means are {a, (a+b)/2, b} with prob 1/4, 1/2, 1/4
    m, lo2, hi2 = bootstrap_mean_ci([0.0, 1.0], resamples=4000, seed=0)
    assert (lo2, hi2) == (0.0, 1.0)
    assert bootstrap_mean_ci([0.3] * 5)[1:] == (pytest.approx(0.3), pytest.approx(0.3))
    with pytest.raises(ValueError):
        bootstrap_mean_ci([])
    with pytest.raises(ValueError):
        bootstrap_mean_ci([1.0], level=1.0)


def test_gates():
    assert Gate("g", 0.3, 0.1, 0.6).status == "pass"
    assert Gate("g", 0.05, 0.1, 0.6).status == "FAIL"
    assert Gate("g", 0.7, 0.1, 0.6).status == "FAIL"
    assert Gate("g", 0.86, None, 0.85).status == "FAIL"
    assert Gate("g", 0.85, None, 0.85).status == "pass"
    assert Gate("g", None, 0.0, 1.0).status == "not measured"
    assert "FAIL" in Gate("g", 2.0, 0.0, 1.0).line()


def test_trace_style():
    assert written_order("3+5=8+2=10+7=17.") == [3, 5, 2, 7]
    assert is_natural_order((3, 5, 2, 7), "3+5=8+2=10+7=17.")
    assert not is_natural_order((3, 5, 2, 7), "3+2=5+5=10+7=17.")
    assert written_order("garbage") is None
    assert not is_natural_order((1, 2), "1+x=3.")


def _load_driver():
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "pear_study.py")
    spec = importlib.util.spec_from_file_location("pear_study", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pear_study"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_study_pipeline_tiny_and_resume(tmp_path, capsys):
    study = _load_driver()
    data = tmp_path / "data"
    study.main(["run", "--tiny", "--seeds", "1", "--data", str(data), "--cache", str(tmp_path / "cache")])
    files = sorted(os.listdir(data))
    cfg = study.tiny_config()
    expected = {study.piece_name(0, t, a, b) for (s, t, a, b) in study.piece_order(cfg) if s == 0}
    assert expected <= set(files) and "base_seed0.json" in files
    tok = json.loads((data / study.piece_name(0, 0.2, "token", 2)).read_text())
    lr = json.loads((data / study.piece_name(0, 0.2, "plain_lr", 2)).read_text())
    assert lr["sft_lr"] == pytest.approx(cfg.sft_lr * tok["sft_mean_weight"])
    assert 0.0 <= tok["rl"]["pass@1"] <= 1.0 and tok["dist_sft_from_base"] > 0
    # the style probe: both styles on the same problems, and a retrained token SFT that
    # reproduces the saved piece exactly
    styles = json.loads((data / "styles_seed0.json").read_text())
    for when in ("base", "token_sft"):
        assert styles[when]["traces_natural"] == cfg.probe_traces
        assert 0 < styles[when]["w_natural"] and 0 < styles[when]["w_shuffled"]
        assert styles[when]["traces_shuffled"] == cfg.probe_traces  # 5 operands: a shuffled trace exists
    for ours, saved in styles["reproduced"].values():
        assert ours == saved
    out = capsys.readouterr().out
    assert "Gates" in out and "(incomplete)" not in out  # 1 seed requested, 1 seed present
    assert "reproduces the saved pieces: yes" in out and "mean over 1 seeds" in out
    # a rerun skips every finished piece
    st = study.Study(cfg, str(data), str(tmp_path / "cache"))
    assert all(st.run_piece(*p) == "skipped" for p in study.piece_order(cfg) if p[0] == 0)
    assert st.styles(0) == "skipped"
    text, _ = study.report(str(data), n_seeds=8)
    assert "(incomplete)" in text
