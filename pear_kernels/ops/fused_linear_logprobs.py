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

from ..kernels import torch_chunked
from ..kernels.backend import PEARProblem
from .dispatch import select_backend
from .once import differentiable_once

__all__ = ["FusedLinearLogprobsFunction", "fused_linear_logprobs"]


class FusedLinearLogprobsFunction(torch.autograd.Function):
    """Log-probs (and, with ``with_entropy``, entropies) as differentiable outputs.

    Backward recomputes the logits chunk by chunk. The entropy carries a gradient (an entropy
    bonus in RL needs it): when its upstream gradient is nonzero the recompute uses
    ``torch_chunked.backward_with_entropy`` (dH/dz_v = -p_v (z_v - E_p z)), on any device.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, problem: PEARProblem, backend, with_entropy):
        ctx.save_for_backward(hidden, weight, bias)  # read back in backward: version-checked
        ctx.problem, ctx.backend = replace(problem, hidden=None, weight=None, bias=None), backend
        ctx.need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ctx.param_dtype = weight.dtype
        ctx.with_entropy = with_entropy
        # an output nobody used reaches backward as None, not as a zero tensor: whether the
        # entropy carries a gradient is then known without reading values (on a GPU,
        # `(grad_entropy != 0).any()` would be a host sync on every backward)
        ctx.set_materialize_grads(False)
        if with_entropy:
            return backend.token_logprobs(problem, with_entropy=True)
        return backend.token_logprobs(problem)

    @staticmethod
    @differentiable_once
    def backward(ctx, grad_logp, grad_entropy=None):
        # ctx.problem is kept: a second backward through a retained graph recomputes again
        hidden, weight, bias = ctx.saved_tensors
        if not any(ctx.need):
            return (None,) * 6
        if grad_logp is None and grad_entropy is None:
            return (None,) * 6
        problem = replace(ctx.problem, hidden=hidden, weight=weight, bias=bias)
        if grad_logp is None:  # only the entropy was used
            coef = torch.zeros(problem.layout.num_supervised, dtype=torch.float64, device=hidden.device)
        else:
            coef = -grad_logp.to(torch.float64)
        if grad_entropy is not None:
            grads = torch_chunked.backward_with_entropy(problem, coef, grad_entropy.to(torch.float64), ctx.need)
        else:
            grads = ctx.backend.backward(problem, coef, ctx.need)
        dh = grads.hidden.to(hidden.dtype) if grads.hidden is not None else None
        dw = grads.weight.to(ctx.param_dtype) if grads.weight is not None else None
        db = grads.bias.to(ctx.param_dtype) if grads.bias is not None else None
        return dh, dw, db, None, None, None


def fused_linear_logprobs(problem: PEARProblem, with_entropy: bool = False, backend: Optional[str] = None):
    """(M,) log-probs of the problem's supervised labels (and (M,) entropies), differentiable."""
    module = select_backend(problem.hidden.device, backend, problem.hidden.shape[-1],
                            options=problem.options.active)
    return FusedLinearLogprobsFunction.apply(
        problem.hidden, problem.weight, problem.bias, problem, module, with_entropy
    )
