"""Input validation shared by every entry point: errors name the argument at fault."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from .config import REDUCTIONS, PEARConfig

__all__ = ["CheckedInputs", "check_inputs", "check_cu_seqlens", "check_num_items", "check_weight_clip"]

# Behavior log-probs a hair above 0 come from float rounding in the sampler (log of a
# probability that rounded to 1); anything larger is a bug in the data, not rounding.
BEHAVIOR_LOGPROB_TOLERANCE = 1e-4
# The label value that marks a position as not supervised (the Hugging Face / PyTorch default).
IGNORE_INDEX = -100
# labels are compared with ignore_index as int64
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1



@dataclass
class CheckedInputs:
    hidden: torch.Tensor  # (N, H), contiguous view of the caller's tensor
    labels: torch.Tensor  # (N,) int64
    behavior_logprobs: torch.Tensor  # (N,) caller's float dtype
    mask: torch.Tensor  # (N,) bool, supervised tokens
    row_length: Optional[int]  # T for (B, T) inputs
    input_shape: torch.Size  # labels' original shape, for reduction="none"


def check_cu_seqlens(cu_seqlens: torch.Tensor, n_tokens: int, device: torch.device) -> None:
    if not torch.is_tensor(cu_seqlens):
        raise TypeError("cu_seqlens must be a 1-D integer tensor")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool or cu_seqlens.is_complex():
        raise TypeError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the tokens are on {device}")
    cu = cu_seqlens.to(torch.int64)
    steps = cu[1:] - cu[:-1]
    # one host synchronisation for the three facts (on a GPU each read would stall the stream)
    first, last, decreasing = torch.stack([cu[0], cu[-1], (steps < 0).any().to(torch.int64)]).tolist()
    if first != 0 or last != n_tokens:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at the number of tokens {n_tokens}, "
            f"got {first} ... {last}"
        )
    if decreasing:
        bad = int((steps < 0).nonzero()[0])
        raise ValueError(
            f"cu_seqlens must be non-decreasing, but cu_seqlens[{bad + 1}] = {int(cu[bad + 1])} "
            f"< cu_seqlens[{bad}] = {int(cu[bad])}"
        )


def check_num_items(num_items_in_batch) -> float:
    """num_items_in_batch as a positive finite float (a number or a one-element tensor)."""
    n = num_items_in_batch
    if torch.is_tensor(n):
        if n.numel() != 1:
            raise ValueError(
                f"num_items_in_batch must be a number or a one-element tensor, got a tensor of shape {tuple(n.shape)}"
            )
        if n.dtype == torch.bool or n.is_complex():
            raise TypeError(f"num_items_in_batch must be a real number, got dtype {n.dtype}")
        n = n.item()
    # numbers.Real admits numpy scalars (np.int64 from a data pipeline), not bools
    if isinstance(n, bool) or not isinstance(n, numbers.Real):
        raise TypeError(f"num_items_in_batch must be a positive number, got {num_items_in_batch!r}")
    try:
        value = float(n)
    except OverflowError:  # an int beyond float range
        value = math.inf
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"num_items_in_batch must be a positive finite number, got {num_items_in_batch!r}")
    return value


def check_weight_clip(config: PEARConfig, dtype: torch.dtype) -> None:
    """The largest weight exp(log_weight_clip[1]) times a log-prob must stay finite in the
    loss dtype (fp32, fp64 for fp64 inputs): an upper bound of, say, 100 would let one token's
    loss overflow to inf."""
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    limit = math.log(torch.finfo(loss_dtype).max) - math.log(1e6)  # room for -log p up to 1e6
    high = config.log_weight_clip[1]
    if high > limit:
        raise ValueError(
            f"log_weight_clip upper bound {high} is too large: exp({high}) overflows {loss_dtype} "
            f"losses (at most {limit:.1f} for {loss_dtype})"
        )


def _check_float(name: str, t) -> None:
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    *,
    bias: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    temperature: float,
    reduction: str,
    num_items_in_batch,
    ignore_index: int,
    vocab_size: Optional[int] = None,
    check_values: bool = True,
) -> CheckedInputs:
    """Validate and flatten the inputs of fused_pear_loss / reference_pear_loss.

    ``vocab_size``: the global vocabulary that labels index when lm_head_weight is one shard of
    it (vocabulary parallelism); by default lm_head_weight's row count.
    ``check_values=False`` skips the two checks that read tensor values (label range, behavior
    log-probs NaN / > 0): on a GPU each is a host synchronisation. Shapes, dtypes and devices
    are always checked.
    """
    _check_float("hidden", hidden)
    _check_float("lm_head_weight", weight)
    _check_float("behavior_logprobs", behavior_logprobs)
    if not torch.is_tensor(labels):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (N, H) or (B, T, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"lm_head_weight must be (V, H), got shape {tuple(weight.shape)}")
    H = hidden.shape[-1]
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(
            f"lm_head_weight must be (V, {H}) to match hidden's last dim {H}, "
            f"got shape {tuple(weight.shape)}"
        )
    if V == 0:
        raise ValueError("lm_head_weight has an empty vocabulary (V = 0)")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"lm_head_weight dtype {weight.dtype} does not match hidden dtype {hidden.dtype}"
        )
    lead = tuple(hidden.shape[:-1])
    if tuple(labels.shape) != lead:
        raise ValueError(f"labels must have shape {lead} to match hidden, got {tuple(labels.shape)}")
    if tuple(behavior_logprobs.shape) != lead:
        raise ValueError(
            f"behavior_logprobs must have shape {lead} to match labels, "
            f"got {tuple(behavior_logprobs.shape)}"
        )
    device = hidden.device
    for name, t in (("lm_head_weight", weight), ("labels", labels), ("behavior_logprobs", behavior_logprobs)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {device}")
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape ({V},), got {tuple(bias.shape)}")
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {device}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} does not match hidden dtype {hidden.dtype}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive number, got {temperature!r}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    # logits are divided by the temperature in the working dtype (fp32, fp64 for fp64 inputs):
    # a temperature whose reciprocal overflows it turns every logit into inf and the loss NaN
    work_max = torch.finfo(torch.float64 if hidden.dtype == torch.float64 else torch.float32).max
    if 1.0 / temperature > work_max / 1e4:
        raise ValueError(
            f"temperature {temperature!r} is too small: logits / temperature would overflow "
            f"{'float64' if hidden.dtype == torch.float64 else 'float32'}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int (e.g. -100), got {ignore_index!r}")
    if not _INT64_MIN <= int(ignore_index) <= _INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64 (labels are int64), got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError(
                f"num_items_in_batch only applies to reduction='mean', got reduction={reduction!r}"
            )
        check_num_items(num_items_in_batch)

    row_length = None
    if hidden.dim() == 3:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens applies to packed (N, H) inputs; (B, T, H) rows are sequences")
        row_length = hidden.shape[1]
    n_tokens = labels.numel()
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, n_tokens, device)

    flat_labels = labels.reshape(-1).to(torch.int64)
    mask = flat_labels != ignore_index
    flat_lb = behavior_logprobs.reshape(-1)
    if check_values and flat_labels.numel():
        # the value checks read the data: one host synchronisation for both, none per token
        n_vocab = V if vocab_size is None else vocab_size
        bad_label = mask & ((flat_labels < 0) | (flat_labels >= n_vocab))
        bad_lb = mask & (torch.isnan(flat_lb) | (flat_lb > BEHAVIOR_LOGPROB_TOLERANCE))
        any_label, any_lb = torch.stack([bad_label.any(), bad_lb.any()]).tolist()
        if any_label:
            pos = int(bad_label.nonzero()[0])
            raise ValueError(
                f"labels must be in [0, {n_vocab}) or ignore_index={ignore_index}; "
                f"labels.view(-1)[{pos}] = {int(flat_labels[pos])}"
            )
        if any_lb:
            pos = int(bad_lb.nonzero()[0])
            raise ValueError(
                "behavior_logprobs must be log-probabilities (finite or -inf, <= 0) on supervised "
                f"tokens; behavior_logprobs.view(-1)[{pos}] = {float(flat_lb[pos])}. "
                "Check that they are aligned with labels (same token ids, same shift)."
            )
    return CheckedInputs(
        hidden=hidden.reshape(-1, H),
        labels=flat_labels,
        behavior_logprobs=flat_lb,
        mask=mask,
        row_length=row_length,
        input_shape=labels.shape,
    )
