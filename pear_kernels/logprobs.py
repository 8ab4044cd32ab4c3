"""Public API: fused per-token log-probs (and entropies) from hidden states."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .checks import IGNORE_INDEX
from .config import PEARConfig, Variant
from .inputs import loss_options, prepare_problem
from .ops.fused_linear_logprobs import fused_linear_logprobs

__all__ = ["fused_token_logprobs"]


def fused_token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    vocab_parallel_group=None,
    softcap: Optional[float] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """log softmax(hidden W^T + b)[labels] per token, differentiable, without full logits.

    Shapes as in fused_pear_loss. Returns a float32 tensor of labels' shape (float64 for
    float64 inputs) holding 0 where labels == ignore_index; with ``return_entropy`` also the
    per-token entropy, 0 where masked; both are differentiable (an entropy bonus gets its
    gradient, dH/dz = -p (z - E_p z)).

    ``vocab_parallel_group``: lm_head_weight/bias are this rank's vocabulary shard, as in
    fused_pear_loss (same contract: identical inputs on every rank, full hidden gradient).

    ``softcap``: logits = softcap * tanh(logits / softcap) before the temperature, as in
    fused_pear_loss (Gemma 2/3's ``final_logit_softcapping``); log-probs, entropies and both
    gradients are those of the capped distribution.
    """
    if torch.compiler.is_compiling():
        # one opaque custom op in the graph (compiled.py); it validates at run time
        if vocab_parallel_group is not None:
            raise ValueError("inside torch.compile fused_token_logprobs does not take vocab_parallel_group")
        from .compiled import token_logprobs_op

        logp, ent = token_logprobs_op(
            hidden, lm_head_weight, bias, labels, float(temperature), int(ignore_index), int(chunk_size or 0),
            backend or "", float(softcap) if softcap is not None else -1.0, bool(return_entropy),
        )
        return (logp, ent) if return_entropy else logp
    if not torch.is_tensor(labels):
        raise TypeError(f"labels must be a torch.Tensor of token ids, got {type(labels).__name__}")
    # behavior log-probs play no part here: zeros pass every check on them
    dummy_behavior = torch.zeros(labels.shape, device=labels.device)
    prep = prepare_problem(
        hidden, lm_head_weight, labels, dummy_behavior,
        config=PEARConfig(variant=Variant.NONE, block_size=1), bias=bias, cu_seqlens=None,
        temperature=temperature, reduction="none", num_items_in_batch=None,
        ignore_index=ignore_index, chunk_size=chunk_size, backend=backend,
        vocab_parallel_group=vocab_parallel_group, options=loss_options(softcap),
    )
    chk, layout = prep.checked, prep.problem.layout
    with prep.autocast_off:
        out = fused_linear_logprobs(prep.problem, with_entropy=return_entropy, backend=prep.backend)
    logp, entropy = out if return_entropy else (out, None)

    def full(values: torch.Tensor) -> torch.Tensor:
        return layout.to_tokens(values, chk.input_shape)

    if entropy is None:
        return full(logp)
    return full(logp), full(entropy)
