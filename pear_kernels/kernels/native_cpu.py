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
from ..importance import scan_chunk
from . import torch_chunked
from .backend import PEARProblem

__all__ = ["available", "unavailable_reason", "supports_options", "NativeRows", "NativeOptionRows", "forward", "backward", "token_logprobs"]

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


class NativeOptionRows(torch_chunked.OptionRows):
    """OptionRows (softcap, z-loss, label smoothing, lse) with the C++ row passes: the softcap,
    max, mean and exp in two memory passes (``option_stats_``) and the gradient in one
    (``option_dlogits_``); the math is the same as OptionRows' (see its docstring)."""

    scan = staticmethod(NativeRows.scan)

    def _dcap_for(self, z: torch.Tensor) -> torch.Tensor:
        if self.o.softcap is None:
            return _EMPTY
        buf = self._dcap_buf
        if buf is None or buf.shape[0] < z.shape[0] or buf.shape[1] != z.shape[1] or buf.dtype != z.dtype:
            buf = self._dcap_buf = torch.empty_like(z)
        return buf[: z.shape[0]]

    def softmax_stats_(self, z: torch.Tensor, y: torch.Tensor):
        dcap = self._dcap_for(z)
        c, t = self.o.softcap, self.temperature
        cap_in, cap_out = (t / c, c / t) if c is not None else (1.0, 1.0)
        logp, s, self.lse, zmean = _native.option_stats_(z, y, dcap, cap_in, cap_out, bool(self.o.label_smoothing))
        self.zmean = zmean if self.o.label_smoothing else None
        self.dcap = dcap if c is not None else None
        return logp, s

    def dlogits_ext_(self, expz, s, y, coef, ucoef):
        eps = self.o.label_smoothing
        factor = coef
        if self.o.lse_square_scale:
            factor = coef + ucoef * (2.0 * self.o.lse_square_scale) * self.lse.to(coef.dtype)
        target = coef * (1.0 - eps) if eps else coef
        uniform = coef * (eps / expz.shape[1]) if eps else torch.zeros_like(coef)
        dcap = self.dcap if self.dcap is not None else _EMPTY
        return _native.option_dlogits_(expz, s.contiguous(), y, factor.contiguous(), target.contiguous(),
                                       uniform.contiguous(), dcap)


_EMPTY = torch.empty(0)


def supports_options() -> bool:
    """Whether the built extension has the loss-option row passes (an extension built from an
    older csrc/ lacks them; "auto" then uses the PyTorch path for those options)."""
    return _native is not None and hasattr(_native, "option_stats_")


def _native_problem(problem: PEARProblem) -> PEARProblem:
    if _native is None:
        raise RuntimeError(f"the native CPU backend is unavailable: {_REASON}")
    if problem.hidden.device.type != "cpu":
        raise ValueError(f"the native CPU backend takes CPU tensors, got {problem.hidden.device}")
    if problem.vocab_parallel is not None:
        return problem  # the vocabulary-parallel row math combines across ranks itself
    if problem.options.active or problem.want_lse:
        if not supports_options():
            raise RuntimeError(
                "the native extension was built without the loss options (softcap, lse_square_scale, "
                "label_smoothing, return_lse): rebuild it (`pip install --no-build-isolation -e .`) "
                "or use backend='torch'"
            )
        return replace(problem, row_math=NativeOptionRows)
    return replace(problem, row_math=NativeRows)


def forward(problem, grad_scale=None, need=(False, False, False)):
    return torch_chunked.forward(_native_problem(problem), grad_scale, need)


def backward(problem, coef, need, ucoef=None):
    return torch_chunked.backward(_native_problem(problem), coef, need, ucoef)


def token_logprobs(problem, with_entropy: bool = False):
    return torch_chunked.token_logprobs(_native_problem(problem), with_entropy)
