"""Public API: fused per-token log-probs (and entropies) from hidden states."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .checks import check_inputs
from .config import PEARConfig, Variant
from .distributed import setup_vocab_parallel
from .kernels.problem import PEARProblem
from .ops.amp import leave_autocast
from .ops.fused_linear_logprobs import fused_linear_logprobs
from .weights import build_layout

__all__ = ["fused_token_logprobs"]


def fused_token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    vocab_parallel_group=None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """log softmax(hidden W^T + b)[labels] per token, differentiable, without full logits.

    Shapes as in fused_pear_loss. Returns a float32 tensor of labels' shape (float64 for
    float64 inputs) holding 0 where labels == ignore_index; with ``return_entropy`` also the
    per-token entropy (detached), 0 where masked.

    ``vocab_parallel_group``: lm_head_weight/bias are this rank's vocabulary shard, as in
    fused_pear_loss (same contract: identical inputs on every rank, full hidden gradient).
    """
    hidden, lm_head_weight, bias, autocast_off = leave_autocast(hidden, lm_head_weight, bias)
    dummy_behavior = torch.zeros(labels.shape, dtype=hidden.dtype if hidden.is_floating_point() else torch.float32,
                                 device=labels.device if torch.is_tensor(labels) else None)
    vocab_parallel = None
    if vocab_parallel_group is not None:
        vocab_parallel, backend = setup_vocab_parallel(
            vocab_parallel_group, lm_head_weight, labels, chunk_size, backend
        )
    chk = check_inputs(
        hidden, lm_head_weight, labels, dummy_behavior,
        bias=bias, cu_seqlens=None, temperature=temperature, reduction="none",
        num_items_in_batch=None, ignore_index=ignore_index,
        vocab_size=vocab_parallel.vocab_size if vocab_parallel is not None else None,
    )
    config = PEARConfig(variant=Variant.NONE)
    layout = build_layout(chk.mask, block_size=1, row_length=chk.row_length)
    problem = PEARProblem(
        hidden=chk.hidden, weight=lm_head_weight, bias=bias, labels=chk.labels,
        behavior_logprobs=chk.behavior_logprobs, layout=layout, config=config,
        temperature=float(temperature), chunk_size=chunk_size, vocab_parallel=vocab_parallel,
    )
    with autocast_off:
        out = fused_linear_logprobs(problem, with_entropy=return_entropy, backend=backend)
    logp, entropy = out if return_entropy else (out, None)

    def full(values: torch.Tensor) -> torch.Tensor:
        buf = values.new_zeros(layout.n_tokens)
        return buf.index_put((layout.sup_index,), values).reshape(chk.input_shape)

    if entropy is None:
        return full(logp)
    return full(logp), full(entropy)
