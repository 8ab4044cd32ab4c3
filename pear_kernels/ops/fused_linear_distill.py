"""The autograd Function of PEAR-weighted top-k distillation (hidden states -> weighted KL).

Same contract as FusedLinearPEARFunction: gradients computed in forward for "mean"/"sum" and
saved (a second backward through a retained graph gets them again, scaled by its
grad_output), a recompute pass for "none"; differentiable once; no gradient work without
grad. The chunked PyTorch kernels (kernels/torch_distill.py) serve every device.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..kernels import torch_distill
from ..kernels.problem import PEARProblem
from .fused_linear_pear import _loss_dtype, _needed_grads, finish_grads
from .once import differentiable_once

__all__ = ["FusedLinearDistillFunction", "fused_linear_distill"]


class FusedLinearDistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, problem: PEARProblem, targets, reduction, num_items, need, aux):
        layout = problem.layout
        out_dtype = _loss_dtype(hidden.dtype)
        ctx.reduction, ctx.need = reduction, need
        ctx.param_dtype, ctx.hidden_dtype = weight.dtype, hidden.dtype
        if reduction == "none":
            result = torch_distill.forward(problem, targets)
            loss = torch.zeros(layout.n_tokens, dtype=out_dtype, device=hidden.device)
            loss[layout.sup_index] = (result.log_w.exp() * result.token_ce).to(out_dtype)
            ctx.save_for_backward(hidden, weight, bias, result.log_w)
            ctx.problem, ctx.targets = replace(problem, hidden=None, weight=None, bias=None), targets
        else:
            m = layout.num_supervised
            scale = 1.0 if reduction == "sum" else 1.0 / (float(num_items) if num_items is not None else float(max(m, 1)))
            result = torch_distill.forward(problem, targets, grad_scale=scale, need=need)
            loss = (result.loss_sum * scale).to(out_dtype)
            g = result.grads
            ctx.save_for_backward(*((g.hidden, g.weight, g.bias) if g is not None else (None, None, None)))
        aux["result"] = result
        return loss

    @staticmethod
    @differentiable_once
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            hidden, weight, bias, log_w = ctx.saved_tensors
            if not any(ctx.need):
                return (None,) * 9
            problem = replace(ctx.problem, hidden=hidden, weight=weight, bias=bias)
            g = grad_out.reshape(-1)[problem.layout.sup_index].to(torch.float64)
            grads = torch_distill.backward(problem, ctx.targets, g * log_w.exp(), ctx.need)
            dh, dw, db = finish_grads(ctx, grads.hidden, grads.weight, grads.bias)
        else:
            dh, dw, db = finish_grads(ctx, *ctx.saved_tensors, grad_out=grad_out)
        return dh, dw, db, None, None, None, None, None, None


def fused_linear_distill(problem: PEARProblem, targets, reduction: str, num_items_in_batch=None):
    """Run the Function; returns (loss, ForwardResult)."""
    need = _needed_grads(problem.hidden, problem.weight, problem.bias)
    aux: dict = {}
    loss = FusedLinearDistillFunction.apply(
        problem.hidden, problem.weight, problem.bias, problem, targets, reduction, num_items_in_batch, need, aux
    )
    return loss, aux["result"]
