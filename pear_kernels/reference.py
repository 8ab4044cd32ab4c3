"""The reference PEAR loss: materialises the full (tokens x vocab) logits.

It is the oracle every backend is tested against (run it in float64 for truth) and the naive
baseline the benchmarks measure. Plain autograd from start to end: the gradient of
``w_t * -logp_t`` with w_t detached, nothing hand-derived.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .checks import IGNORE_INDEX, check_inputs, check_weight_clip
from .config import PEARConfig
from .importance import build_layout, compute_log_weights
from .inputs import loss_options
from .ops.fused_linear_pear import loss_scale
from .stats import PEARStats, summarize

__all__ = ["reference_pear_loss", "reduce_token_losses"]


def reduce_token_losses(token_loss: torch.Tensor, layout, shape, reduction: str, num_items_in_batch) -> torch.Tensor:
    """Reduce compact (M,) weighted token losses as the fused loss does: the same scatter
    (``layout.to_tokens``) for "none", the same normaliser (``loss_scale``) otherwise. (The
    independent check of both is tests/oracle.py, which shares no code with either.)"""
    if reduction == "none":
        return layout.to_tokens(token_loss, shape)
    return token_loss.sum() * loss_scale(reduction, num_items_in_batch, layout.num_supervised)


def reference_pear_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    config: Optional[PEARConfig] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    num_items_in_batch=None,
    ignore_index: int = IGNORE_INDEX,
    return_stats: bool = False,
    compute_dtype: Optional[torch.dtype] = None,
    softcap: Optional[float] = None,
    lse_square_scale: float = 0.0,
    label_smoothing: float = 0.0,
    **overrides,
) -> Union[torch.Tensor, Tuple[torch.Tensor, PEARStats]]:
    """PEAR loss with materialised logits; same arguments as ``fused_pear_loss``.

    ``softcap``, ``lse_square_scale``, ``label_smoothing``: as in fused_pear_loss.
    ``compute_dtype`` (e.g. torch.float64) casts hidden, weight and bias before the matmul, so
    the whole computation runs in that precision; by default half-precision logits are upcast
    to float32 for the softmax, as Hugging Face models do.
    """
    config = PEARConfig.coerce(config).with_overrides(**overrides)
    chk = check_inputs(
        hidden, lm_head_weight, labels, behavior_logprobs,
        bias=bias, cu_seqlens=cu_seqlens, temperature=temperature, reduction=reduction,
        num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
    )
    check_weight_clip(config, chk.hidden.dtype)
    h, w, b = chk.hidden, lm_head_weight, bias
    if compute_dtype is not None:
        h, w = h.to(compute_dtype), w.to(compute_dtype)
        b = b.to(compute_dtype) if b is not None else None
    logits = h @ w.t()
    if b is not None:
        logits = logits + b
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    options = loss_options(softcap, lse_square_scale, label_smoothing)
    if options.softcap is not None:
        logits = options.softcap * torch.tanh(logits / options.softcap)
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = torch.log_softmax(logits, dim=-1)

    layout = build_layout(
        chk.mask, block_size=config.block_size, row_length=chk.row_length, cu_seqlens=cu_seqlens
    )
    idx = layout.sup_index
    logp = logprobs[idx, chk.labels[idx]]
    # both sides detached: the weight is a constant, no gradient reaches behavior_logprobs
    log_ratio = logp.detach().to(torch.float64) - chk.behavior_logprobs[idx].detach().to(torch.float64)
    log_w, log_w_raw = compute_log_weights(log_ratio, layout, config)
    ce = -logp
    if options.label_smoothing:
        ce = (1.0 - options.label_smoothing) * ce - options.label_smoothing * logprobs[idx].mean(dim=-1)
    token_loss = log_w.exp().to(logp.dtype) * ce
    if options.lse_square_scale:
        token_loss = token_loss + options.lse_square_scale * torch.logsumexp(logits[idx], dim=-1) ** 2
    loss = reduce_token_losses(token_loss, layout, chk.input_shape, reduction, num_items_in_batch)
    if not return_stats:
        return loss
    return loss, summarize(logp, log_ratio, log_w_raw, log_w, layout, config, chk.input_shape)
