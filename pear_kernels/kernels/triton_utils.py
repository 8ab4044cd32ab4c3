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

import triton
import triton.language as tl

__all__ = ["interpreting", "next_pow2", "ROW_WARPS"]

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
