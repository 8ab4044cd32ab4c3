"""The tests' oracle: the PEAR loss written as direct loops over the definitions, float64.

It shares no code with pear_kernels (it imports only torch and math): a bug in the library's
weight math, layout or normaliser cannot hide in it. The weights are computed per sequence by
plain Python loops over the formulas of docs/pear_math.md; the loss materialises the logits
in float64 and is differentiated by ordinary autograd.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["oracle_log_weights", "oracle_loss", "sequences_of"]


def sequences_of(n_rows: int, row_len: Optional[int], cu_seqlens: Optional[Sequence[int]]) -> List[Tuple[int, int]]:
    """[start, end) flat ranges of the sequences: rows of (B, T), packed segments, or all of N."""
    if cu_seqlens is not None:
        cu = [int(x) for x in cu_seqlens]
        return [(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
    if row_len is not None:
        return [(r * row_len, (r + 1) * row_len) for r in range(n_rows // row_len)]
    return [(0, n_rows)]


def _clip(x: float, lo: float, hi: float) -> float:
    if math.isnan(x):
        return x
    return min(max(x, lo), hi)


def oracle_log_weights(
    log_ratio: List[float],
    *,
    variant: str,
    gamma: float = 0.999,
    block_size: int = 4,
    delta_clip=(-0.08, 0.3),
    log_weight_clip=(-10.0, 5.0),
) -> List[float]:
    """Clipped log-weights of ONE sequence's supervised tokens (in order), by the definitions."""
    T = len(log_ratio)
    d = [_clip(float(x), delta_clip[0], delta_clip[1]) for x in log_ratio]
    lg = math.log(gamma)
    out = []
    for t in range(1, T + 1):  # 1-based as in the definitions
        if variant == "none":
            g = 0.0
        elif variant == "token":
            g = (T - t) * lg
            for j in range(t + 1, T + 1):
                g += d[j - 1]
        elif variant == "block":
            K = (T + block_size - 1) // block_size
            k = (t - 1) // block_size + 1
            e_k = min(k * block_size, T)
            g = (T - e_k) * lg
            for m in range(k + 1, K + 1):
                rho = 0.0
                for j in range((m - 1) * block_size + 1, min(m * block_size, T) + 1):
                    rho += d[j - 1]
                g += rho
        elif variant == "sequence":
            g = 0.0
            for j in range(1, T + 1):
                g += d[j - 1]
        else:
            raise ValueError(variant)
        out.append(_clip(g, log_weight_clip[0], log_weight_clip[1]))
    return out


def oracle_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    behavior: torch.Tensor,
    *,
    variant: str = "token",
    gamma: float = 0.999,
    block_size: int = 4,
    delta_clip=(-0.08, 0.3),
    log_weight_clip=(-10.0, 5.0),
    cu_seqlens=None,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    num_items=None,
    ignore_index: int = -100,
    softcap: Optional[float] = None,
    lse_square_scale: float = 0.0,
    label_smoothing: float = 0.0,
):
    """(loss, per-token weights) in float64. ``hidden``/``weight``/``bias`` may require grad:
    the loss is differentiable w.r.t. them (the weights are constants, as in the definition).

    hidden (N, H) or (B, T, H); labels/behavior (N,) or (B, T). reduction "none" returns the
    per-token losses in labels' shape (0 where masked)."""
    shape = labels.shape
    row_len = shape[1] if labels.dim() == 2 else None
    h = hidden.reshape(-1, hidden.shape[-1]).to(torch.float64)
    w = weight.to(torch.float64)
    y = labels.reshape(-1)
    beh = behavior.reshape(-1).to(torch.float64)
    n = y.numel()
    logits = h @ w.t()
    if bias is not None:
        logits = logits + bias.to(torch.float64)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    lse_all = torch.logsumexp(logits, dim=-1)
    V = logits.shape[-1]
    token_loss = [None] * n
    weights = [0.0] * n
    count = 0
    for s, e in sequences_of(n, row_len, cu_seqlens):
        sup = [i for i in range(s, e) if int(y[i]) != ignore_index]
        count += len(sup)
        lr = [float(logp_all[i, int(y[i])].detach()) - float(beh[i]) for i in sup]
        lw = oracle_log_weights(
            lr, variant=variant, gamma=gamma, block_size=block_size,
            delta_clip=delta_clip, log_weight_clip=log_weight_clip,
        )
        for i, g in zip(sup, lw):
            weights[i] = math.exp(g)
            ce = -logp_all[i, int(y[i])]
            if label_smoothing:
                smooth = 0.0
                for v in range(V):  # mean over the vocabulary of -log p[v], as a loop
                    smooth = smooth - logp_all[i, v]
                ce = (1.0 - label_smoothing) * ce + label_smoothing * smooth / V
            token_loss[i] = weights[i] * ce
            if lse_square_scale:
                token_loss[i] = token_loss[i] + lse_square_scale * lse_all[i] ** 2
    zero = logits.sum() * 0.0
    per_token = torch.stack([t if t is not None else zero for t in token_loss]) if n else zero.reshape(0)
    wt = torch.tensor(weights, dtype=torch.float64)
    if reduction == "none":
        return per_token.reshape(shape), wt.reshape(shape)
    total = per_token.sum() if n else zero
    if reduction == "sum":
        return total, wt.reshape(shape)
    denom = float(num_items) if num_items is not None else float(max(count, 1))
    return total / denom, wt.reshape(shape)
