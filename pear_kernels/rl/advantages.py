"""Group-relative advantages (GRPO), with the reward scalings users know from TRL.

    A_i = r_i - mean(group of i)                          scale_rewards="none" (Dr.GRPO)
    A_i = (r_i - mean(group of i)) / (std(group of i) + eps)      "group" (GRPO)
    A_i = (r_i - mean(group of i)) / (std(all rewards) + eps)     "batch" (Lite PPO)

std is the unbiased standard deviation (TRL's torch.std); a group of one sample has std 0
and advantage 0. Groups are either ``group_size`` contiguous samples per prompt or given by
``group_ids`` (any sizes, any order). A NaN reward is refused: it would turn its whole group's
advantages to NaN.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["group_advantages", "SCALE_REWARDS"]

SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(
    rewards: torch.Tensor,
    group_size: Optional[int] = None,
    scale_by_std: bool = True,
    eps: float = 1e-4,
    *,
    group_ids: Optional[torch.Tensor] = None,
    scale_rewards: Optional[str] = None,
) -> torch.Tensor:
    """(N,) float32 advantages for (N,) rewards.

    ``scale_rewards`` ("group", "batch", "none") overrides ``scale_by_std`` (True = "group",
    False = "none"). Give ``group_size`` (each prompt's samples contiguous) or ``group_ids``.
    """
    if not torch.is_tensor(rewards) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor, got {type(rewards).__name__} "
                         f"{tuple(getattr(rewards, 'shape', ()))}")
    if bool(torch.isnan(rewards).any()):
        raise ValueError(f"rewards contain NaN at index {int(torch.isnan(rewards).nonzero()[0])}")
    mode = scale_rewards if scale_rewards is not None else ("group" if scale_by_std else "none")
    if mode not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {mode!r}")
    n = rewards.numel()
    if group_ids is None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int (or pass group_ids), got {group_size!r}")
        if n % group_size:
            raise ValueError(
                f"rewards must have a multiple of group_size={group_size} entries, got {n} "
                "(pass group_ids for groups of unequal size)"
            )
        ids = torch.arange(n, device=rewards.device) // group_size
    else:
        if not torch.is_tensor(group_ids) or group_ids.shape != rewards.shape or group_ids.is_floating_point():
            raise ValueError(f"group_ids must be an integer tensor of rewards' shape {tuple(rewards.shape)}")
        _, ids = torch.unique(group_ids, return_inverse=True)
    r = rewards.to(torch.float32)
    k = int(ids.max()) + 1 if n else 0
    count = torch.zeros(k, device=r.device).index_add_(0, ids, torch.ones_like(r))
    mean = torch.zeros(k, device=r.device).index_add_(0, ids, r) / count.clamp(min=1)
    adv = r - mean[ids]
    if mode == "none":
        return adv
    if mode == "batch":
        std = r.std() if n > 1 else torch.zeros((), device=r.device)
        return adv / (std + eps)
    sq = torch.zeros(k, device=r.device).index_add_(0, ids, adv * adv)
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))
    return adv / (std[ids] + eps)
