"""Public API: fused_pear_loss and the PEARLoss module."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .config import PEARConfig, Variant
from .ops.fused_linear_pear import fused_linear_pear
from .problem_inputs import prepare_problem
from .stats import PEARStats, summarize

__all__ = ["fused_pear_loss", "PEARLoss"]


def fused_pear_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    config: Optional[PEARConfig] = None,
    variant: Optional[Union[str, Variant]] = None,
    gamma: Optional[float] = None,
    block_size: Optional[int] = None,
    delta_clip: Optional[Tuple[float, float]] = None,
    log_weight_clip: Optional[Tuple[float, float]] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    num_items_in_batch=None,
    ignore_index: int = -100,
    return_stats: bool = False,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    vocab_parallel_group=None,
    check_values: bool = True,
) -> Union[torch.Tensor, Tuple[torch.Tensor, PEARStats]]:
    """PEAR-weighted SFT loss straight from final hidden states; never builds (N x V) logits.

    Args:
        hidden: (N, H) or (B, T, H) final hidden states (already shifted: hidden[i] predicts labels[i]).
        lm_head_weight: (V, H) output projection, same dtype and device as hidden.
        labels: (N,) or (B, T) target ids; ``ignore_index`` marks unsupervised tokens.
        behavior_logprobs: labels' shape; log pi_beta(labels[i]) from the behavior policy.
        bias: optional (V,) output bias.
        config: a PEARConfig; ``variant``, ``gamma``, ``block_size``, ``delta_clip`` and
            ``log_weight_clip`` override its fields.
        cu_seqlens: packed (N, ...) rows: sequence s is tokens [cu_seqlens[s], cu_seqlens[s+1]).
            For (B, T) inputs each row is a sequence; with neither, all N tokens are one.
        temperature: logits are divided by it before the softmax.
        reduction: "mean" (divide by the supervised-token count or ``num_items_in_batch``),
            "sum", or "none" (per-token weighted losses of labels' shape, 0 where masked).
        num_items_in_batch: normalizer for "mean" under gradient accumulation (HF Trainer).
        return_stats: also return a PEARStats (log-probs, weights, ESS, clip fractions).
        chunk_size: supervised tokens per logits chunk (default: from a 128 MiB budget).
        backend: "auto" (default), or a backend name; ``PEAR_KERNELS_BACKEND`` sets the default.
        vocab_parallel_group: a torch.distributed process group over which the vocabulary is
            split. ``lm_head_weight`` (and ``bias``) are then this rank's contiguous shard of
            the vocabulary rows, in rank order (uneven shards allowed, none empty; see
            ``pear_kernels.distributed.vocab_shard_range``); hidden, labels (global ids),
            behavior_logprobs and every other argument must be the same on all ranks. The loss
            (and stats) equal the single-process result on every rank; the weight/bias
            gradients are the local shard's. The hidden-state gradient is already summed over
            the group (as Megatron's ColumnParallelLinear does in its input region), so it is the
            full gradient on every rank: do not all-reduce it again. Chunked PyTorch path only.
        check_values: False skips the checks that read values (labels in range, behavior
            log-probs finite-or--inf and <= 0), which on a GPU stall the stream once each; for
            data validated beforehand (``pear-kernels validate``). A bad label then fails in the
            kernel (an index error, a device-side assert on CUDA) instead of with a message.

    Returns the loss (float32 for 16-bit inputs), and PEARStats when ``return_stats``.
    """
    config = PEARConfig.coerce(config).with_overrides(
        variant=variant, gamma=gamma, block_size=block_size,
        delta_clip=delta_clip, log_weight_clip=log_weight_clip,
    )
    prep = prepare_problem(
        hidden, lm_head_weight, labels, behavior_logprobs,
        config=config, bias=bias, cu_seqlens=cu_seqlens, temperature=temperature,
        reduction=reduction, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
        chunk_size=chunk_size, backend=backend, vocab_parallel_group=vocab_parallel_group,
        check_values=check_values,
    )
    problem, chk, layout = prep.problem, prep.checked, prep.problem.layout
    with prep.autocast_off:
        loss, result = fused_linear_pear(problem, reduction, num_items_in_batch, prep.backend)
    if reduction == "none":
        loss = loss.reshape(chk.input_shape)
    if not return_stats:
        return loss
    stats = summarize(
        result.logp, result.log_ratio, result.log_w_raw, result.log_w, layout, config, chk.input_shape
    )
    return loss, stats


class PEARLoss(torch.nn.Module):
    """Module form of fused_pear_loss with a fixed PEARConfig.

    ``forward(hidden, lm_head_weight, labels, behavior_logprobs, bias=None, **kwargs)``; keyword
    arguments of fused_pear_loss (cu_seqlens, num_items_in_batch, return_stats, ...) pass through.
    """

    def __init__(
        self,
        config: Optional[PEARConfig] = None,
        *,
        temperature: float = 1.0,
        reduction: str = "mean",
        ignore_index: int = -100,
        chunk_size: Optional[int] = None,
        **overrides,
    ):
        super().__init__()
        self.config = PEARConfig.coerce(config).with_overrides(**overrides)
        self.temperature = temperature
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size

    def forward(self, hidden, lm_head_weight, labels, behavior_logprobs, bias=None, **kwargs):
        opts = dict(
            config=self.config, temperature=self.temperature, reduction=self.reduction,
            ignore_index=self.ignore_index, chunk_size=self.chunk_size,
        )
        opts.update(kwargs)
        return fused_pear_loss(hidden, lm_head_weight, labels, behavior_logprobs, bias=bias, **opts)

    def extra_repr(self) -> str:
        return f"config={self.config}, reduction={self.reduction!r}, temperature={self.temperature}"
