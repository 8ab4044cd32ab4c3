"""The PEAR weight math, in one place.

Everything here works on the *compact* array of supervised tokens (labels != ignore_index),
in flat order, so sequences are contiguous runs and masked tokens simply do not exist.
For supervised token i (compact index) of a sequence with T supervised tokens:

    d_i          = clip(logp_theta_i - logp_beta_i, delta_min, delta_max)       (float64)
    incl_i       = sum_{j >= i, same sequence} d_j        (inclusive suffix sum)
    token:    log G_i = n_after_i * log(gamma) + incl_{i+1}  (0 at the last)     (n_after_i = T - t)
    block:    log G_i = log G^token at e_k, the last token of i's block
                      = (T - e_k) log(gamma) + sum_{m > k} rho_m   (spec's formula, rewritten)
    sequence: log G_i = incl at the sequence's first supervised token
    none:     log G_i = 0
    then clip to [logw_min, logw_max] and w = exp(.)

The block identity holds because sum_{m>k} rho_m is exactly the suffix sum strictly after e_k.

The chunked kernels walk each sequence from its end in chunks of compact tokens and call
``fill_suffix_sums`` for each chunk (the carry from later chunks is read back from the
``incl`` buffer), then ``log_weights_for_range``; the reference calls both once over the
whole batch. No other module computes a weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .config import PEARConfig, Variant

__all__ = [
    "SequenceLayout",
    "build_layout",
    "clip_log_ratio",
    "fill_suffix_sums",
    "log_weights_for_range",
    "scan_chunk",
    "clip_log_weights",
    "compute_log_weights",
    "pear_log_weights",
    "pear_weights",
]


@dataclass
class SequenceLayout:
    """Integer structure of the supervised tokens of a batch (model independent).

    All per-token tensors are int64 of length M (number of supervised tokens), compact order.
    """

    n_tokens: int  # N, all tokens, masked included
    sup_index: torch.Tensor  # flat position of each supervised token, ascending
    seq_id: torch.Tensor  # sequence of each supervised token (non-decreasing)
    n_after: torch.Tensor  # supervised tokens after it in its sequence (T - t)
    seq_start: torch.Tensor  # compact index of its sequence's first supervised token
    seq_end: torch.Tensor  # compact index one past its sequence's last supervised token
    block_end: torch.Tensor  # compact index of the last token of its block
    seq_lengths: torch.Tensor  # (S,) supervised tokens per sequence
    num_sequences: int

    @property
    def num_supervised(self) -> int:
        return int(self.sup_index.numel())

    def to_tokens(self, values: torch.Tensor, shape=None, dtype: Optional[torch.dtype] = None,
                  fill: float = 0.0) -> torch.Tensor:
        """The one compact-to-full scatter: (M, ...) values of the supervised tokens, in
        compact order, to (n_tokens, ...) with ``fill`` at unsupervised positions, reshaped to
        ``shape`` (the labels' shape) when given. Differentiable when ``values`` requires grad."""
        dtype = values.dtype if dtype is None else dtype
        out = torch.full((self.n_tokens, *values.shape[1:]), fill, dtype=dtype, device=values.device)
        v = values.to(dtype)
        out = out.index_put((self.sup_index,), v) if v.requires_grad else out.index_put_((self.sup_index,), v)
        return out if shape is None else out.reshape(shape)


def token_sequence_ids(
    n_tokens: int,
    *,
    row_length: Optional[int] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    device: torch.device | str = "cpu",
) -> Tuple[torch.Tensor, int]:
    """Sequence id of every flat token, and the number of sequences.

    ``row_length``: (B, T) input flattened row-major, each row a sequence.
    ``cu_seqlens``: packed rows, segment s is [cu_seqlens[s], cu_seqlens[s+1]).
    Neither: the whole of N is one sequence.
    """
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        positions = torch.arange(n_tokens, device=device)
        # token p belongs to the segment s with cu[s] <= p < cu[s+1]; empty segments are skipped.
        ids = torch.searchsorted(cu[1:], positions, right=True)
        return ids, int(cu.numel() - 1)
    if row_length is not None:
        rows = n_tokens // row_length if row_length > 0 else 0
        return torch.arange(n_tokens, device=device) // max(row_length, 1), rows
    return torch.zeros(n_tokens, dtype=torch.int64, device=device), 1


def build_layout(
    mask: torch.Tensor,
    *,
    block_size: int = 1,
    row_length: Optional[int] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> SequenceLayout:
    """Layout of the supervised tokens of a flat ``mask`` (True = supervised)."""
    mask = mask.reshape(-1)
    device = mask.device
    n_tokens = mask.numel()
    tok_seq, num_seq = token_sequence_ids(
        n_tokens, row_length=row_length, cu_seqlens=cu_seqlens, device=device
    )
    sup_index = mask.nonzero().reshape(-1)
    seq_id = tok_seq[sup_index]
    seq_lengths = torch.bincount(seq_id, minlength=max(num_seq, 1))[: max(num_seq, 0)]
    starts = torch.cumsum(seq_lengths, 0) - seq_lengths
    if seq_id.numel():
        my_start = starts[seq_id]
        my_len = seq_lengths[seq_id]
    else:
        my_start = torch.zeros(0, dtype=torch.int64, device=device)
        my_len = torch.zeros(0, dtype=torch.int64, device=device)
    rank = torch.arange(seq_id.numel(), device=device) - my_start
    block_last_rank = torch.minimum((rank // block_size + 1) * block_size - 1, my_len - 1)
    return SequenceLayout(
        n_tokens=n_tokens,
        sup_index=sup_index,
        seq_id=seq_id,
        n_after=my_len - 1 - rank,
        seq_start=my_start,
        seq_end=my_start + my_len,
        block_end=my_start + block_last_rank,
        seq_lengths=seq_lengths,
        num_sequences=num_seq,
    )


def clip_log_ratio(log_ratio: torch.Tensor, config: PEARConfig) -> torch.Tensor:
    """Per-decision clip of the log-ratio, in float64 (the scan's working precision)."""
    low, high = config.delta_clip
    return log_ratio.to(torch.float64).clamp(low, high)


def fill_suffix_sums(
    d: torch.Tensor, incl: torch.Tensor, layout: SequenceLayout, start: int, end: int
) -> None:
    """Write incl[i] = sum of d over [i, end of i's sequence) for i in [start, end).

    ``d`` and ``incl`` are float64 buffers of length M. Entries at or after ``end`` must already
    hold their final values (chunks are visited from the back), which is how a sequence that
    spans several chunks carries its suffix sum.

    The scan is segment-wise: a value is only ever *added* to values of its own sequence,
    never subtracted from a running total over the chunk, so a NaN, an inf or a 1e30 in one
    sequence cannot reach (or round away) another's sums. It is a log-step (Hillis-Steele)
    segmented scan: after the step with stride k every entry holds the sum of up to 2k values
    of its own sequence starting at it; ceil(log2(chunk)) vectorised steps in all.
    """
    if end <= start:
        return
    n = end - start
    acc = d[start:end].clone()
    # last compact index (exclusive) of each token's sequence inside the chunk
    seq_end = layout.seq_end[start:end].clamp(max=end) - start
    pos = torch.arange(n, device=d.device)
    stride = 1
    while stride < n:
        src = pos + stride
        ok = src < seq_end
        shifted = acc[src.clamp(max=n - 1)]
        # where, not multiply: an unselected NaN/inf of another sequence is never touched
        acc = torch.where(ok, acc + shifted, acc)
        stride *= 2
    if end < incl.numel():
        # sequence continues past the chunk: add the carry stored at the first later token
        continues = layout.seq_end[start:end] > end
        acc = torch.where(continues, acc + incl[end], acc)
    incl[start:end] = acc


def _suffix_after(d: torch.Tensor, incl: torch.Tensor, layout: SequenceLayout, idx: torch.Tensor) -> torch.Tensor:
    """Sum of d strictly after each token ``idx`` in its sequence (0 for a sequence's last token).

    Read from the next token's inclusive sum, never as incl - d, so that an infinite d (an
    unbounded delta clip) gives the spec's value instead of inf - inf = NaN.
    """
    nxt = idx + 1
    has_next = nxt < layout.seq_end[idx]
    vals = incl[nxt.clamp(max=max(incl.numel() - 1, 0))]
    return torch.where(has_next, vals, torch.zeros_like(vals))


def log_weights_for_range(
    d: torch.Tensor,
    incl: torch.Tensor,
    layout: SequenceLayout,
    config: PEARConfig,
    start: int,
    end: int,
) -> torch.Tensor:
    """Unclipped float64 log G for compact tokens [start, end).

    Needs incl filled for every index a token of the range reads: for token and block, the
    range itself and anything after it in the same sequence; for sequence, the whole sequence.
    """
    variant = config.variant
    if variant is Variant.NONE:
        return torch.zeros(end - start, dtype=torch.float64, device=d.device)
    log_gamma = config.log_gamma
    if variant is Variant.TOKEN:
        idx = torch.arange(start, end, device=d.device)
        return layout.n_after[idx].to(torch.float64) * log_gamma + _suffix_after(d, incl, layout, idx)
    if variant is Variant.BLOCK:
        be = layout.block_end[start:end]
        return layout.n_after[be].to(torch.float64) * log_gamma + _suffix_after(d, incl, layout, be)
    if variant is Variant.SEQUENCE:
        return incl[layout.seq_start[start:end]].clone()
    raise AssertionError(f"unhandled variant {variant}")


def scan_chunk(
    log_ratio: torch.Tensor,
    d: torch.Tensor,
    incl: torch.Tensor,
    layout: SequenceLayout,
    config: PEARConfig,
    start: int,
    end: int,
) -> torch.Tensor:
    """One chunk [start, end) of the chunked walk: clip its log-ratios into ``d``, fill its
    suffix sums (carry from later chunks), return its unclipped log-weights."""
    d[start:end] = clip_log_ratio(log_ratio, config)
    fill_suffix_sums(d, incl, layout, start, end)
    return log_weights_for_range(d, incl, layout, config, start, end)


def clip_log_weights(log_g: torch.Tensor, config: PEARConfig) -> torch.Tensor:
    low, high = config.log_weight_clip
    return log_g.clamp(low, high)


def compute_log_weights(
    log_ratio_sup: torch.Tensor, layout: SequenceLayout, config: PEARConfig
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Clipped and unclipped float64 log-weights for all M compact tokens at once."""
    m = log_ratio_sup.numel()
    d = torch.empty(m, dtype=torch.float64, device=log_ratio_sup.device)
    raw = scan_chunk(log_ratio_sup, d, torch.empty_like(d), layout, config, 0, m)
    return clip_log_weights(raw, config), raw


def _resolve_structure(
    log_ratio: torch.Tensor,
    mask: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, Optional[int]]:
    if not torch.is_tensor(log_ratio) or not log_ratio.is_floating_point():
        raise TypeError("log_ratio must be a floating-point tensor")
    if log_ratio.dim() not in (1, 2):
        raise ValueError(f"log_ratio must be (N,) or (B, T), got shape {tuple(log_ratio.shape)}")
    if mask is None:
        mask = torch.ones_like(log_ratio, dtype=torch.bool)
    if mask.shape != log_ratio.shape:
        raise ValueError(
            f"mask must have the shape of log_ratio {tuple(log_ratio.shape)}, got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    row_length = None
    if log_ratio.dim() == 2:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens applies to flat (N,) inputs, not (B, T)")
        row_length = log_ratio.shape[1]
    elif cu_seqlens is not None:
        from .checks import check_cu_seqlens

        check_cu_seqlens(cu_seqlens, log_ratio.shape[0], log_ratio.device)
    return mask, row_length


def pear_log_weights(
    log_ratio: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    config: Optional[PEARConfig] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    **overrides,
) -> torch.Tensor:
    """Clipped PEAR log-weights log G^ for per-token log-ratios.

    Args:
        log_ratio: (N,) or (B, T) per-token log pi_theta - log pi_beta.
        mask: bool, same shape, True on supervised tokens (default: all).
        config: PEARConfig; keyword overrides (variant=, gamma=, ...) replace its fields.
        cu_seqlens: for (N,) packed rows, segment boundaries (starts with 0, ends with N).

    Returns a float64 tensor of log_ratio's shape; masked positions hold 0.
    """
    config = (config or PEARConfig()).with_overrides(**overrides)
    mask, row_length = _resolve_structure(log_ratio, mask, cu_seqlens)
    layout = build_layout(
        mask, block_size=config.block_size, row_length=row_length, cu_seqlens=cu_seqlens
    )
    flat = log_ratio.reshape(-1)[layout.sup_index]
    clipped, _ = compute_log_weights(flat, layout, config)
    return layout.to_tokens(clipped, log_ratio.shape, torch.float64)


def pear_weights(
    log_ratio: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    config: Optional[PEARConfig] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    **overrides,
) -> torch.Tensor:
    """PEAR weights w = exp(clipped log G) for per-token log-ratios (see pear_log_weights).

    Returns a tensor of log_ratio's shape and dtype; masked positions hold 0.
    """
    mask_ = mask if mask is not None else torch.ones_like(log_ratio, dtype=torch.bool)
    if torch.is_tensor(log_ratio) and log_ratio.is_floating_point():
        high = (config or PEARConfig()).with_overrides(**overrides).log_weight_clip[1]
        limit = math.log(torch.finfo(log_ratio.dtype).max)
        if high > limit:  # the weights come back in log_ratio's dtype: exp(high) must fit in it
            raise ValueError(
                f"log_weight_clip upper bound {high} is too large: exp({high}) overflows "
                f"{log_ratio.dtype} weights (at most {limit:.2f}; use pear_log_weights for the log-weights)"
            )
    log_w = pear_log_weights(log_ratio, mask, config=config, cu_seqlens=cu_seqlens, **overrides)
    return torch.where(mask_, log_w.exp(), torch.zeros_like(log_w)).to(log_ratio.dtype)
