"""Public API: fused_pear_loss and the PEARLoss module."""

from __future__ import annotations

from typing import Optional, Tuple, Union  # noqa: F401

import torch

from .checks import IGNORE_INDEX
from .config import PEARConfig, Variant
from .inputs import loss_options, prepare_problem, shift_targets
from .ops.fused_linear_pear import fused_linear_pear, loss_scale
from .stats import summarize

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
    ignore_index: int = IGNORE_INDEX,
    return_stats: bool = False,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    vocab_parallel_group=None,
    check_values: bool = True,
    softcap: Optional[float] = None,
    lse_square_scale: float = 0.0,
    label_smoothing: float = 0.0,
    shift: bool = False,
    return_z_loss: bool = False,
    return_lse: bool = False,
):
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
        chunk_size: supervised tokens per logits chunk (default: rows from the chunk budget,
            512 MiB unless ``set_chunk_budget`` or ``PEAR_KERNELS_CHUNK_MIB`` says otherwise).
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
        softcap: logits = softcap * tanh(logits / softcap) before the temperature and the
            softmax (Gemma 2/3 ``final_logit_softcapping``; 30 for Gemma 2).
        lse_square_scale: z-loss, lse_square_scale * logsumexp^2 per supervised token, added
            to the loss unweighted (the PEAR weight concerns imitation, not the logit scale).
        label_smoothing: eps in [0, 1): the token's cross-entropy becomes
            (1 - eps) * -log p[y] + eps * mean_v(-log p[v]); the PEAR weight multiplies it
            whole, and the weight itself is built from the plain log p[y].
        shift: hidden, labels and behavior_logprobs are aligned with the input ids (unshifted):
            position i is trained on label i + 1 and behavior log-prob i + 1; the last position
            of every sequence (rows of (B, T), or each cu_seqlens segment) has no target.
            Shapes of "none" outputs stay those of labels (0 at those positions).
        return_z_loss: also return the z-loss part of the loss (same reduction, detached).
        return_lse: also return the per-token logsumexp of the logits (labels' shape, float32,
            detached, 0 where masked).
        check_values: False skips the checks that read values (labels in range, behavior
            log-probs finite-or--inf and <= 0), which on a GPU stall the stream once each; for
            data validated beforehand (``pear-kernels validate``). A bad label then fails in the
            kernel (an index error, a device-side assert on CUDA) instead of with a message.

    Returns the loss: float32 for 16-bit inputs (the peers return the input dtype; the
    fp32 value is what the fp32 softmax computed, and autograd casts nothing back), float64 for
    float64 inputs. With any of return_z_loss, return_lse, return_stats a tuple
    ``(loss, z_loss?, lse?, stats?)`` in that order, holding only the ones asked for.
    """
    if torch.compiler.is_compiling():
        # one opaque custom op in the graph; every argument is validated inside it, at run time
        if return_stats or return_z_loss or return_lse or vocab_parallel_group is not None:
            raise ValueError(
                "inside torch.compile fused_pear_loss returns the loss only: return_stats, "
                "return_z_loss, return_lse and vocab_parallel_group need eager mode"
            )
        cfg = config if isinstance(config, PEARConfig) else PEARConfig()
        return _compiled_loss(
            hidden, lm_head_weight, labels, behavior_logprobs, bias,
            variant if variant is not None else cfg.variant,
            gamma if gamma is not None else cfg.gamma,
            block_size if block_size is not None else cfg.block_size,
            delta_clip if delta_clip is not None else cfg.delta_clip,
            log_weight_clip if log_weight_clip is not None else cfg.log_weight_clip,
            softcap, lse_square_scale, label_smoothing, cu_seqlens, temperature, reduction,
            num_items_in_batch, ignore_index, chunk_size, backend, shift,
        )
    config = PEARConfig.coerce(config).with_overrides(
        variant=variant, gamma=gamma, block_size=block_size,
        delta_clip=delta_clip, log_weight_clip=log_weight_clip,
    )
    options = loss_options(softcap, lse_square_scale, label_smoothing)
    if shift:
        labels, behavior_logprobs = shift_targets(labels, behavior_logprobs, cu_seqlens, ignore_index)
    prep = prepare_problem(
        hidden, lm_head_weight, labels, behavior_logprobs,
        config=config, bias=bias, cu_seqlens=cu_seqlens, temperature=temperature,
        reduction=reduction, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
        chunk_size=chunk_size, backend=backend, vocab_parallel_group=vocab_parallel_group,
        check_values=check_values, options=options, want_lse=return_lse,
    )
    problem, chk, layout = prep.problem, prep.checked, prep.problem.layout
    with prep.autocast_off:
        loss, result = fused_linear_pear(problem, reduction, num_items_in_batch, prep.backend)
    if reduction == "none":
        loss = loss.reshape(chk.input_shape)
    if not (return_stats or return_z_loss or return_lse):
        return loss
    out = [loss]
    if return_z_loss:
        z = result.z_loss if result.z_loss is not None else torch.zeros(layout.num_supervised, dtype=torch.float64,
                                                                       device=loss.device)
        if reduction == "none":
            out.append(layout_scatter(z, layout, chk.input_shape, loss.dtype))
        else:
            out.append((z.sum() * loss_scale(reduction, num_items_in_batch, layout.num_supervised)).to(loss.dtype))
    if return_lse:
        out.append(layout_scatter(result.lse, layout, chk.input_shape, torch.float32))
    if return_stats:
        out.append(summarize(
            result.logp, result.log_ratio, result.log_w_raw, result.log_w, layout, config, chk.input_shape
        ))
    return tuple(out)


def _compiled_loss(hidden, weight, labels, behavior, bias, variant, gamma, block_size, delta_clip,
                   log_weight_clip, softcap, lse_square_scale, label_smoothing, cu_seqlens, temperature,
                   reduction, num_items, ignore_index, chunk_size, backend, shift):
    """The loss through the pear_kernels::pear_loss custom op (compiled.py): one opaque
    node in the compiled graph, no graph break, shapes from a fake implementation. Nothing
    here reads a value: the op validates its arguments when it runs."""
    from .compiled import pear_loss_op

    if shift:
        labels, behavior = shift_targets(labels, behavior, cu_seqlens, ignore_index)
    grad = torch.is_grad_enabled()
    if num_items is not None and not torch.is_tensor(num_items):
        num_items = torch.tensor(float(num_items))
    variant = variant.value if hasattr(variant, "value") else str(variant)
    outputs = pear_loss_op(
        hidden, weight, bias, labels, behavior, cu_seqlens, num_items,
        variant, float(gamma), int(block_size), float(delta_clip[0]), float(delta_clip[1]),
        float(log_weight_clip[0]), float(log_weight_clip[1]), float(temperature), reduction, int(ignore_index),
        int(chunk_size or 0), backend or "", float(softcap) if softcap is not None else -1.0, float(lse_square_scale),
        float(label_smoothing),
        grad and hidden.requires_grad, grad and weight.requires_grad, grad and bias is not None and bias.requires_grad,
    )
    return outputs[0]


def layout_scatter(values: torch.Tensor, layout, shape, dtype) -> torch.Tensor:
    """Compact (M,) per-token values into labels' shape, 0 at unsupervised positions."""
    return layout.to_tokens(values.detach(), shape, dtype)


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
        ignore_index: int = IGNORE_INDEX,
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
