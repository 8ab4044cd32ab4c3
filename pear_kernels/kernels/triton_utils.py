"""Shared helpers of the Triton kernels: interpreter detection and launch configs.

Triton is optional: this module imports it, and only the Triton kernel modules import this
one (the dispatcher imports them lazily), so ``import pear_kernels`` never needs triton.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors, one program at a time in NumPy.
Two of the interpreter's limits shape the kernels:
- 16-bit loads must be cast to float32 at once (bf16 arithmetic is wrong there), so every
  kernel takes an ``UPCAST`` flag that is True under the interpreter. On a GPU, bf16 tiles go
  to tl.dot natively (tensor cores, fp32 accumulation).
- @triton.autotune with several configs fails, so the interpreter gets a single config.
"""

from __future__ import annotations

import os

import torch
import triton

__all__ = ["interpreting", "dot_precision", "next_pow2", "ROW_WARPS"]

# A warp of 32 threads holding 4 contiguous fp32 each covers 128 columns; 4 warps per row
# program stream a 2048-wide vocabulary tile through registers without spilling.
ROW_WARPS = 4


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (read at launch time)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision for inputs of ``dtype``.

    fp32 inputs use "ieee": torch.mm in fp32 does not use TF32 by default, and the oracle
    comparison (and users' expectations of an fp32 model) need the full mantissa. 16-bit
    inputs run on tensor cores either way; the flag only matters for fp32 operands.
    """
    return "ieee" if dtype in (torch.float32, torch.float64) or interpreting() else "tf32"


def next_pow2(n: int) -> int:
    return int(triton.next_power_of_2(max(int(n), 1)))
