"""Backend selection: which kernel module computes a problem on a given device.

``PEAR_KERNELS_BACKEND`` = ``auto`` (default) | ``torch`` | ``native`` | ``triton`` overrides
the choice; a ``backend=`` argument overrides the variable.
``auto`` picks Triton for CUDA tensors when it is installed; for CPU tensors the native C++ row
pass (csrc/) where it was built and measured to win (hidden size up to NATIVE_MAX_HIDDEN: there
the row work, not the matmuls, is a visible share of the time), else the chunked PyTorch path.
``triton`` on CPU tensors means Triton's CPU interpreter, which needs TRITON_INTERPRET=1
(the variable decides, when the kernels are first imported, whether they are compiled or
interpreted). Triton is optional: it is imported only when a Triton backend is chosen.
``PEAR_KERNELS_TRITON_FUSED=1`` selects the Triton backend's fused recompute path (no logits
buffer, 4 matmuls; opt-in, see docs/triton_backend.md); it is read here, per selection.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Optional

import torch

from ..kernels import native_cpu, torch_chunked

__all__ = ["BACKENDS", "select_backend", "requested_backend", "triton_available", "native_status",
           "triton_fused_requested", "FUSED_ENV_VAR"]

BACKENDS = ("auto", "torch", "native", "triton")
# Largest hidden size at which "auto" uses the native row pass on CPU. Measured round-robin on
# 2 idle cores (benchmarks/test_cpu_native.py, N=2048, fp32, forward+backward), native/torch:
# V=32000: H=64 0.88, 128 0.90, 256 0.94, 512 0.97, 1024 0.99, 2048 0.99;
# V=151936: H=64 0.87, 256 0.93, 896 0.98; with 1024-row chunks at H=1024 0.97 (2026-12-05).
# It never lost, and its share of the time falls as H grows (the matmuls dominate), so "auto"
# uses it at every size measured.
NATIVE_MAX_HIDDEN = 8192
ENV_VAR = "PEAR_KERNELS_BACKEND"
FUSED_ENV_VAR = "PEAR_KERNELS_TRITON_FUSED"


def requested_backend(override: Optional[str] = None) -> str:
    name = (override or os.environ.get(ENV_VAR, "auto")).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} / backend must be one of {BACKENDS}, got {name!r}")
    return name


def triton_available() -> bool:
    """Whether triton can be imported (without importing it when it is absent)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def _triton_imported_compiled() -> bool:
    """True if triton was imported without TRITON_INTERPRET: its @jit standard library is then
    compiled-only and the interpreter cannot run kernels in this process."""
    lang = sys.modules.get("triton.language")
    if lang is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return not isinstance(getattr(lang, "zeros", None), InterpretedFunction)


def triton_fused_requested() -> bool:
    return os.environ.get(FUSED_ENV_VAR, "0").strip().lower() in ("1", "true", "yes")


class FusedTriton:
    """The Triton backend with its fused recompute path (the ``Backend`` protocol of
    kernels/backend.py, ``fused=True`` passed on); everything else is the module's."""

    def __init__(self, module: ModuleType):
        self.module = module

    def forward(self, problem, grad_scale=None, need=(False, False, False)):
        return self.module.forward(problem, grad_scale, need, fused=True)

    def backward(self, problem, coef, need, ucoef=None):
        return self.module.backward(problem, coef, need, fused=True, ucoef=ucoef)

    def token_logprobs(self, problem, with_entropy: bool = False):
        return self.module.token_logprobs(problem, with_entropy)

    def __getattr__(self, name):
        return getattr(self.module, name)


def _triton_backend():
    try:
        module = importlib.import_module("pear_kernels.kernels.triton_pear")
    except ImportError as exc:
        if "triton" in str(exc).lower() and not triton_available():
            raise ImportError(
                "the triton backend needs triton: pip install pear_kernels[triton]"
            ) from exc
        raise
    return FusedTriton(module) if triton_fused_requested() else module


def native_status() -> str:
    """Which CPU path is active: a line for logs and bug reports."""
    if native_cpu.available():
        return f"native CPU row pass: built (used by 'auto' for hidden size <= {NATIVE_MAX_HIDDEN})"
    return f"native CPU row pass: not available ({native_cpu.unavailable_reason()})"


def select_backend(
    device: torch.device, override: Optional[str] = None, hidden_size: Optional[int] = None,
    options: bool = False,
):
    """The kernel module (a ``Backend``) for tensors on ``device`` (with the given hidden size).

    ``options``: the loss uses softcap, z-loss, label smoothing or returns the logsumexp.
    Every backend implements them, except a native extension built from an older csrc/
    (``native_cpu.supports_options()``): "auto" then picks the PyTorch path, and a forced
    "native" is refused rather than silently ignoring the option.
    """
    name = requested_backend(override)
    device = torch.device(device)
    if name == "torch":
        return torch_chunked
    if options and name == "native" and native_cpu.available() and not native_cpu.supports_options():
        raise ValueError(
            "backend 'native' (this build of the C++ extension) does not implement softcap, "
            "lse_square_scale, label_smoothing or return_lse; rebuild it "
            "(`pip install --no-build-isolation -e .`), or use backend='torch' or 'auto'"
        )
    if name == "native":
        if not native_cpu.available():
            raise RuntimeError(f"backend 'native' requested but {native_cpu.unavailable_reason()}")
        if device.type != "cpu":
            raise ValueError(f"backend 'native' runs on CPU tensors only, got {device}")
        return native_cpu
    if name == "auto":
        if device.type == "cuda" and triton_available():
            return _triton_backend()
        if (
            device.type == "cpu"
            and native_cpu.available()
            and (not options or native_cpu.supports_options())
            and hidden_size is not None
            and hidden_size <= NATIVE_MAX_HIDDEN
        ):
            return native_cpu
        return torch_chunked
    if not triton_available():
        raise ImportError("backend 'triton' needs triton: pip install pear_kernels[triton]")
    if device.type == "cpu":
        if not _interpreting():
            raise RuntimeError(
                "backend 'triton' on CPU tensors runs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before importing triton, or use backend='torch' (or move the tensors to CUDA)"
            )
        if _triton_imported_compiled():
            raise RuntimeError(
                "backend 'triton' on CPU tensors: TRITON_INTERPRET=1 must be set before triton is "
                "first imported in the process (it was imported without it)"
            )
    elif device.type != "cuda":
        raise RuntimeError(f"backend 'triton' supports CUDA (or CPU under TRITON_INTERPRET=1), got {device}")
    return _triton_backend()
