"""fused_pear_loss as a torch custom op, for torch.compile (fullgraph, dynamic shapes).

Dynamo cannot trace the eager entry point: validation reads values, the supervised-token
layout has data-dependent sizes, and the autograd Function carries Python objects. Under
``torch.compile`` the public function therefore calls ``pear_kernels::pear_loss``, an opaque
op whose signature holds only tensors and scalars. Its real implementation runs the same
eager path (checks, layout, backend); its fake implementation gives the output shapes from
the input shapes alone, so the graph needs no break and the sequence length can be dynamic.

Gradients (``register_autograd``):
- mean / sum: the op returns the gradients computed in forward (dh, dW, db; fp32 for 16-bit
  inputs) next to the loss, and backward scales them by grad_output (rounding to the inputs'
  dtypes after the scale, as the eager Function does);
- none: the op also returns the clipped log-weights scattered to (N,), and backward calls
  ``pear_kernels::pear_loss_none_backward``, which recomputes the logits chunk by chunk.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .config import PEARConfig
from .inputs import loss_options, prepare_problem
from .kernels.backend import LossOptions
from .ops.dispatch import select_backend
from .ops.fused_linear_pear import loss_scale

__all__ = ["pear_loss_op"]

_SIXTEEN = (torch.float16, torch.bfloat16)


def _work(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(hidden, weight, bias, labels, behavior, cu_seqlens, num_items, variant, gamma, block_size,
             delta_lo, delta_hi, w_lo, w_hi, temperature, reduction, ignore_index, chunk_size, softcap,
             lse_square_scale, label_smoothing):

    config = PEARConfig(variant=variant, gamma=gamma, block_size=block_size, delta_clip=(delta_lo, delta_hi),
                        log_weight_clip=(w_lo, w_hi))
    options: LossOptions = loss_options(None if softcap == -1.0 else softcap, lse_square_scale, label_smoothing)
    return prepare_problem(
        hidden, weight, labels, behavior, config=config, bias=bias, cu_seqlens=cu_seqlens,
        temperature=temperature, reduction=reduction, num_items_in_batch=num_items, ignore_index=ignore_index,
        chunk_size=chunk_size if chunk_size > 0 else None, backend=None, vocab_parallel_group=None,
        options=options,
    )


@torch.library.custom_op("pear_kernels::pear_loss", mutates_args=())
def pear_loss_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    behavior: torch.Tensor, cu_seqlens: Optional[torch.Tensor], num_items: Optional[torch.Tensor],
    variant: str, gamma: float, block_size: int, delta_lo: float, delta_hi: float, w_lo: float, w_hi: float,
    temperature: float, reduction: str, ignore_index: int, chunk_size: int, backend: str,
    softcap: float, lse_square_scale: float, label_smoothing: float,
    need_dh: bool, need_dw: bool, need_db: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    prep = _prepare(hidden, weight, bias, labels, behavior, cu_seqlens, num_items, variant, gamma, block_size,
                    delta_lo, delta_hi, w_lo, w_hi, temperature, reduction, ignore_index, chunk_size, softcap,
                    lse_square_scale, label_smoothing)
    problem, layout = prep.problem, prep.problem.layout
    module = select_backend(hidden.device, backend or None, hidden.shape[-1],
                            options=problem.options.active)
    out_dtype = _work(hidden.dtype)
    m = layout.num_supervised
    with prep.autocast_off:
        if reduction == "none":
            result = module.forward(problem)
            ce = -result.logp.to(torch.float64) if result.token_ce is None else result.token_ce
            tok = result.log_w.exp() * ce + (result.z_loss if result.z_loss is not None else 0.0)
            loss = layout.to_tokens(tok, labels.shape, out_dtype)
            log_w = layout.to_tokens(result.log_w, dtype=torch.float64)
            empty = hidden.new_empty(0)
            return loss, empty, empty.clone(), empty.clone(), log_w
        scale = loss_scale(reduction, num_items, m)
        result = module.forward(problem, grad_scale=scale, need=(need_dh, need_dw, need_db and bias is not None))
    loss = (result.loss_sum * scale).to(out_dtype)
    g = result.grads
    work = _work(hidden.dtype)
    dh = g.hidden.reshape(hidden.shape) if g is not None and g.hidden is not None else hidden.new_empty(0, dtype=work)
    dw = g.weight if g is not None and g.weight is not None else weight.new_empty(0, dtype=work)
    db = g.bias if g is not None and g.bias is not None else weight.new_empty(0, dtype=work)
    return loss, dh.to(work), dw.to(work), db.to(work), hidden.new_empty(0, dtype=torch.float64)


@pear_loss_op.register_fake
def _(hidden, weight, bias, labels, behavior, cu_seqlens, num_items, variant, gamma, block_size, delta_lo,
      delta_hi, w_lo, w_hi, temperature, reduction, ignore_index, chunk_size, backend, softcap,
      lse_square_scale, label_smoothing, need_dh, need_dw, need_db):
    work = _work(hidden.dtype)
    if reduction == "none":
        empty = hidden.new_empty(0, dtype=work)
        return (labels.new_empty(labels.shape, dtype=work), empty, empty.clone(), empty.clone(),
                hidden.new_empty(labels.numel(), dtype=torch.float64))
    dh = hidden.new_empty(hidden.shape, dtype=work) if need_dh else hidden.new_empty(0, dtype=work)
    dw = weight.new_empty(weight.shape, dtype=work) if need_dw else weight.new_empty(0, dtype=work)
    db = weight.new_empty(weight.shape[0], dtype=work) if (need_db and bias is not None) else weight.new_empty(0, dtype=work)
    return hidden.new_empty((), dtype=work), dh, dw, db, hidden.new_empty(0, dtype=torch.float64)


@torch.library.custom_op("pear_kernels::pear_loss_none_backward", mutates_args=())
def pear_loss_none_backward(
    grad: torch.Tensor, log_w: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
    bias: Optional[torch.Tensor], labels: torch.Tensor, behavior: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
    variant: str, gamma: float, block_size: int, delta_lo: float, delta_hi: float, w_lo: float, w_hi: float,
    temperature: float, ignore_index: int, chunk_size: int, backend: str,
    softcap: float, lse_square_scale: float, label_smoothing: float,
    need_dh: bool, need_dw: bool, need_db: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    prep = _prepare(hidden, weight, bias, labels, behavior, cu_seqlens, None, variant, gamma, block_size,
                    delta_lo, delta_hi, w_lo, w_hi, temperature, "none", ignore_index, chunk_size, softcap,
                    lse_square_scale, label_smoothing)
    problem = prep.problem
    module = select_backend(hidden.device, backend or None, hidden.shape[-1], options=problem.options.active)
    idx = problem.layout.sup_index
    g = grad.reshape(-1)[idx].to(torch.float64)
    need = (need_dh, need_dw, need_db and bias is not None)
    with prep.autocast_off:
        if problem.options.active:
            grads = module.backward(problem, g * log_w[idx].exp(), need, ucoef=g)
        else:
            grads = module.backward(problem, g * log_w[idx].exp(), need)
    work = _work(hidden.dtype)
    dh = grads.hidden.reshape(hidden.shape).to(hidden.dtype) if grads.hidden is not None else hidden.new_empty(0)
    dw = grads.weight.to(weight.dtype) if grads.weight is not None else weight.new_empty(0, dtype=work).to(weight.dtype)
    db = grads.bias.to(weight.dtype) if grads.bias is not None else weight.new_empty(0)
    return dh, dw, db


@pear_loss_none_backward.register_fake
def _(grad, log_w, hidden, weight, bias, labels, behavior, cu_seqlens, variant, gamma, block_size, delta_lo,
      delta_hi, w_lo, w_hi, temperature, ignore_index, chunk_size, backend, softcap, lse_square_scale,
      label_smoothing, need_dh, need_dw, need_db):
    dh = hidden.new_empty(hidden.shape) if need_dh else hidden.new_empty(0)
    dw = weight.new_empty(weight.shape) if need_dw else weight.new_empty(0)
    db = weight.new_empty(weight.shape[0]) if (need_db and bias is not None) else weight.new_empty(0)
    return dh, dw, db


# argument positions of pear_loss_op
_SCALARS = slice(7, 22)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, behavior, cu_seqlens = inputs[:6]
    reduction = inputs[15]
    ctx.reduction = reduction
    ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
    ctx.has_bias = bias is not None
    ctx.need = inputs[22:25]
    if reduction == "none":
        ctx.scalars = tuple(inputs[_SCALARS])
        ctx.save_for_backward(output[4], hidden, weight, bias, labels, behavior, cu_seqlens)
    else:
        ctx.save_for_backward(output[1], output[2], output[3])


def _backward(ctx, grad_loss, _gdh, _gdw, _gdb, _glw):
    n_inputs = 25
    out = [None] * n_inputs
    if ctx.reduction == "none":
        log_w, hidden, weight, bias, labels, behavior, cu_seqlens = ctx.saved_tensors
        (variant, gamma, block_size, dlo, dhi, wlo, whi, temperature, _reduction, ignore_index, chunk_size,
         backend, softcap, zscale, smooth) = ctx.scalars
        dh, dw, db = pear_loss_none_backward(
            grad_loss, log_w, hidden, weight, bias, labels, behavior, cu_seqlens, variant, gamma, block_size,
            dlo, dhi, wlo, whi, temperature, ignore_index, chunk_size, backend, softcap, zscale, smooth,
            *ctx.need,
        )
    else:
        dh, dw, db = ctx.saved_tensors
        dh = (dh * grad_loss).to(ctx.hidden_dtype) if ctx.need[0] else None
        dw = (dw * grad_loss).to(ctx.weight_dtype) if ctx.need[1] else None
        db = (db * grad_loss).to(ctx.weight_dtype) if (ctx.need[2] and ctx.has_bias) else None
    out[0] = dh if ctx.need[0] else None
    out[1] = dw if ctx.need[1] else None
    out[2] = db if (ctx.need[2] and ctx.has_bias) else None
    return tuple(out)


pear_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# fused_token_logprobs as pear_kernels::token_logprobs (log-probs and, optionally, entropies).
# Gradients: backward calls pear_kernels::token_logprobs_backward, which recomputes the logits
# chunk by chunk (the eager Function's recompute, entropy term included).


def _prepare_logprobs(hidden, weight, bias, labels, temperature, ignore_index, chunk_size, softcap):
    from .config import Variant

    return prepare_problem(
        hidden, weight, labels, torch.zeros(labels.shape, device=labels.device),
        config=PEARConfig(variant=Variant.NONE, block_size=1), bias=bias, cu_seqlens=None,
        temperature=temperature, reduction="none", num_items_in_batch=None, ignore_index=ignore_index,
        chunk_size=chunk_size if chunk_size > 0 else None, backend=None, vocab_parallel_group=None,
        options=loss_options(None if softcap == -1.0 else softcap),
    )


def _scatter(values: torch.Tensor, layout, shape) -> torch.Tensor:
    return layout.to_tokens(values, shape)


@torch.library.custom_op("pear_kernels::token_logprobs", mutates_args=())
def token_logprobs_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    temperature: float, ignore_index: int, chunk_size: int, backend: str, softcap: float, with_entropy: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    prep = _prepare_logprobs(hidden, weight, bias, labels, temperature, ignore_index, chunk_size, softcap)
    problem, layout = prep.problem, prep.problem.layout
    module = select_backend(hidden.device, backend or None, hidden.shape[-1], options=problem.options.active)
    with prep.autocast_off:
        out = module.token_logprobs(problem, with_entropy=True) if with_entropy else module.token_logprobs(problem)
    logp, ent = out if with_entropy else (out, None)
    logp = _scatter(logp, layout, labels.shape)
    ent = _scatter(ent, layout, labels.shape) if ent is not None else logp.new_empty(0)
    return logp, ent


@token_logprobs_op.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, chunk_size, backend, softcap, with_entropy):
    work = _work(hidden.dtype)
    logp = labels.new_empty(labels.shape, dtype=work)
    return logp, (labels.new_empty(labels.shape, dtype=work) if with_entropy else labels.new_empty(0, dtype=work))


@torch.library.custom_op("pear_kernels::token_logprobs_backward", mutates_args=())
def token_logprobs_backward(
    grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor], hidden: torch.Tensor, weight: torch.Tensor,
    bias: Optional[torch.Tensor], labels: torch.Tensor, temperature: float, ignore_index: int, chunk_size: int,
    backend: str, softcap: float, need_dh: bool, need_dw: bool, need_db: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .kernels import torch_chunked

    prep = _prepare_logprobs(hidden, weight, bias, labels, temperature, ignore_index, chunk_size, softcap)
    problem = prep.problem
    module = select_backend(hidden.device, backend or None, hidden.shape[-1], options=problem.options.active)
    idx = problem.layout.sup_index
    coef = -grad_logp.reshape(-1)[idx].to(torch.float64)
    need = (need_dh, need_dw, need_db and bias is not None)
    with prep.autocast_off:
        if grad_entropy is not None:
            ent = grad_entropy.reshape(-1)[idx].to(torch.float64)
            grads = torch_chunked.backward_with_entropy(problem, coef, ent, need)
        else:
            grads = module.backward(problem, coef, need)
    dh = grads.hidden.reshape(hidden.shape).to(hidden.dtype) if grads.hidden is not None else hidden.new_empty(0)
    dw = grads.weight.to(weight.dtype) if grads.weight is not None else weight.new_empty(0)
    db = grads.bias.to(weight.dtype) if grads.bias is not None else weight.new_empty(0)
    return dh, dw, db


@token_logprobs_backward.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, labels, temperature, ignore_index, chunk_size, backend,
      softcap, need_dh, need_dw, need_db):
    dh = hidden.new_empty(hidden.shape) if need_dh else hidden.new_empty(0)
    dw = weight.new_empty(weight.shape) if need_dw else weight.new_empty(0)
    db = weight.new_empty(weight.shape[0]) if (need_db and bias is not None) else weight.new_empty(0)
    return dh, dw, db


def _logprobs_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels = inputs[:4]
    ctx.scalars = tuple(inputs[4:9])  # temperature, ignore_index, chunk_size, backend, softcap
    ctx.with_entropy = inputs[9]
    ctx.has_bias = bias is not None
    ctx.need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    ctx.save_for_backward(hidden, weight, bias, labels)


def _logprobs_backward(ctx, grad_logp, grad_entropy):
    hidden, weight, bias, labels = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros(labels.shape, dtype=_work(hidden.dtype), device=hidden.device)
    dh, dw, db = token_logprobs_backward(
        grad_logp, grad_entropy if ctx.with_entropy else None, hidden, weight, bias, labels, *ctx.scalars,
        *ctx.need,
    )
    return (dh if ctx.need[0] else None, dw if ctx.need[1] else None, db if ctx.need[2] else None,
            None, None, None, None, None, None, None)


token_logprobs_op.register_autograd(_logprobs_backward, setup_context=_logprobs_setup_context)
