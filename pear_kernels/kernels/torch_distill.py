"""Chunked PyTorch kernels of PEAR-weighted distillation from stored teacher top-k log-probs.

Per supervised token t: the teacher stored its K most likely ids v_1..v_K with log-probs
log q_k (the sampling distribution's, see transformers/sampling.py); the student has logits z
(divided by the temperature) and p = softmax(z), s = log p. The token loss is

    L_t = (1 - lam) KL_t + lam (-s_y)                      lam = hard_weight, y the sampled token

with the forward KL from the teacher's top-k distribution to the student, the mass outside the
top-k treated one of two ways (``tail``):

    "renormalize":  q~_k = q_k / sum_j q_j      KL = sum_k q~_k (log q~_k - s_{v_k})
        dKL/dz = p - scatter(q~)                (sum q~ = 1)
    "bucket":       the rest of the mass is one outcome: r = 1 - sum_k q_k, P = sum_k p_{v_k}
        KL = sum_k q_k (log q_k - s_{v_k}) + r (log r - log(1 - P))
        dKL/dz_u = Q p_u - scatter(q)_u + r p_u ([u in top-k] - P) / (1 - P),   Q = sum_k q_k

and each token weighted by its PEAR weight w_t (from the sampled token's log-ratio, exactly as
the SFT loss, detached): loss = sum_t w_t L_t / normaliser. Teacher entries with log q = -inf
carry no mass (0 log 0 = 0). The weight is folded into dlogits before dW is summed, so the
token and block variants keep the SFT loss's single pass of 3 matmuls per chunk; the sequence
variant takes its log-prob pre-pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..config import Variant
from ..weights import clip_log_weights, scan_chunk
from .problem import ForwardResult, Grads, PEARProblem, chunks_from_end
from .torch_chunked import _GradSink, _LogitsBuffer, _token_rows, _work_dtype, token_logprobs

__all__ = ["DistillTargets", "forward", "backward"]

# 1 - P (the student's mass outside the teacher's top-k) is floored here in the "bucket" tail:
# log(1 - P) and r / (1 - P) stay finite when the student puts (almost) all its mass on the top-k.
_MIN_REST = 1e-12


@dataclass
class DistillTargets:
    ids: torch.Tensor  # (M, K) int64, compact (supervised tokens only)
    logq: torch.Tensor  # (M, K) float64 teacher log-probs, -inf allowed
    tail: str  # "renormalize" or "bucket"
    hard_weight: float


def _teacher_terms(t: DistillTargets, start: int, end: int, dtype):
    """(q (rows, K) used by the gradient, r (rows,) bucket mass or None, constant part of KL)."""
    logq = t.logq[start:end]
    q = torch.exp(logq)  # -inf -> 0
    qlogq = torch.where(q > 0, q * logq, torch.zeros_like(q))
    if t.tail == "renormalize":
        total = q.sum(dim=1, keepdim=True)
        qn = q / total
        # sum q~ log q~ = (sum q log q) / Q - log Q
        const = qlogq.sum(dim=1) / total.squeeze(1) - torch.log(total.squeeze(1))
        return qn.to(dtype), None, const
    r = (1.0 - q.sum(dim=1)).clamp(min=0.0)
    const = qlogq.sum(dim=1) + torch.where(r > 0, r * torch.log(r.clamp(min=1e-300)), torch.zeros_like(r))
    return q.to(dtype), r, const


def _chunk(problem: PEARProblem, targets: DistillTargets, buffer: _LogitsBuffer, start: int, end: int):
    """Logits of compact tokens [start, end): (p (rows, V) in the buffer, s_y, s at top-k ids,
    the per-token distillation loss L_t without the weight, teacher q, r, P)."""
    layout = problem.layout
    h_c = problem.hidden[_token_rows(problem, start, end)]
    y = problem.labels[layout.sup_index[start:end]]
    z = buffer.logits(h_c)
    ids = targets.ids[start:end]
    m = z.amax(dim=1, keepdim=True)
    z.sub_(m)
    z.clamp_(min=torch.finfo(z.dtype).min)  # -inf logits: p = 0
    s_top = z.gather(1, ids)
    s_y = z.gather(1, y[:, None]).squeeze(1)
    z.exp_()
    tot = z.sum(dim=1)
    log_tot = torch.log(tot)
    s_top = s_top - log_tot[:, None]
    s_y = s_y - log_tot
    z.div_(tot[:, None])  # p
    q, r, const = _teacher_terms(targets, start, end, z.dtype)
    if targets.tail == "renormalize":
        kl = const - (q.to(torch.float64) * s_top.to(torch.float64)).sum(dim=1)
        P = None
    else:
        P = torch.exp(s_top).sum(dim=1).clamp(max=1.0)
        rest = (1.0 - P).clamp(min=_MIN_REST)
        kl = const - (q.to(torch.float64) * s_top.to(torch.float64)).sum(dim=1) - (r * torch.log(rest.to(torch.float64)))
        P = P.to(z.dtype)
    lam = targets.hard_weight
    loss_t = (1.0 - lam) * kl + lam * (-s_y.to(torch.float64))
    return h_c, y, z, s_y, loss_t, q, r, P


def _dlogits_(p: torch.Tensor, y, ids, q, r, P, coef: torch.Tensor, targets: DistillTargets) -> torch.Tensor:
    """In place: p -> coef * dL/dz (coef already holds w * grad_scale / temperature)."""
    lam = targets.hard_weight
    c_kl = coef * (1.0 - lam)
    if targets.tail == "renormalize":
        factor = c_kl + lam * coef  # p's coefficient: sum q~ = 1 for the KL, 1 for the NLL
        extra_top = None
    else:
        Q = q.sum(dim=1)
        rest = (1.0 - P).clamp(min=_MIN_REST)
        rr = (r.to(p.dtype) / rest)
        factor = c_kl * (Q - rr * P) + lam * coef
        extra_top = c_kl * rr  # + r / (1 - P) p_u on the top-k columns
    if extra_top is not None:
        p_top = p.gather(1, ids)
    p.mul_(factor[:, None])
    p.scatter_add_(1, ids, -(c_kl[:, None] * q))
    if extra_top is not None:
        p.scatter_add_(1, ids, extra_top[:, None] * p_top)
    if lam:
        p.scatter_add_(1, y[:, None], -(lam * coef)[:, None])
    return p


def forward(problem: PEARProblem, targets: DistillTargets, grad_scale: Optional[float] = None,
            need: Tuple[bool, bool, bool] = (False, False, False)) -> ForwardResult:
    """Log-probs of the sampled tokens, PEAR weights, the weighted loss sum (token_ce holds the
    per-token distillation loss L_t) and, with grad_scale, the gradients."""
    layout, config = problem.layout, problem.config
    m = layout.num_supervised
    device = problem.hidden.device
    rows = problem.rows()
    behavior = problem.behavior_logprobs[layout.sup_index].to(torch.float64)
    want = grad_scale is not None and any(need)
    buffer = _LogitsBuffer(problem)
    sink = _GradSink(problem, need, buffer.weight) if want else None
    logp_all = torch.empty(m, dtype=_work_dtype(problem.hidden.dtype), device=device)
    loss_tok = torch.empty(m, dtype=torch.float64, device=device)
    d = torch.empty(m, dtype=torch.float64, device=device)
    incl = torch.empty(m, dtype=torch.float64, device=device)
    log_w_raw = torch.empty(m, dtype=torch.float64, device=device)
    weights_known = config.variant is Variant.SEQUENCE and m > rows
    if weights_known:  # the sequence weight needs every log-prob of the sequence first
        logp_all = token_logprobs(problem, buffer=buffer)
        log_w_raw = scan_chunk(logp_all.to(torch.float64) - behavior, d, incl, layout, config, 0, m)
    for start, end in chunks_from_end(m, rows):
        h_c, y, p, s_y, loss_t, q, r, P = _chunk(problem, targets, buffer, start, end)
        loss_tok[start:end] = loss_t
        if not weights_known:
            logp_all[start:end] = s_y
            log_w_raw[start:end] = scan_chunk(s_y.to(torch.float64) - behavior[start:end], d, incl, layout,
                                              config, start, end)
        if sink is not None:
            w = clip_log_weights(log_w_raw[start:end], config).exp()
            coef = (w * (grad_scale / problem.temperature)).to(p.dtype)
            sink.add(_dlogits_(p, y, targets.ids[start:end], q, r, P, coef, targets), h_c,
                     _token_rows(problem, start, end))
    log_w = clip_log_weights(log_w_raw, config)
    return ForwardResult(
        logp=logp_all, log_ratio=logp_all.to(torch.float64) - behavior, log_w_raw=log_w_raw, log_w=log_w,
        loss_sum=(log_w.exp() * loss_tok).sum(), grads=sink.result() if sink else None, token_ce=loss_tok,
    )


def backward(problem: PEARProblem, targets: DistillTargets, coef: torch.Tensor, need) -> Grads:
    """Recompute pass for per-token factors coef (M,) = w * grad_output."""
    buffer = _LogitsBuffer(problem)
    sink = _GradSink(problem, need, buffer.weight)
    for start, end in chunks_from_end(problem.layout.num_supervised, problem.rows()):
        h_c, y, p, _, _, q, r, P = _chunk(problem, targets, buffer, start, end)
        c = (coef[start:end] / problem.temperature).to(p.dtype)
        sink.add(_dlogits_(p, y, targets.ids[start:end], q, r, P, c, targets), h_c, _token_rows(problem, start, end))
    return sink.result()
