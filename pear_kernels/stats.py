"""PEARStats: what a trainer should log about the weights (see docs/pear_math.md, "Things to watch")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from .config import PEARConfig
from .importance import SequenceLayout

__all__ = ["PEARStats", "summarize"]


@dataclass
class PEARStats:
    """Per-token tensors have the labels' shape; masked positions hold 0 (see ``mask``).

    token_logprobs: log pi_theta(label) (detached, float32).
    log_weights: clipped log-weights log G^ (float32).
    weights: w = exp(log G^) (float32).
    mask: True on supervised tokens.
    mean_weight: mean of w over supervised tokens.
    ess: (sum w)^2 / sum w^2 over the batch's supervised tokens.
    ess_fraction: ess / number of supervised tokens (1 = uniform weights).
    ess_per_sequence: (S,) the same per sequence (0 for a sequence without supervised tokens).
    ratio_clip_fraction: fraction of supervised tokens whose log-ratio hit the delta clip.
    weight_clip_fraction: fraction whose log-weight hit the log-weight clip.
    num_tokens: number of supervised tokens.
    """

    token_logprobs: torch.Tensor
    log_weights: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor
    mean_weight: torch.Tensor
    ess: torch.Tensor
    ess_fraction: torch.Tensor
    ess_per_sequence: torch.Tensor
    ratio_clip_fraction: torch.Tensor
    weight_clip_fraction: torch.Tensor
    num_tokens: int
    variant: str = "token"  # the config's variant; "none" has no ratios or weights to clip

    def scalars(self, prefix: str = "pear/") -> Dict[str, float]:
        """Scalar summaries as plain floats, ready for a logger.

        Plain SFT (variant "none") has weight 1 everywhere and uses no ratio: its clip
        fractions would be numbers about nothing, so they are left out."""
        out = {
            f"{prefix}mean_weight": float(self.mean_weight),
            f"{prefix}ess": float(self.ess),
            f"{prefix}ess_fraction": float(self.ess_fraction),
            f"{prefix}ratio_clip_fraction": float(self.ratio_clip_fraction),
            f"{prefix}weight_clip_fraction": float(self.weight_clip_fraction),
            f"{prefix}num_tokens": float(self.num_tokens),
        }
        if self.variant == "none":
            del out[f"{prefix}ratio_clip_fraction"], out[f"{prefix}weight_clip_fraction"]
        return out


def _scatter_full(values: torch.Tensor, layout: SequenceLayout, shape) -> torch.Tensor:
    return layout.to_tokens(values, shape, torch.float32)


def summarize(
    logp: torch.Tensor,
    log_ratio: torch.Tensor,
    log_w_raw: torch.Tensor,
    log_w: torch.Tensor,
    layout: SequenceLayout,
    config: PEARConfig,
    shape,
) -> PEARStats:
    """Build PEARStats from compact (M,) tensors: log-probs, raw log-ratios, log-weights."""
    m = layout.num_supervised
    device = logp.device
    w = log_w.exp()
    if m and config.variant.value == "none":
        zero = torch.zeros((), dtype=torch.float64, device=device)
        ratio_clipped = weight_clipped = zero  # nothing is clipped in plain SFT
        ess = torch.full((), float(m), dtype=torch.float64, device=device)
        s = max(layout.num_sequences, 1)
        ess_seq = torch.zeros(s, dtype=torch.float64, device=device).index_add_(
            0, layout.seq_id, torch.ones(m, dtype=torch.float64, device=device)
        )[: layout.num_sequences]
        mean_w = w.mean()
    elif m:
        dlo, dhi = config.delta_clip
        wlo, whi = config.log_weight_clip
        lr = log_ratio.to(torch.float64)
        ratio_clipped = ((lr < dlo) | (lr > dhi)).to(torch.float64).mean()
        weight_clipped = ((log_w_raw < wlo) | (log_w_raw > whi)).to(torch.float64).mean()
        ess = w.sum() ** 2 / (w * w).sum()
        s = max(layout.num_sequences, 1)
        sum_w = torch.zeros(s, dtype=torch.float64, device=device).index_add_(0, layout.seq_id, w)
        sum_w2 = torch.zeros(s, dtype=torch.float64, device=device).index_add_(0, layout.seq_id, w * w)
        ess_seq = torch.where(sum_w2 > 0, sum_w**2 / sum_w2.clamp_min(1e-300), torch.zeros_like(sum_w))
        mean_w = w.mean()
    else:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        ratio_clipped = weight_clipped = ess = mean_w = zero
        ess_seq = torch.zeros(max(layout.num_sequences, 0), dtype=torch.float64, device=device)
    return PEARStats(
        token_logprobs=_scatter_full(logp.detach(), layout, shape),
        log_weights=_scatter_full(log_w, layout, shape),
        weights=_scatter_full(w, layout, shape),
        mask=_scatter_full(torch.ones(m, device=device), layout, shape).bool(),
        mean_weight=mean_w.float(),
        ess=ess.float(),
        ess_fraction=(ess / max(m, 1)).float(),
        ess_per_sequence=ess_seq.float(),
        ratio_clip_fraction=ratio_clipped.float(),
        weight_clip_fraction=weight_clipped.float(),
        num_tokens=m,
        variant=config.variant.value,
    )
