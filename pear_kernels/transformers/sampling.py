"""Log-probs of the distribution a sampler actually drew from (temperature, top-k, top-p, min-p).

A teacher that generated with temperature, top-k, top-p or min-p sampled from a *processed*
distribution: the softmax of logits / T, truncated to a kept set and renormalised over it.
The PEAR importance ratio is only right with log pi_beta of that distribution, not of the plain
softmax. The processing follows Hugging Face ``generate``'s order (temperature, then top-k,
then top-p, then min-p), each step on the distribution the previous one left:

    top-k  keep the k most likely tokens (ties at the k-th value kept)
    top-p  keep the smallest most-likely-first set whose probability reaches top_p (the token
           that crosses top_p is kept; at least one token)
    min-p  keep tokens with p >= min_p * p_max
    log p_kept(y) = log p(y) - log sum_{v kept} p(v);  -inf when y was not kept

A token outside the kept set had probability 0 under the sampler: the data did not come from
these settings (or from this teacher).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

__all__ = ["SamplingSettings", "processed_logprobs", "processed_distribution"]


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off

    def __post_init__(self):
        import math

        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.min_p, (int, float)) and 0.0 <= self.min_p < 1.0):
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p!r}")

    @property
    def truncates(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    def to_dict(self):
        return {"temperature": float(self.temperature), "top_k": self.top_k, "top_p": float(self.top_p),
                "min_p": float(self.min_p)}


def processed_distribution(logits: torch.Tensor, s: SamplingSettings) -> torch.Tensor:
    """(R, V) log-probs of the processed distribution: renormalised over the kept set, -inf
    outside it."""
    logp, keep = _kept(logits, s)
    kept_lse = torch.logsumexp(logp.masked_fill(~keep, float("-inf")), dim=-1, keepdim=True)
    return (logp - kept_lse).masked_fill(~keep, float("-inf"))


def processed_logprobs(logits: torch.Tensor, targets: torch.Tensor, s: SamplingSettings) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log p_processed(target), kept) per row of (R, V) raw logits; float32 math at least."""
    logp, keep = _kept(logits, s)
    kept_lse = torch.logsumexp(logp.masked_fill(~keep, float("-inf")), dim=-1)
    tgt_kept = keep.gather(-1, targets[:, None]).squeeze(-1)
    out = logp.gather(-1, targets[:, None]).squeeze(-1) - kept_lse
    return torch.where(tgt_kept, out, torch.full_like(out, float("-inf"))), tgt_kept


def _kept(logits: torch.Tensor, s: SamplingSettings) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(logits / T), kept mask) after top-k, top-p and min-p in HF's order."""
    z = logits.float() / s.temperature if logits.dtype != torch.float64 else logits / s.temperature
    logp = torch.log_softmax(z, dim=-1)
    keep = torch.ones_like(logp, dtype=torch.bool)
    if s.top_k > 0 and s.top_k < logp.shape[-1]:
        kth = torch.topk(logp, s.top_k, dim=-1).values[:, -1:]
        keep &= logp >= kth
    if s.top_p < 1.0:
        masked = logp.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(masked, dim=-1)  # renormalised over what top-k kept
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each token
        keep_sorted = before < s.top_p
        keep_sorted[:, 0] = True
        nucleus = torch.zeros_like(keep).scatter(-1, order, keep_sorted)
        keep &= nucleus
    if s.min_p > 0.0:
        masked = logp.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(masked, dim=-1)
        keep &= probs >= s.min_p * probs.max(dim=-1, keepdim=True).values
    return logp, keep
