"""Public API: PEAR-weighted distillation from stored teacher top-k log-probs.

The teacher is run once, offline (``pear-kernels collect --top-k K`` stores its K most likely
ids and log-probs per response position); the student then trains on a forward KL from that
top-k distribution, each token weighted by the PEAR weight, straight from its final hidden
states, without (tokens x vocab) logits. See docs/distillation.md.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .checks import BEHAVIOR_LOGPROB_TOLERANCE
from .config import PEARConfig
from .kernels.torch_distill import DistillTargets
from .ops.fused_linear_distill import fused_linear_distill
from .problem_inputs import prepare_problem
from .stats import PEARStats, summarize

__all__ = ["fused_pear_distill_loss", "TAILS"]

TAILS = ("renormalize", "bucket")


# A position's top-k probabilities may sum a hair above 1 from float rounding in the sampler
# (K float32 probabilities each rounded at 2^-24); 1e-3 above is a bug in the data.
MASS_TOLERANCE = 1e-3


def _check_teacher(teacher_ids, teacher_logprobs, labels, vocab, ignore_index, check_values, device):
    if not torch.is_tensor(teacher_ids):
        raise TypeError(f"teacher_ids must be a torch.Tensor, got {type(teacher_ids).__name__}")
    if teacher_ids.is_floating_point() or teacher_ids.is_complex() or teacher_ids.dtype == torch.bool:
        raise TypeError(f"teacher_ids must be an integer tensor of shape labels.shape + (K,), got {teacher_ids.dtype}")
    if not torch.is_tensor(teacher_logprobs):
        raise TypeError(f"teacher_logprobs must be a torch.Tensor, got {type(teacher_logprobs).__name__}")
    if not teacher_logprobs.is_floating_point():
        raise TypeError(
            f"teacher_logprobs must be a floating-point tensor of shape labels.shape + (K,), got {teacher_logprobs.dtype}"
        )
    if teacher_ids.dim() != labels.dim() + 1 or tuple(teacher_ids.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"teacher_ids must have shape {tuple(labels.shape)} + (K,) to match labels, got {tuple(teacher_ids.shape)}"
        )
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(
            f"teacher_logprobs must have teacher_ids' shape {tuple(teacher_ids.shape)} (the same K), "
            f"got {tuple(teacher_logprobs.shape)}"
        )
    if teacher_ids.shape[-1] < 1:
        raise ValueError("teacher_ids needs K >= 1 entries per position, got K = 0")
    for name, t in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {device}")
    if not check_values:
        return
    K = teacher_ids.shape[-1]
    sup = (labels.reshape(-1) != ignore_index).nonzero().reshape(-1)
    ids = teacher_ids.reshape(-1, K)[sup]
    lq = teacher_logprobs.reshape(-1, K)[sup]
    if not ids.numel():
        return

    def where(rows_bad: torch.Tensor) -> str:
        # flat position (as in labels.view(-1)) of the first supervised token that is bad
        return f"position {int(sup[rows_bad.nonzero()[0, 0]])} of labels.view(-1)"

    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        i, k = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"teacher_ids must be in [0, {vocab}) on supervised tokens; at {where(bad.any(dim=1))}, "
            f"entry {k} is {int(ids[i, k])}"
        )
    if K > 1:
        srt = ids.sort(dim=1).values
        dup = (srt[:, 1:] == srt[:, :-1]).any(dim=1)
        if bool(dup.any()):
            raise ValueError(
                f"teacher_ids repeat an id at {where(dup)}: the top-k ids of a position must be distinct"
            )
    nan = torch.isnan(lq).any(dim=1)
    if bool(nan.any()):
        raise ValueError(f"teacher_logprobs are NaN at {where(nan)}")
    pos = (lq > BEHAVIOR_LOGPROB_TOLERANCE).any(dim=1)
    if bool(pos.any()):
        raise ValueError(
            f"teacher_logprobs must be log-probabilities (<= 0, -inf allowed); {where(pos)} has a positive one"
        )
    mass = torch.exp(lq.to(torch.float64)).sum(dim=1)
    over = mass > 1.0 + MASS_TOLERANCE
    if bool(over.any()):
        raise ValueError(
            f"teacher_logprobs at {where(over)} sum to probability {float(mass[over][0]):.4f} > 1: "
            "not one distribution's top-k (or not aligned with labels)"
        )
    empty = mass <= 0
    if bool(empty.any()):
        raise ValueError(f"teacher_logprobs at {where(empty)} are all -inf: no teacher mass to distil")


def fused_pear_distill_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    config: Optional[PEARConfig] = None,
    variant=None,
    kl: str = "forward",
    tail: str = "renormalize",
    hard_weight: float = 0.0,
    bias: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    num_items_in_batch=None,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    check_values: bool = True,
    return_stats: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, PEARStats]]:
    """PEAR-weighted forward-KL distillation from the teacher's stored top-k distribution.

    Args (beyond fused_pear_loss's):
        teacher_ids: labels.shape + (K,) ids of the teacher's K most likely tokens at each
            position (aligned with labels exactly like behavior_logprobs), distinct per position.
        teacher_logprobs: the same shape, their log-probs (<= 0, -inf allowed: no mass).
        kl: "forward" (KL(teacher || student), the only one offered).
        tail: "renormalize" (the top-k distribution renormalised to 1) or "bucket" (the mass
            outside the top-k, 1 - sum q, is one outcome against the student's mass outside it).
        hard_weight: lam in [0, 1]: the token loss is (1 - lam) KL + lam (-log p_student(label)).
    The PEAR weight of each token is built from the sampled label's log-ratio
    (log p_student(label) - behavior_logprobs), clipped and detached, as in fused_pear_loss.
    Returns the loss (float32 for 16-bit inputs), and PEARStats when ``return_stats``.
    """
    if kl != "forward":
        raise ValueError(f"kl must be 'forward' (KL from the teacher's top-k to the student), got {kl!r}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if isinstance(hard_weight, bool) or not isinstance(hard_weight, (int, float)) or not 0.0 <= hard_weight <= 1.0:
        raise ValueError(f"hard_weight must be a number in [0, 1], got {hard_weight!r}")
    config = PEARConfig.coerce(config).with_overrides(variant=variant)
    prep = prepare_problem(
        hidden, lm_head_weight, labels, behavior_logprobs, config=config, bias=bias, cu_seqlens=cu_seqlens,
        temperature=temperature, reduction=reduction, num_items_in_batch=num_items_in_batch,
        ignore_index=ignore_index, chunk_size=chunk_size, backend=backend, vocab_parallel_group=None,
        check_values=check_values,
    )
    problem, chk, layout = prep.problem, prep.checked, prep.problem.layout
    _check_teacher(teacher_ids, teacher_logprobs, labels, problem.vocab_size, ignore_index, check_values,
                   problem.hidden.device)
    K = teacher_ids.shape[-1]
    targets = DistillTargets(
        ids=teacher_ids.reshape(-1, K)[layout.sup_index].to(torch.int64),
        logq=teacher_logprobs.reshape(-1, K)[layout.sup_index].to(torch.float64),
        tail=tail, hard_weight=float(hard_weight),
    )
    with prep.autocast_off:
        loss, result = fused_linear_distill(problem, targets, reduction, num_items_in_batch, prep.backend)
    if reduction == "none":
        loss = loss.reshape(chk.input_shape)
    if not return_stats:
        return loss
    return loss, summarize(result.logp, result.log_ratio, result.log_w_raw, result.log_w, layout, config,
                           chk.input_shape)


