"""The GRPO policy loss on per-token log-probs, and its fused form on hidden states.

Per completion token t of sequence i, with ratio r = exp(logp - logp_old):

    loss_t = -min(r * A_i, clip(r, 1 - eps_low, 1 + eps_high) * A_i) + beta * k3_t
    k3_t   = exp(logp_ref - logp) - (logp_ref - logp) - 1      (Schulman's k3 estimator of
             KL(pi_theta || pi_ref): unbiased, always >= 0, low variance)

Separate eps_low / eps_high ("clip-higher", DAPO) let rare tokens with positive advantage grow
further than likely ones shrink. Aggregation over the batch:

    token-mean           sum_{i,t} loss / sum_i |o_i|        (DAPO; every token counts once)
    seq-mean-token-mean  mean_i (sum_t loss / |o_i|)         (original GRPO; short answers weigh more)
    constant-length      sum_{i,t} loss / (B * L_max)        (Dr.GRPO; no length bias at all)

``fused_grpo_loss`` gets logp from ``pear_kernels.fused_token_logprobs`` on the final hidden
states, so the (tokens x vocab) logits never exist; its backward is the fused kernel's.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

__all__ = ["AGGREGATIONS", "grpo_loss", "fused_grpo_loss"]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "constant-length")


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str, max_completion_length: Optional[int]) -> torch.Tensor:
    m = mask.to(per_token.dtype)
    if aggregation == "token-mean":
        return (per_token * m).sum() / m.sum().clamp(min=1.0)
    if aggregation == "seq-mean-token-mean":
        # a completion without tokens contributes 0 (its own mean is empty)
        return ((per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).mean()
    if aggregation == "constant-length":
        if max_completion_length is None or max_completion_length < 1:
            raise ValueError("aggregation='constant-length' needs max_completion_length >= 1")
        return (per_token * m).sum() / (per_token.shape[0] * max_completion_length)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: Optional[torch.Tensor] = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    kl_coef: float = 0.0,
    aggregation: str = "token-mean",
    max_completion_length: Optional[int] = None,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """GRPO loss from (B, L) per-token log-probs; returns (loss, metrics).

    Args:
        logp: current policy log-probs, differentiable. old_logp: the sampling policy's
            (detached). ref_logp: the reference model's, needed when kl_coef > 0.
        advantages: (B,) one advantage per completion. mask: (B, L) bool completion tokens.
    Metrics: clip_fraction (tokens where the clipped branch is active, i.e. get no gradient),
    clip_low / clip_high, kl (mean k3 over tokens, 0 without a reference), ratio_mean.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask {tuple(mask.shape)} must match"
        )
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be ({logp.shape[0]},), got {tuple(advantages.shape)}")
    if not (0.0 <= eps_low < 1.0):  # False for NaN too
        raise ValueError(f"eps_low must be in [0, 1), got {eps_low!r}")
    if not (0.0 <= eps_high < float("inf")):
        raise ValueError(f"eps_high must be a finite number >= 0, got {eps_high!r}")
    if kl_coef and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp")
    mask = mask.bool()
    for name, t in (("old_logp", old_logp), ("logp", logp), ("ref_logp", ref_logp)):
        if t is not None and bool(torch.isnan(t.detach()[mask]).any()):
            pos = tuple((torch.isnan(t.detach()) & mask).nonzero()[0].tolist())
            raise ValueError(f"{name} is NaN on a completion token at position {pos}")
    if bool(torch.isnan(advantages.detach()).any()):
        raise ValueError(f"advantages contain NaN at index {int(torch.isnan(advantages).nonzero()[0])}")
    # masked positions may hold anything; zero their log-ratio so exp() stays finite there
    log_ratio = torch.where(mask, logp - old_logp.detach(), torch.zeros_like(logp))
    ratio = log_ratio.exp()
    adv = advantages.detach().to(logp.dtype).unsqueeze(1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = None
    if ref_logp is not None:
        diff = torch.where(mask, ref_logp.detach() - logp, torch.zeros_like(logp))
        kl = diff.exp() - diff - 1.0
        if kl_coef:
            per_token = per_token + kl_coef * kl
    loss = _aggregate(per_token, mask, aggregation, max_completion_length)

    with torch.no_grad():
        n = mask.sum().clamp(min=1).to(torch.float64)
        low = (ratio < 1.0 - eps_low) & (adv < 0) & mask
        high = (ratio > 1.0 + eps_high) & (adv > 0) & mask
        metrics = {
            "clip_low": float(low.sum() / n),
            "clip_high": float(high.sum() / n),
            "clip_fraction": float((low | high).sum() / n),
            "ratio_mean": float((ratio * mask).sum() / n),
            "kl": float((kl * mask).sum() / n) if kl is not None else 0.0,
        }
    return loss, metrics


def fused_grpo_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    **loss_kwargs,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """GRPO loss straight from (B, L, H) hidden states and the LM head; labels (B, L).

    Completion tokens are those with labels != ignore_index. Adds ``entropy`` (mean per-token
    entropy of the current policy) to the metrics. Other keywords go to ``grpo_loss``.
    """
    from .. import fused_token_logprobs  # the public API layer (rl/ is a tool above it)

    logp, entropy = fused_token_logprobs(
        hidden, lm_head_weight, labels, bias=bias, temperature=temperature,
        ignore_index=ignore_index, return_entropy=True,
    )
    mask = labels != ignore_index
    loss, metrics = grpo_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, **loss_kwargs)
    metrics["entropy"] = float(entropy[mask].mean()) if bool(mask.any()) else 0.0
    return loss, metrics
