"""Options and result collection for `pytest benchmarks`.

    pytest benchmarks                     default CPU shapes (about 10 minutes on 2 cores)
    pytest benchmarks --large             adds the large shapes (or PEAR_BENCH_LARGE=1)
    pytest benchmarks --bench-repeats 5   timed repeats per case (default: by case size)
    pytest benchmarks --bench-results DIR where the tables and the plot go
                                          (default benchmarks/results; --bench-no-write: none)

Every case runs in its own child process (benchmarks.harness.measure_in_child). Rows are
merged into DIR/cpu.json by (shape, loss), so a later run of a few cases (e.g. -k large)
updates those rows and keeps the rest; --bench-fresh starts from nothing.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_report  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def pytest_addoption(parser):
    g = parser.getgroup("pear_kernels benchmarks")
    g.addoption("--large", action="store_true", default=False,
                help="also run the large shapes (same as PEAR_BENCH_LARGE=1)")
    g.addoption("--bench-repeats", type=int, default=None, help="timed repeats per case")
    g.addoption("--bench-results", default=None, help=f"results directory (default {RESULTS_DIR})")
    g.addoption("--bench-no-write", action="store_true", default=False, help="write no result files")
    g.addoption("--bench-fresh", action="store_true", default=False,
                help="do not merge with the rows already in the results directory")


def pytest_configure(config):
    config.addinivalue_line("markers", "large: a large shape, run only with --large or PEAR_BENCH_LARGE=1")
    config._pear_bench_rows = []
    config._pear_bench_crosscheck = {}


def _large_enabled(config) -> bool:
    return bool(config.getoption("--large")) or os.environ.get("PEAR_BENCH_LARGE", "") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if _large_enabled(config):
        return
    skip = pytest.mark.skip(reason="large shape: pass --large or set PEAR_BENCH_LARGE=1")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bench_repeats(request):
    return request.config.getoption("--bench-repeats")


@pytest.fixture(scope="session")
def bench_record(request):
    """Call with one measured row (a measure_in_child dict) and its group name."""
    rows = request.config._pear_bench_rows

    def record(row, group):
        row = dict(row)
        row["group"] = group
        rows.append(row)
        return row

    return record


@pytest.fixture(scope="session")
def bench_crosscheck(request):
    return request.config._pear_bench_crosscheck


def _key(r):
    return (r.get("device", "cpu"), r["n"], r["h"], r["v"], r["dtype"], r["variant"], r["loss"])


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    rows = getattr(config, "_pear_bench_rows", [])
    if not rows or config.getoption("--bench-no-write"):
        return
    out_dir = config.getoption("--bench-results") or RESULTS_DIR
    cc = dict(config._pear_bench_crosscheck)
    old_path = os.path.join(out_dir, "cpu.json")
    if not config.getoption("--bench-fresh") and os.path.exists(old_path):
        with open(old_path) as f:
            old = json.load(f)
        new_keys = {_key(r) for r in rows}
        rows = [r for r in old.get("rows", []) if _key(r) not in new_keys] + rows
        cc = {**(old.get("crosscheck") or {}), **cc}
    paths = bench_report.write_results(rows, out_dir, "cpu", cc or None)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("pear_kernels benchmark results: " + ", ".join(paths.values()))
