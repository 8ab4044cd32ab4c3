"""Autocast at the op boundary.

Inside an autocast region torch would run our chunk matmuls in the autocast dtype while the
buffers and accumulators were sized from the input dtype, mixing dtypes. Like a matmul under
autocast, the op instead takes its floating inputs in the autocast dtype and runs with autocast
off: the caller gets the precision it asked for, and every kernel sees one dtype.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

__all__ = ["leave_autocast"]


def leave_autocast(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], contextlib.AbstractContextManager]:
    """(hidden, weight, bias) cast to the active autocast dtype, and a context disabling it."""
    if not torch.is_tensor(hidden):
        return hidden, weight, bias, contextlib.nullcontext()
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return hidden, weight, bias, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device)

    def cast(t):
        return t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t

    return cast(hidden), cast(weight), cast(bias), torch.autocast(device, enabled=False)
