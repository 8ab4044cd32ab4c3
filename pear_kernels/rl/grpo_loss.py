"""The GRPO policy loss on per-token log-probs, and its fused form on hidden states.

Per completion token t of sequence i, with the importance ratio r and advantage A:

    token level (GRPO, DAPO):  r_it = exp(logp_it - logp_old_it)
    sequence level (GSPO):     r_it = exp(mean_t (logp_it - logp_old_it))   (one per sequence)
    loss_it = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)               (PPO clip)
    dual clip (verl, c > 1):   for A < 0 also at most -c A                  (caps huge ratios)
            + beta * k3_it - entropy_coef * H_it
    k3_it = exp(logp_ref - logp) - (logp_ref - logp) - 1   (Schulman's k3 estimator of
            KL(pi_theta || pi_ref): unbiased, always >= 0, low variance)

Separate eps_low / eps_high ("clip-higher", DAPO) let rare tokens with positive advantage grow
further than likely ones shrink. A may be one per completion (B,) or per token (B, L).

Loss types (TRL's names; verl's ``loss_agg_mode`` beside them), m = completion-token mask:

    grpo      mean_i (sum_t loss m / |o_i|)          seq-mean-token-mean (original GRPO)
    bnpo      sum loss m / sum m                      token-mean over the local batch
    dr_grpo   sum loss m / (B * max_completion_length)   constant normaliser: no length bias
    dapo      sum loss m / num_items_in_batch         token-mean over the *global* batch: the
              completion tokens of all processes and accumulation steps (divided by the number
              of processes, as TRL passes it); without num_items_in_batch, the local count
    none      the per-token loss (B, L), 0 on masked positions (reduction="none")

The older ``aggregation`` names map onto these: "token-mean" -> bnpo,
"seq-mean-token-mean" -> grpo, "constant-length" -> dr_grpo.

``fused_grpo_loss`` gets logp (and the differentiable entropy) from
``pear_kernels.fused_token_logprobs`` on the final hidden states, so the (tokens x vocab)
logits never exist; its backward is the fused kernel's.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from ..checks import IGNORE_INDEX

__all__ = ["AGGREGATIONS", "LOSS_TYPES", "grpo_loss", "fused_grpo_loss"]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "constant-length")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_AGGREGATION_TO_TYPE = {"token-mean": "bnpo", "seq-mean-token-mean": "grpo", "constant-length": "dr_grpo"}


def _aggregate(per_token, mask, loss_type, max_completion_length, num_items_in_batch):
    m = mask.to(per_token.dtype)
    total = (per_token * m).sum()
    if loss_type == "bnpo":
        return total / m.sum().clamp(min=1.0)
    if loss_type == "grpo":
        # a completion without tokens contributes 0 (its own mean is empty)
        return ((per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length < 1:
            raise ValueError("loss_type='dr_grpo' (aggregation 'constant-length') needs max_completion_length >= 1")
        return total / (per_token.shape[0] * max_completion_length)
    if loss_type == "dapo":
        if num_items_in_batch is None:
            return total / m.sum().clamp(min=1.0)
        n = num_items_in_batch
        n = n.to(total) if torch.is_tensor(n) else float(n)
        return total / n
    raise AssertionError(loss_type)


def _finite_number(name, value, low=None, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return float(value)


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
    loss_type: Optional[str] = None,
    aggregation: Optional[str] = None,
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    importance_sampling_level: str = "token",
    dual_clip: Optional[float] = None,
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
    reduction: str = "mean",
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """GRPO-family loss from (B, L) per-token log-probs; returns (loss, metrics).

    Args:
        logp: current policy log-probs, differentiable. old_logp: the sampling policy's
            (detached). ref_logp: the reference model's, needed when kl_coef > 0.
        advantages: (B,) one per completion, or (B, L) per token. mask: (B, L) bool.
        loss_type: "grpo", "bnpo", "dr_grpo" or "dapo" (default "bnpo"); ``aggregation`` is the
            older name of the same choice ("token-mean", "seq-mean-token-mean", "constant-length").
        num_items_in_batch: dapo's normaliser (global completion-token count).
        importance_sampling_level: "token" (GRPO) or "sequence" (GSPO: the ratio of the
            length-normalised sequence likelihoods, one per completion).
        dual_clip: verl's clip_ratio_c (> 1): for negative advantages the loss is at most
            -dual_clip * A, so one huge ratio cannot dominate.
        entropy, entropy_coef: (B, L) per-token entropy (differentiable, e.g. from
            fused_token_logprobs(return_entropy=True)) and its bonus: loss -= coef * H.
        reduction: "mean" (the loss type's normaliser) or "none" (per-token (B, L), 0 masked).
    Metrics: clip_fraction (tokens where the clipped branch is active, i.e. get no gradient),
    clip_low / clip_high, dual_clip_fraction, kl (mean k3 over tokens, 0 without a
    reference), ratio_mean, entropy (when given).
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape or logp.dim() != 2:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask {tuple(mask.shape)} must "
            "match and be (B, L)"
        )
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages must be ({logp.shape[0]},) or {tuple(logp.shape)}, got {tuple(advantages.shape)}")
    if not (0.0 <= eps_low < 1.0):  # False for NaN too
        raise ValueError(f"eps_low must be in [0, 1), got {eps_low!r}")
    if not (0.0 <= eps_high < float("inf")):
        raise ValueError(f"eps_high must be a finite number >= 0, got {eps_high!r}")
    kl_coef = _finite_number("kl_coef", kl_coef, low=0.0)
    entropy_coef = _finite_number("entropy_coef", entropy_coef)
    if dual_clip is not None:
        dual_clip = _finite_number("dual_clip", dual_clip)
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (verl's clip_ratio_c, e.g. 3), got {dual_clip!r}")
    if kl_coef and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp")
    if entropy_coef and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    if entropy is not None and entropy.shape != logp.shape:
        raise ValueError(f"entropy must have logp's shape {tuple(logp.shape)}, got {tuple(entropy.shape)}")
    if loss_type is not None and aggregation is not None:
        raise ValueError("pass loss_type or aggregation, not both")
    if aggregation is not None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        loss_type = _AGGREGATION_TO_TYPE[aggregation]
    loss_type = loss_type or "bnpo"
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    mask = mask.bool()
    for name, t in (("old_logp", old_logp), ("logp", logp), ("ref_logp", ref_logp)):
        if t is not None and bool(torch.isnan(t.detach()[mask]).any()):
            pos = tuple((torch.isnan(t.detach()) & mask).nonzero()[0].tolist())
            raise ValueError(f"{name} is NaN on a completion token at position {pos}")
    if bool(torch.isnan(advantages.detach()).any()):
        raise ValueError(f"advantages contain NaN at index {tuple(torch.isnan(advantages).nonzero()[0].tolist())}")
    # masked positions may hold anything; zero their log-ratio so exp() stays finite there
    log_ratio = torch.where(mask, logp - old_logp.detach(), torch.zeros_like(logp))
    if importance_sampling_level == "sequence":
        m = mask.to(logp.dtype)
        seq = (log_ratio * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1.0)
        log_ratio = seq.expand_as(logp)
    ratio = log_ratio.exp()
    adv = advantages.detach().to(logp.dtype)
    adv = adv.unsqueeze(1).expand_as(logp) if adv.dim() == 1 else adv
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    dual = None
    if dual_clip is not None:
        cap = -dual_clip * adv
        dual = (adv < 0) & (per_token > cap)
        per_token = torch.where(adv < 0, torch.minimum(per_token, cap), per_token)
    kl = None
    if ref_logp is not None:
        diff = torch.where(mask, ref_logp.detach() - logp, torch.zeros_like(logp))
        kl = diff.exp() - diff - 1.0
        if kl_coef:
            per_token = per_token + kl_coef * kl
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy
    if reduction == "none":
        loss = per_token * mask.to(per_token.dtype)
    else:
        loss = _aggregate(per_token, mask, loss_type, max_completion_length, num_items_in_batch)

    with torch.no_grad():
        n = mask.sum().clamp(min=1).to(torch.float64)
        low = (ratio < 1.0 - eps_low) & (adv < 0) & mask
        high = (ratio > 1.0 + eps_high) & (adv > 0) & mask
        metrics = {
            "clip_low": float(low.sum() / n),
            "clip_high": float(high.sum() / n),
            "clip_fraction": float((low | high).sum() / n),
            "dual_clip_fraction": float((dual & mask).sum() / n) if dual is not None else 0.0,
            "ratio_mean": float((ratio * mask).sum() / n),
            "kl": float((kl * mask).sum() / n) if kl is not None else 0.0,
        }
        if entropy is not None:
            metrics["entropy"] = float((entropy * mask).sum() / n)
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
    ignore_index: int = IGNORE_INDEX,
    **loss_kwargs,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """GRPO loss straight from (B, L, H) hidden states and the LM head; labels (B, L).

    Completion tokens are those with labels != ignore_index. The per-token entropy of the
    current policy is computed alongside (differentiable: ``entropy_coef`` gives an entropy
    bonus) and its mean is in the metrics. Other keywords go to ``grpo_loss``.
    """
    from .. import fused_token_logprobs  # the public API layer (rl/ is a tool above it)

    logp, entropy = fused_token_logprobs(
        hidden, lm_head_weight, labels, bias=bias, temperature=temperature,
        ignore_index=ignore_index, return_entropy=True,
    )
    mask = labels != ignore_index
    loss, metrics = grpo_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, entropy=entropy, **loss_kwargs)
    return loss, metrics
