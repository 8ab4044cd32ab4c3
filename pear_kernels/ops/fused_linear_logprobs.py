"""Autograd Function: per-token log-probs of the labels straight from hidden states.

The building block for losses that are plain functions of log pi_theta(y_t): a GRPO policy
loss, behavior log-prob collection. Forward keeps no logits; backward turns the upstream
gradient g_t = dL/dlogp_t into the per-token factor of the shared recompute pass:

    dlogp_t/dz_t = onehot(y_t) - p_t   =>   dL/dz_t = (-g_t) * (p_t - onehot(y_t))

so ``backend.backward(problem, coef=-g)`` gives dh, dW, db (3 matmuls per chunk).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from ..kernels.problem import PEARProblem
from .dispatch import select_backend
from .once import differentiable_once

__all__ = ["FusedLinearLogprobsFunction", "fused_linear_logprobs"]


class FusedLinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, problem: PEARProblem, backend, with_entropy, aux):
        if with_entropy:
            logp, entropy = backend.token_logprobs(problem, with_entropy=True)
            aux["entropy"] = entropy
        else:
            logp = backend.token_logprobs(problem)
        ctx.save_for_backward(hidden, weight, bias)  # read back in backward: version-checked
        ctx.problem, ctx.backend = replace(problem, hidden=None, weight=None, bias=None), backend
        ctx.need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ctx.param_dtype = weight.dtype
        return logp

    @staticmethod
    @differentiable_once
    def backward(ctx, grad_logp):
        # ctx.problem is kept: a second backward through a retained graph recomputes again
        hidden, weight, bias = ctx.saved_tensors
        if not any(ctx.need):
            return (None,) * 7
        problem = replace(ctx.problem, hidden=hidden, weight=weight, bias=bias)
        grads = ctx.backend.backward(problem, -grad_logp.to(torch.float64), ctx.need)
        dh = grads.hidden.to(hidden.dtype) if grads.hidden is not None else None
        dw = grads.weight.to(ctx.param_dtype) if grads.weight is not None else None
        db = grads.bias.to(ctx.param_dtype) if grads.bias is not None else None
        return dh, dw, db, None, None, None, None


def fused_linear_logprobs(problem: PEARProblem, with_entropy: bool = False, backend: Optional[str] = None):
    """(M,) log-probs of the problem's supervised labels (and (M,) entropies, detached)."""
    module = select_backend(problem.hidden.device, backend, problem.hidden.shape[-1],
                            options=problem.options.active)
    aux: dict = {}
    logp = FusedLinearLogprobsFunction.apply(
        problem.hidden, problem.weight, problem.bias, problem, module, with_entropy, aux
    )
    return (logp, aux["entropy"]) if with_entropy else logp
