"""Shared helpers of the Triton kernels: interpreter detection and launch configs.

Triton is optional: this module imports it, and only the Triton kernel modules import this
one (the dispatcher imports them lazily), so ``import pear_kernels`` never needs triton.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors, one program at a time in NumPy.
Two of the interpreter's limits shape the kernels:
- 16-bit loads must be cast to float32 at once (bf16 arithmetic is wrong there), so the fused
  kernels take an ``UPCAST`` flag that is True under the interpreter. On a GPU, bf16 tiles go
  to tl.dot natively (tensor cores, fp32 accumulation). The row kernels only read fp32.
- @triton.autotune with several configs fails, so the interpreter gets a single config.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["interpreting", "next_pow2", "ROW_WARPS", "fp32_matmul_uses_tf32"]

# A warp of 32 threads holding 4 contiguous fp32 each covers 128 columns; 4 warps per row
# program stream a 2048-wide vocabulary tile through registers without spilling.
ROW_WARPS = 4


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter.

    Triton fixes that when it is first imported (TRITON_INTERPRET=1 then turns its @jit
    standard library into interpreted functions), so the standard library is asked, not the
    environment, which may have changed since.
    """
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - a triton without the interpreter module
        return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")
    return isinstance(getattr(tl, "zeros", None), InterpretedFunction)


def next_pow2(n: int) -> int:
    return int(triton.next_power_of_2(max(int(n), 1)))


def fp32_matmul_uses_tf32() -> bool:
    """Whether torch runs fp32 CUDA matmuls in TF32, read the way torch >= 2.9 wants it.

    torch 2.9 added ``torch.backends.cuda.matmul.fp32_precision`` ("ieee" / "tf32" / "none",
    the latter inheriting ``torch.backends.fp32_precision``); once a user sets it, reading the
    legacy ``allow_tf32`` raises ("mix of the legacy and new APIs"). The new API is read first
    and the legacy flag only where the new one is absent or undecided.
    """
    matmul = torch.backends.cuda.matmul
    for owner, name in ((matmul, "fp32_precision"), (torch.backends, "fp32_precision")):
        try:
            value = getattr(owner, name, None)
        except RuntimeError:
            value = None
        if value == "tf32":
            return True
        if value == "ieee":
            return False
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # the new API is in use but undecided: torch's default is IEEE fp32
        return False
