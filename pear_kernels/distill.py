"""Public API: PEAR-weighted distillation from stored teacher top-k log-probs.

The teacher is run once, offline (``pear-kernels collect --top-k K`` stores its K most likely
ids and log-probs per response position); the student then trains on a forward KL from that
top-k distribution, each token weighted by the PEAR weight, straight from its final hidden
states, without (tokens x vocab) logits. See docs/distillation.md.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .checks import BEHAVIOR_LOGPROB_TOLERANCE, IGNORE_INDEX
from .config import PEARConfig
from .inputs import prepare_problem
from .kernels.torch_distill import DistillTargets
from .ops.fused_linear_distill import fused_linear_distill
from .stats import PEARStats, summarize

__all__ = ["fused_pear_distill_loss", "PEARDistillLoss", "TAILS"]

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
    ignore_index: int = IGNORE_INDEX,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    check_values: bool = True,
    return_stats: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, PEARStats]]:
    """PEAR-weighted forward-KL distillation from the teacher's stored top-k distribution.

    Per supervised token t: L_t = (1 - hard_weight) KL_t + hard_weight (-log p_student(y_t)),
    KL_t the forward KL from the teacher's top-k to the student, weighted by the PEAR weight
    w_t and reduced; never builds (tokens x vocab) logits (docs/distillation.md).

    Args:
        hidden: (N, H) or (B, T, H) final hidden states (already shifted: hidden[i] predicts labels[i]).
        lm_head_weight: (V, H) output projection, same dtype and device as hidden.
        labels: (N,) or (B, T) sampled token ids; ``ignore_index`` marks unsupervised tokens.
        behavior_logprobs: labels' shape; log-prob of each sampled token under the policy that
            sampled it (the teacher): the PEAR weight's log-ratio is log p_student(y) minus it.
        teacher_ids: labels.shape + (K,) ids of the teacher's K most likely tokens at each
            position, aligned with labels exactly like behavior_logprobs, distinct per position.
        teacher_logprobs: the same shape, their log-probs (<= 0; -inf allowed: no mass; their
            probabilities sum to at most 1).
        config: a PEARConfig (variant, gamma, block size, clips); ``variant`` overrides its field.
        kl: "forward" (KL(teacher top-k || student), the only one offered).
        tail: what the teacher mass outside its top-k is: "renormalize" (dropped: the top-k
            renormalised to 1 is the target) or "bucket" (one more outcome, 1 - sum q, against
            the student's mass outside the K ids).
        hard_weight: lam in [0, 1], the share of the sampled token's NLL in the token loss.
        bias: optional (V,) output bias.
        cu_seqlens: packed (N, ...) rows: sequence s is tokens [cu_seqlens[s], cu_seqlens[s+1]).
        temperature: the student's logits are divided by it (the teacher's log-probs are used
            as stored).
        reduction: "mean" (over supervised tokens, or ``num_items_in_batch``), "sum", or "none"
            (per-token w_t L_t of labels' shape, 0 where masked).
        num_items_in_batch: normalizer for "mean" under gradient accumulation (HF Trainer).
        ignore_index: label value of unsupervised tokens (their teacher entries are not read).
        chunk_size: supervised tokens per logits chunk (default: rows from the chunk budget,
            512 MiB unless ``set_chunk_budget`` or ``PEAR_KERNELS_CHUNK_MIB`` says otherwise).
        backend: "auto", "torch", "native" or "triton" (``PEAR_KERNELS_BACKEND`` sets the default).
        check_values: validate the teacher's values (ids in range and distinct, log-probs not NaN,
            <= 0, a position's mass in (0, 1]) as well as shapes; False skips the host syncs,
            and the caller then guarantees them (repeated ids would, e.g., race in the Triton
            kernel's sparse update).
        return_stats: also return PEARStats (log-probs of the sampled tokens, weights, ESS, clips).

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


class PEARDistillLoss(torch.nn.Module):
    """Module form of fused_pear_distill_loss with a fixed PEARConfig and tail / hard weight.

    ``forward(hidden, lm_head_weight, labels, behavior_logprobs, teacher_ids, teacher_logprobs,
    bias=None, **kwargs)``; other keyword arguments of fused_pear_distill_loss pass through.
    """

    def __init__(self, config: Optional[PEARConfig] = None, *, tail: str = "renormalize", hard_weight: float = 0.0,
                 temperature: float = 1.0, reduction: str = "mean", ignore_index: int = IGNORE_INDEX,
                 chunk_size: Optional[int] = None, **overrides):
        super().__init__()
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
        self.config = PEARConfig.coerce(config).with_overrides(**overrides)
        self.tail, self.hard_weight = tail, hard_weight
        self.temperature, self.reduction = temperature, reduction
        self.ignore_index, self.chunk_size = ignore_index, chunk_size

    def forward(self, hidden, lm_head_weight, labels, behavior_logprobs, teacher_ids, teacher_logprobs, bias=None,
                **kwargs):
        opts = dict(config=self.config, tail=self.tail, hard_weight=self.hard_weight, temperature=self.temperature,
                    reduction=self.reduction, ignore_index=self.ignore_index, chunk_size=self.chunk_size)
        opts.update(kwargs)
        return fused_pear_distill_loss(hidden, lm_head_weight, labels, behavior_logprobs, teacher_ids,
                                       teacher_logprobs, bias=bias, **opts)

    def extra_repr(self) -> str:
        return f"config={self.config}, tail={self.tail!r}, hard_weight={self.hard_weight}, reduction={self.reduction!r}"
