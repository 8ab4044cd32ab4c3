"""Triton is optional: without it the package imports, dispatches to the chunked PyTorch
kernels and names the extra to install when the Triton backend is asked for.

Runs with or without triton installed (its absence is simulated), and needs no interpreter.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch


def _close(actual, expected, rtol):
    err = float((actual.double() - expected.double()).abs().max())
    assert err <= rtol * max(1e-3, float(expected.double().abs().max())), err


def _problem(seed, n=8, h=16, v=50):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * 0.3
    b = torch.randn(v, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    y[0] = -100
    beh = -torch.rand(n, generator=g) * 5
    return hid, w, b, y, beh


def test_package_works_without_triton(monkeypatch):
    """Simulate a machine without triton: a fresh import of the package must work on CPU,
    auto-dispatch must fall back to the chunked kernels, and asking for triton must name the extra."""
    for name in list(sys.modules):
        if name == "pear_kernels" or name.startswith("pear_kernels."):
            monkeypatch.delitem(sys.modules, name)
    for name in list(sys.modules):
        if name == "triton" or name.startswith("triton."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    fresh = importlib.import_module("pear_kernels")
    fresh_dispatch = importlib.import_module("pear_kernels.ops.dispatch")
    assert not fresh_dispatch.triton_available()
    assert fresh_dispatch.select_backend(torch.device("cuda")).__name__.endswith("torch_chunked")
    with pytest.raises(ImportError, match=r"pear_kernels\[triton\]"):
        fresh_dispatch.select_backend(torch.device("cpu"), "triton")
    hid, w, b, y, beh = _problem(11)
    loss = fresh.fused_pear_loss(hid, w, y, beh, bias=b)
    ref = fresh.reference_pear_loss(hid, w, y, beh, bias=b, compute_dtype=torch.float64)
    _close(loss, ref, 2e-5)
    assert not any(k.startswith("pear_kernels.kernels.triton") for k in sys.modules)
