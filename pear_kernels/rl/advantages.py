"""Group-relative advantages (GRPO), with Dr.GRPO's no-std option."""

from __future__ import annotations

import torch

__all__ = ["group_advantages"]


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """A_i = r_i - mean(group of i), divided by the group's std when ``scale_by_std``.

    ``rewards`` is (P * G,) with each prompt's G samples contiguous. GRPO divides by the
    (unbiased) std; Dr.GRPO does not, because dividing up-weights prompts that are almost
    always solved or failed. ``eps`` keeps an all-equal group (std 0) at advantage 0.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be 1-D with a multiple of group_size={group_size} entries, got shape {tuple(rewards.shape)}"
        )
    if bool(torch.isnan(rewards).any()):
        # one NaN would turn its whole group's advantages to NaN
        raise ValueError(f"rewards contain NaN at index {int(torch.isnan(rewards).nonzero()[0])}")
    r = rewards.to(torch.float32).view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_by_std and group_size > 1:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)
