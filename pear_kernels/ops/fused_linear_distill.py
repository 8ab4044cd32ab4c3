"""The autograd Function of PEAR-weighted top-k distillation (hidden states -> weighted KL).

Same contract as FusedLinearPEARFunction: gradients computed in forward for "mean"/"sum" and
saved with save_for_backward (a second backward through a retained graph gets them again,
scaled by its grad_output: they are kept, not handed out once), a recompute pass for "none"
(the upstream gradient is per token and unknown in forward); differentiable once; no gradient
work in forward when nothing requires grad.

The chunk loop is kernels/torch_distill.py's on every backend; the backend picks its row
math: PyTorch ops, the C++ softmax passes (``native``, CPU) or Triton row kernels
(``triton``: CUDA, or CPU tensors under TRITON_INTERPRET=1). Selection follows the SFT loss's
(``PEAR_KERNELS_BACKEND`` / ``backend=``, see ops/dispatch.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from ..kernels import native_cpu, torch_chunked, torch_distill
from ..kernels.backend import PEARProblem
from .dispatch import select_backend
from .fused_linear_pear import _loss_dtype, _needed_grads, backward_grads, loss_scale
from .once import differentiable_once

__all__ = ["FusedLinearDistillFunction", "fused_linear_distill", "select_distill_rows"]


def select_distill_rows(device: torch.device, backend: Optional[str], hidden_size: int, dtype: torch.dtype):
    """The row-math strategy for a problem: the SFT loss's dispatch (same names, same rule for
    "auto", same errors for an unavailable backend), mapped to the distillation row math.

    The SFT rule (native rows on CPU for hidden size <= NATIVE_MAX_HIDDEN) holds here too:
    measured round-robin, 3 rounds, 2 shared cores (benchmarks/test_distill_bench.py, fp32,
    K = 8, forward + backward), native / torch rows = 0.97 at N=2048 H=256 V=32000 and 1.00
    at N=1024 H=896 V=151936."""
    module = select_backend(device, backend, hidden_size)
    if module is torch_chunked:
        return torch_distill.TorchDistillRows
    if module is native_cpu:
        return torch_distill.NativeDistillRows
    if dtype == torch.float64:
        # as triton_pear does: float64 serves oracles and tests, the Triton rows keep fp32 state
        return torch_distill.TorchDistillRows
    from ..kernels.triton_distill import TritonDistillRows

    return TritonDistillRows


class FusedLinearDistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, problem: PEARProblem, targets, reduction, num_items, need, rows_math,
                aux):
        layout = problem.layout
        out_dtype = _loss_dtype(hidden.dtype)
        ctx.reduction, ctx.need, ctx.rows_math = reduction, need, rows_math
        ctx.param_dtype, ctx.hidden_dtype = weight.dtype, hidden.dtype
        if reduction == "none":
            result = torch_distill.forward(problem, targets, rows_math)
            loss = layout.to_tokens(result.log_w.exp() * result.token_ce, dtype=out_dtype)
            # hidden/weight/bias through save_for_backward: an in-place change before backward
            # is caught by autograd's version check instead of silently recomputed
            ctx.save_for_backward(hidden, weight, bias, result.log_w)
            ctx.problem, ctx.targets = replace(problem, hidden=None, weight=None, bias=None), targets
        else:
            m = layout.num_supervised
            scale = loss_scale(reduction, num_items, m)
            result = torch_distill.forward(problem, targets, rows_math, grad_scale=scale, need=need)
            loss = (result.loss_sum * scale).to(out_dtype)
            g = result.grads
            ctx.save_for_backward(*((g.hidden, g.weight, g.bias) if g is not None else (None, None, None)))
        aux["result"] = result
        return loss

    @staticmethod
    @differentiable_once
    def backward(ctx, grad_out):
        def recompute(problem, g, log_w):
            return torch_distill.backward(problem, ctx.targets, g * log_w.exp(), ctx.need, ctx.rows_math)

        dh, dw, db = backward_grads(ctx, grad_out, recompute)
        return dh, dw, db, None, None, None, None, None, None, None


def fused_linear_distill(problem: PEARProblem, targets, reduction: str, num_items_in_batch=None,
                         backend: Optional[str] = None):
    """Run the Function; returns (loss, ForwardResult)."""
    rows_math = select_distill_rows(problem.hidden.device, backend, problem.hidden.shape[-1], problem.hidden.dtype)
    need = _needed_grads(problem.hidden, problem.weight, problem.bias)
    aux: dict = {}
    loss = FusedLinearDistillFunction.apply(
        problem.hidden, problem.weight, problem.bias, problem, targets, reduction, num_items_in_batch, need,
        rows_math, aux,
    )
    return loss, aux["result"]
