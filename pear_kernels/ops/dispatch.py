"""Backend selection: which kernel module computes a problem on a given device.

``PEAR_KERNELS_BACKEND`` = ``auto`` (default) | ``torch`` | ``native`` overrides the choice.
``auto`` picks, for CPU tensors, the native C++ row pass where it was built and measured to
win (hidden size up to NATIVE_MAX_HIDDEN: there the row work, not the matmuls, dominates),
else the chunked PyTorch path.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

import torch

from ..kernels import native_cpu, torch_chunked

__all__ = ["BACKENDS", "select_backend", "requested_backend", "native_status"]

BACKENDS = ("auto", "torch", "native")
# Largest hidden size at which the native row pass is used by "auto" (see benchmarks and the
# csrc note in README: above it the three matmuls dominate and both paths tie).
NATIVE_MAX_HIDDEN = 1024
ENV_VAR = "PEAR_KERNELS_BACKEND"


def requested_backend(override: Optional[str] = None) -> str:
    name = (override or os.environ.get(ENV_VAR, "auto")).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} / backend must be one of {BACKENDS}, got {name!r}")
    return name


def select_backend(
    device: torch.device, override: Optional[str] = None, hidden_size: Optional[int] = None
) -> ModuleType:
    """The kernel module for tensors on ``device`` with the given hidden size."""
    name = requested_backend(override)
    if name == "native":
        if not native_cpu.available():
            raise RuntimeError(f"backend 'native' requested but {native_cpu.unavailable_reason()}")
        if device.type != "cpu":
            raise ValueError(f"backend 'native' runs on CPU tensors only, got {device}")
        return native_cpu
    if name == "auto" and device.type == "cpu" and native_cpu.available():
        if hidden_size is not None and hidden_size <= NATIVE_MAX_HIDDEN:
            return native_cpu
    return torch_chunked


def native_status() -> str:
    """Which CPU path is active: a line for logs and bug reports."""
    if native_cpu.available():
        return f"native CPU row pass: built (used by 'auto' for hidden size <= {NATIVE_MAX_HIDDEN})"
    return f"native CPU row pass: not available ({native_cpu.unavailable_reason()})"
