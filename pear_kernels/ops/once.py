"""The fused ops are differentiable once: their backward is hand-written, not itself traced.

torch's ``once_differentiable`` only raises when the gradient flowing in requires grad; with
a plain ``loss.backward(create_graph=True)`` it does not, and the gradient of the op comes out
as a constant: a gradient penalty built on it would be silently wrong. This decorator refuses
``create_graph=True`` through the op outright (autograd runs backward with grad mode on
exactly then), and otherwise runs the backward without recording a graph.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["differentiable_once"]


def differentiable_once(backward):
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "pear_kernels' fused ops are differentiable once: a double backward "
                "(create_graph=True, e.g. a gradient penalty) through them is not supported; "
                "use reference_pear_loss for that"
            )
        return backward(ctx, *grads)

    return wrapper
