"""From the public functions' arguments to one validated PEARProblem (shared by the API).

Order matters: autocast first (it decides the dtype the checks see), then the vocabulary-
parallel layout (it decides the vocabulary size labels are checked against), then the checks,
then the supervised-token layout.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .checks import CheckedInputs, check_inputs, check_weight_clip
from .config import PEARConfig
from .distributed import agree_vocab_parallel
from .importance import build_layout
from .kernels.backend import NO_OPTIONS, LossOptions, PEARProblem
from .ops.amp import leave_autocast

__all__ = ["PreparedProblem", "prepare_problem", "loss_options", "shift_targets"]


def loss_options(softcap=None, lse_square_scale=0.0, label_smoothing=0.0) -> LossOptions:
    """Validated LossOptions (errors name the argument)."""
    import math

    def number(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a number, got {v!r}")
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v!r}")
        return v

    if softcap is not None:
        softcap = number("softcap", softcap)
        if softcap <= 0:
            raise ValueError(f"softcap must be > 0 (or None), got {softcap!r}")
    lse_square_scale = number("lse_square_scale", lse_square_scale)
    if lse_square_scale < 0:
        raise ValueError(f"lse_square_scale must be >= 0, got {lse_square_scale!r}")
    label_smoothing = number("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    return LossOptions(softcap, lse_square_scale, label_smoothing)


def shift_targets(labels, behavior_logprobs, cu_seqlens, ignore_index):
    """Labels and behavior log-probs aligned with the input ids -> aligned with the hidden
    states that predict them: position i gets entry i + 1 of its sequence, and the last
    position of every sequence gets ignore_index (it predicts nothing inside the sequence).
    Shapes are kept. Inputs that are not tensors are left for the argument checks to name."""
    if not (torch.is_tensor(labels) and torch.is_tensor(behavior_logprobs)) or labels.dim() not in (1, 2):
        return labels, behavior_logprobs
    if labels.shape != behavior_logprobs.shape:
        return labels, behavior_logprobs  # the shape check names it
    dim = labels.dim() - 1
    y = torch.roll(labels, -1, dims=dim).clone()
    b = torch.roll(behavior_logprobs, -1, dims=dim).clone()
    if labels.dim() == 2:
        y[:, -1] = ignore_index
        b[:, -1] = 0.0
        return y, b
    n = labels.shape[0]
    if cu_seqlens is not None and torch.is_tensor(cu_seqlens):
        ends = cu_seqlens.to(device=labels.device, dtype=torch.int64)[1:] - 1
        ends = ends[(ends >= 0) & (ends < n)]
    else:
        ends = torch.tensor([n - 1], device=labels.device) if n else torch.zeros(0, dtype=torch.int64)
    y[ends] = ignore_index
    b[ends] = 0.0
    return y, b


@dataclass
class PreparedProblem:
    problem: PEARProblem
    checked: CheckedInputs
    backend: Optional[str]
    autocast_off: contextlib.AbstractContextManager


CHUNK_BUDGET_ENV = "PEAR_KERNELS_CHUNK_MIB"
_chunk_budget_mib: Optional[float] = None


def set_chunk_budget(mib: Optional[float]) -> None:
    """Working memory (MiB) one chunk of logits may use when ``chunk_size`` is not given; None
    restores the default (``PEAR_KERNELS_CHUNK_MIB`` if set, else 512 MiB). Larger chunks run
    the matmuls closer to their peak (docs/performance.md has the measured curve); smaller ones
    save memory. Every rank of a vocabulary-parallel group must use the same budget (the ranks
    check it)."""
    if mib is not None and (isinstance(mib, bool) or not isinstance(mib, (int, float)) or not mib > 0
                            or mib != mib or mib == float("inf")):
        raise ValueError(f"chunk budget must be a positive number of MiB or None, got {mib!r}")
    global _chunk_budget_mib
    _chunk_budget_mib = mib


def chunk_budget() -> Optional[int]:
    """The chunk memory budget in bytes set by set_chunk_budget or PEAR_KERNELS_CHUNK_MIB (None:
    the kernels' default)."""
    mib = _chunk_budget_mib
    if mib is None:
        raw = os.environ.get(CHUNK_BUDGET_ENV, "").strip()
        if not raw:
            return None
        try:
            mib = float(raw)
        except ValueError:
            raise ValueError(f"{CHUNK_BUDGET_ENV} must be a number of MiB, got {raw!r}") from None
        if not mib > 0 or mib == float("inf"):
            raise ValueError(f"{CHUNK_BUDGET_ENV} must be a positive number of MiB, got {raw!r}")
    return int(mib * 2**20)


def prepare_problem(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    *,
    config: PEARConfig,
    bias: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    temperature: float,
    reduction: str,
    num_items_in_batch,
    ignore_index: int,
    chunk_size: Optional[int],
    backend: Optional[str],
    vocab_parallel_group,
    check_values: bool = True,
    options: LossOptions = NO_OPTIONS,
    want_lse: bool = False,
) -> PreparedProblem:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    budget = chunk_budget()  # read once: the agreement and the problem use the same value
    hidden, lm_head_weight, bias, autocast_off = leave_autocast(hidden, lm_head_weight, bias)
    def check(vocab_size=None):
        chk = check_inputs(
            hidden, lm_head_weight, labels, behavior_logprobs,
            bias=bias, cu_seqlens=cu_seqlens, temperature=temperature, reduction=reduction,
            num_items_in_batch=num_items_in_batch, ignore_index=ignore_index, vocab_size=vocab_size,
            check_values=check_values,
        )
        check_weight_clip(config, chk.hidden.dtype)
        return chk

    vocab_parallel = None
    if vocab_parallel_group is not None and (options.active or want_lse):
        raise ValueError(
            "softcap, lse_square_scale, label_smoothing and return_lse are not supported with "
            "vocab_parallel_group"
        )
    if vocab_parallel_group is None:
        chk = check()
    else:
        # validate locally, then agree across ranks before any collective: all raise or none.
        # Labels are first checked against no upper bound (the global vocabulary is learned
        # in the agreement), then against it: the agreed labels checksum makes that check
        # give the same answer on every rank.
        vocab_parallel, backend, chk = agree_vocab_parallel(
            vocab_parallel_group, lambda: check(vocab_size=2**62),
            hidden=hidden, weight=lm_head_weight, labels=labels, behavior_logprobs=behavior_logprobs,
            bias=bias, cu_seqlens=cu_seqlens, config=config, reduction=reduction,
            temperature=temperature, num_items_in_batch=num_items_in_batch,
            ignore_index=ignore_index, chunk_size=chunk_size, backend=backend, chunk_budget=budget,
        )
        check(vocab_size=vocab_parallel.vocab_size)
    layout = build_layout(
        chk.mask, block_size=config.block_size, row_length=chk.row_length, cu_seqlens=cu_seqlens
    )
    problem = PEARProblem(
        hidden=chk.hidden, weight=lm_head_weight, bias=bias, labels=chk.labels,
        behavior_logprobs=chk.behavior_logprobs, layout=layout, config=config,
        temperature=float(temperature), chunk_size=chunk_size, vocab_parallel=vocab_parallel,
        options=options, want_lse=want_lse, chunk_budget=budget,
    )
    return PreparedProblem(problem, chk, backend, autocast_off)
