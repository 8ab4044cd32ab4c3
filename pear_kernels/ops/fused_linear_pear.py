"""The autograd Function of the fused linear PEAR loss (hidden states -> weighted NLL).

Forward asks the backend for log-probs, weights and, for reduction "mean"/"sum", the
gradients too (computed chunk by chunk while the logits chunk is live, so nothing of size
tokens x vocab is saved). Backward then only scales by grad_output. For reduction "none" the
upstream gradient is per token and unknown in forward, so backward recomputes the logits
chunk by chunk with per-token factors grad_output_t * w_t.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from ..kernels.problem import ForwardResult, PEARProblem
from .dispatch import select_backend

__all__ = ["FusedLinearPEARFunction", "fused_linear_pear"]


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class FusedLinearPEARFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, problem: PEARProblem, reduction, num_items, backend, aux):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        layout = problem.layout
        m = layout.num_supervised
        out_dtype = _loss_dtype(hidden.dtype)
        if reduction == "none":
            result: ForwardResult = backend.forward(problem)
            token_loss = -(result.log_w.exp() * result.logp.to(torch.float64))
            loss = torch.zeros(layout.n_tokens, dtype=out_dtype, device=hidden.device)
            loss[layout.sup_index] = token_loss.to(out_dtype)
            # hidden, weight and bias go through save_for_backward so that an in-place change
            # before backward is caught by autograd's version check, not silently recomputed
            ctx.save_for_backward(hidden, weight, bias)
            ctx.problem, ctx.need = replace(problem, hidden=None, weight=None, bias=None), need
            ctx.log_w = result.log_w
        else:
            if reduction == "sum":
                scale = 1.0
            else:
                denom = float(num_items) if num_items is not None else float(max(m, 1))
                scale = 1.0 / denom
            result = backend.forward(problem, grad_scale=scale, need=need)
            loss = (result.loss_sum * scale).to(out_dtype)
            ctx.grads = result.grads
        ctx.reduction, ctx.backend = reduction, backend
        ctx.param_dtype = weight.dtype
        aux["result"] = result
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            hidden, weight, bias = ctx.saved_tensors
            problem = replace(ctx.problem, hidden=hidden, weight=weight, bias=bias)
            g = grad_out.reshape(-1)[problem.layout.sup_index].to(torch.float64)
            grads = ctx.backend.backward(problem, g * ctx.log_w.exp(), ctx.need)
            ctx.problem = None
        else:
            grads = ctx.grads
            ctx.grads = None
        dh = dw = db = None
        if grads is not None:
            unit = ctx.reduction == "none" or bool(grad_out == 1)
            g = None if unit else grad_out
            if grads.hidden is not None:
                dh = grads.hidden if g is None else grads.hidden * g.to(grads.hidden.dtype)
            if grads.weight is not None:
                dw = grads.weight if g is None else grads.weight * g.to(grads.weight.dtype)
                dw = dw.to(ctx.param_dtype)
            if grads.bias is not None:
                db = grads.bias if g is None else grads.bias * g.to(grads.bias.dtype)
                db = db.to(ctx.param_dtype)
        return dh, dw, db, None, None, None, None, None


def fused_linear_pear(
    problem: PEARProblem,
    reduction: str,
    num_items_in_batch=None,
    backend: Optional[str] = None,
):
    """Run the Function; returns (loss, ForwardResult)."""
    module = select_backend(problem.hidden.device, backend, problem.hidden.shape[-1])
    aux: dict = {}
    loss = FusedLinearPEARFunction.apply(
        problem.hidden, problem.weight, problem.bias, problem, reduction, num_items_in_batch, module, aux
    )
    return loss, aux["result"]
