"""From the public functions' arguments to one validated PEARProblem (shared by the API).

Order matters: autocast first (it decides the dtype the checks see), then the vocabulary-
parallel layout (it decides the vocabulary size labels are checked against), then the checks,
then the supervised-token layout.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from .checks import CheckedInputs, check_inputs, check_weight_clip
from .config import PEARConfig
from .distributed import agree_vocab_parallel
from .kernels.problem import PEARProblem
from .ops.amp import leave_autocast
from .weights import build_layout

__all__ = ["PreparedProblem", "prepare_problem"]


@dataclass
class PreparedProblem:
    problem: PEARProblem
    checked: CheckedInputs
    backend: Optional[str]
    autocast_off: contextlib.AbstractContextManager


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
) -> PreparedProblem:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
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
            ignore_index=ignore_index, chunk_size=chunk_size, backend=backend,
        )
        check(vocab_size=vocab_parallel.vocab_size)
    layout = build_layout(
        chk.mask, block_size=config.block_size, row_length=chk.row_length, cu_seqlens=cu_seqlens
    )
    problem = PEARProblem(
        hidden=chk.hidden, weight=lm_head_weight, bias=bias, labels=chk.labels,
        behavior_logprobs=chk.behavior_logprobs, layout=layout, config=config,
        temperature=float(temperature), chunk_size=chunk_size, vocab_parallel=vocab_parallel,
    )
    return PreparedProblem(problem, chk, backend, autocast_off)
