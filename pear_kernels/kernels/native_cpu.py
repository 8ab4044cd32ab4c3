"""The chunked path with the native C++ row pass and scan (csrc/pear_rows.cpp).

Same passes and chunking as ``torch_chunked``; only the per-chunk primitives change:
softmax statistics in two memory passes instead of five, the weighted softmax-minus-one-hot
in one, the token/block PEAR scan in one loop. The extension is optional: ``available()``
says whether it was built, ``unavailable_reason()`` why not.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from ..config import Variant
from ..weights import scan_chunk
from . import torch_chunked
from .problem import PEARProblem

__all__ = ["available", "unavailable_reason", "NativeRows", "forward", "backward", "token_logprobs"]

try:  # built by setup.py (as pear_kernels.kernels._native) when torch was importable at build time
    from . import _native  # type: ignore[attr-defined]

    _REASON: Optional[str] = None
except ImportError:  # pure-Python install, or the compile failed
    _native = None
    _REASON = (
        "the optional C++ extension pear_kernels.kernels._native was not built (a plain `pip install .` "
        "builds in an isolated environment without torch); build it with "
        "`pip install --no-build-isolation -e .` (needs torch and a C++ compiler)"
    )


def available() -> bool:
    return _native is not None


def unavailable_reason() -> Optional[str]:
    return _REASON


class NativeRows(torch_chunked.LocalRows):
    """LocalRows with the C++ primitives; entropy and the other scans stay in PyTorch."""

    @staticmethod
    def softmax_stats_(z: torch.Tensor, y: torch.Tensor):
        return _native.softmax_stats_(z, y)

    @staticmethod
    def dlogits_(e: torch.Tensor, s: torch.Tensor, y: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        return _native.dlogits_(e, s.contiguous(), y, coef.contiguous())

    @staticmethod
    def scan(log_ratio, d, incl, layout, config, start: int, end: int) -> torch.Tensor:
        if config.variant not in (Variant.TOKEN, Variant.BLOCK):
            return scan_chunk(log_ratio, d, incl, layout, config, start, end)
        low, high = config.delta_clip
        return _native.pear_scan_chunk(
            log_ratio.contiguous(), d, incl, layout.seq_end, layout.n_after, layout.block_end,
            start, end, low, high, config.log_gamma, 0 if config.variant is Variant.TOKEN else 1,
        )


def _native_problem(problem: PEARProblem) -> PEARProblem:
    if _native is None:
        raise RuntimeError(f"the native CPU backend is unavailable: {_REASON}")
    if problem.hidden.device.type != "cpu":
        raise ValueError(f"the native CPU backend takes CPU tensors, got {problem.hidden.device}")
    if problem.vocab_parallel is not None:
        return problem  # the vocabulary-parallel row math combines across ranks itself
    return replace(problem, row_math=NativeRows)


def forward(problem, grad_scale=None, need=(False, False, False)):
    return torch_chunked.forward(_native_problem(problem), grad_scale, need)


def backward(problem, coef, need, ucoef=None):
    return torch_chunked.backward(_native_problem(problem), coef, need, ucoef)


def token_logprobs(problem, with_entropy: bool = False):
    return torch_chunked.token_logprobs(_native_problem(problem), with_entropy)
