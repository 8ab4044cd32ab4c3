"""The autograd Function of the fused linear PEAR loss (hidden states -> weighted NLL).

Forward asks the backend for log-probs, weights and, for reduction "mean"/"sum", the
gradients too (computed chunk by chunk while the logits chunk is live, so nothing of size
tokens x vocab is saved). Backward then only scales by grad_output. For reduction "none" the
upstream gradient is per token and unknown in forward, so backward recomputes the logits
chunk by chunk with per-token factors grad_output_t * w_t.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Tuple

import torch

from ..kernels.backend import ForwardResult, PEARProblem
from .dispatch import select_backend
from .once import differentiable_once

__all__ = ["FusedLinearPEARFunction", "fused_linear_pear"]


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _needed_grads(hidden, weight, bias) -> Tuple[bool, bool, bool]:
    """Which of (dh, dW, db) a backward can ask for. Read *before* Function.apply: inside
    forward grad mode is always off and ctx.needs_input_grad ignores no_grad/inference_mode,
    so it would say True there and the forward would do the gradient work for nothing."""
    if not torch.is_grad_enabled():
        return (False, False, False)
    return (
        hidden.requires_grad,
        weight.requires_grad,
        bias is not None and bias.requires_grad,
    )


def loss_scale(reduction: str, num_items, num_supervised: int) -> float:
    """d loss / d (sum of weighted token losses): 1 for "sum"; for "mean", 1 / num_items_in_batch
    when given, else 1 / the supervised-token count (at least 1). The one place the normaliser
    of the fused losses is computed."""
    if reduction == "sum":
        return 1.0
    if num_items is not None:
        return 1.0 / float(num_items)
    return 1.0 / float(max(num_supervised, 1))


def finish_grads(ctx, dh, dw, db, grad_out=None):
    """Scale saved gradients by grad_output (when given) and round them to the inputs' dtypes:
    the one place the 16-bit rounding happens, after any upstream scale (GradScaler)."""
    if grad_out is not None:
        dh, dw, db = (_scale_by(t, grad_out) for t in (dh, dw, db))
    dh = dh.to(ctx.hidden_dtype) if dh is not None else None
    dw = dw.to(ctx.param_dtype) if dw is not None else None
    db = db.to(ctx.param_dtype) if db is not None else None
    return dh, dw, db


def backward_grads(ctx, grad_out, recompute):
    """The backward of the fused Functions (PEAR and distillation), both reductions.

    mean / sum: the gradients computed in forward, scaled by grad_output. none: the per-token
    upstream gradients g (M,) of the supervised tokens, and ``recompute(problem, g, log_w)``
    recomputes the logits chunk by chunk with the saved (detached) log-weights.
    """
    if ctx.reduction != "none":
        return finish_grads(ctx, *ctx.saved_tensors, grad_out=grad_out)
    hidden, weight, bias, log_w = ctx.saved_tensors
    if not any(ctx.need):
        return None, None, None
    problem = replace(ctx.problem, hidden=hidden, weight=weight, bias=bias)
    g = grad_out.reshape(-1)[problem.layout.sup_index].to(torch.float64)
    grads = recompute(problem, g, log_w)
    return finish_grads(ctx, grads.hidden, grads.weight, grads.bias)


def _scale_by(grad: Optional[torch.Tensor], grad_out: torch.Tensor) -> Optional[torch.Tensor]:
    """grad * grad_out, skipping the multiply when grad_out is exactly 1 on CPU (the usual
    loss.backward()). On other devices the check would stall the stream (a host sync), and a
    multiply is cheap there, so it always multiplies."""
    if grad is None:
        return None
    if grad_out.device.type == "cpu" and bool(grad_out == 1):
        return grad
    return grad * grad_out.to(grad.dtype)


class FusedLinearPEARFunction(torch.autograd.Function):
    """Gradients are computed in forward (mean/sum) and *saved*, not handed out once: every
    backward through a retained graph returns them again (scaled by its grad_output), as an
    ordinary op would. Without retain_graph autograd frees them after the first backward.
    The op is differentiable once: a double backward (create_graph=True, then a backward
    through the gradient) raises instead of treating the gradient as a constant."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, problem: PEARProblem, reduction, num_items, backend, need, aux):
        layout = problem.layout
        m = layout.num_supervised
        out_dtype = _loss_dtype(hidden.dtype)
        ctx.reduction, ctx.backend, ctx.need = reduction, backend, need
        ctx.param_dtype = weight.dtype
        ctx.hidden_dtype = hidden.dtype
        if reduction == "none":
            result: ForwardResult = backend.forward(problem)
            ce = -result.logp.to(torch.float64) if result.token_ce is None else result.token_ce
            token_loss = result.log_w.exp() * ce
            if result.z_loss is not None:
                token_loss = token_loss + result.z_loss
            loss = layout.to_tokens(token_loss, dtype=out_dtype)
            # hidden, weight and bias go through save_for_backward so that an in-place change
            # before backward is caught by autograd's version check, not silently recomputed.
            # The problem (layout, labels, config) stays on ctx for every later backward.
            ctx.save_for_backward(hidden, weight, bias, result.log_w)
            ctx.problem = replace(problem, hidden=None, weight=None, bias=None)
        else:
            scale = loss_scale(reduction, num_items, m)
            result = backend.forward(problem, grad_scale=scale, need=need)
            loss = (result.loss_sum * scale).to(out_dtype)
            grads = result.grads
            # saved in the working precision (fp32 for 16-bit inputs) and rounded to the
            # parameters' dtype only after the upstream gradient is applied: a GradScaler's
            # scale (65536 is not even an fp16 number) or a small grad_output must not meet
            # a gradient already rounded to 16 bits
            dh, dw, db = (grads.hidden, grads.weight, grads.bias) if grads is not None else (None,) * 3
            ctx.save_for_backward(dh, dw, db)
        aux["result"] = result
        return loss

    @staticmethod
    @differentiable_once
    def backward(ctx, grad_out):
        def recompute(problem, g, log_w):
            # the z-loss takes the upstream gradient unweighted
            ucoef = g if problem.options.active else None
            return ctx.backend.backward(problem, g * log_w.exp(), ctx.need, ucoef=ucoef)

        dh, dw, db = backward_grads(ctx, grad_out, recompute)
        return dh, dw, db, None, None, None, None, None, None


def fused_linear_pear(
    problem: PEARProblem,
    reduction: str,
    num_items_in_batch=None,
    backend: Optional[str] = None,
):
    """Run the Function; returns (loss, ForwardResult)."""
    module = select_backend(problem.hidden.device, backend, problem.hidden.shape[-1],
                            options=problem.options.active or problem.want_lse)
    need = _needed_grads(problem.hidden, problem.weight, problem.bias)
    aux: dict = {}
    loss = FusedLinearPEARFunction.apply(
        problem.hidden, problem.weight, problem.bias, problem, reduction, num_items_in_batch, module, need, aux
    )
    return loss, aux["result"]
