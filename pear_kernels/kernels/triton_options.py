"""Triton backend for the loss options (softcap, z-loss, label smoothing, return_lse).

Two row kernels over a cuBLAS chunk of raw logits r = h W^T + b (rows x V, fp32), the same
shape of work as triton_rows but with the options' math; the chunk loop is triton_pear's
chunked path (the fused kernels do not take the options, so a problem with options always
runs chunked, through ``chunk_driver`` with ``TritonOptionKernels`` as the row math). Per token, with z = cap(r) / T, cap(r) = c tanh(r / c) (identity without a
softcap), p = softmax(z), lse = logsumexp(z), eps the smoothing, s_z the z-loss scale:

    token_ce = (1 - eps) (lse - z_y) + eps (lse - mean_v z_v)        (weighted by w)
    z_loss   = s_z lse^2                                             (unweighted)

Pass 1, ``option_row_stats``: online logsumexp over vocabulary tiles of the capped z, the sum
of z (for the mean) and, for the entropy, sum exp(z - m) z; returns logp, lse, mean, entropy.

Pass 2, ``option_row_dlogits_``: overwrites the raw logits with d loss / d r,

    d/dz = f p - t onehot(y) - u          f = coef + 2 s_z lse ucoef,  t = coef (1 - eps),
                                          u = coef eps / V
    d/dr = d/dz * (1 - tanh^2(r / c)) / T        (as 4 e / (1 + e)^2, e = exp(-2 |r / c|))

where coef = w * dL/dloss_t (PEAR-weighted part) and ucoef = dL/dloss_t (the z-loss is not
weighted). The capped z and its derivative are recomputed from r in pass 2, so no (rows x V)
derivative buffer is kept (the PyTorch path keeps one).

tanh is written with tl.exp (the interpreter has no libdevice): sign(x) (1 - e) / (1 + e),
e = exp(-2|x|) (never overflows), and its odd Taylor polynomial below |x| = 1/16, where
1 - e would cancel (the x^9 term is below 1e-11 relative there).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import chunk_driver
from .backend import ForwardResult, Grads, PEARProblem
from .chunk_driver import ChunkStats
from .triton_chunked import TritonKernels, contiguous_problem
from .triton_rows import online_lse_tile, vocab_tile
from .triton_utils import ROW_WARPS

__all__ = ["option_row_stats", "option_row_dlogits_", "TritonOptionKernels", "forward", "backward",
           "token_logprobs"]

@triton.jit
def _tanh(x):
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    # tanh x = x - x^3/3 + 2x^5/15 - 17x^7/315 + ...
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(ax < 0.0625, small, big)  # 1/16: see the module docstring
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _sech2(x):
    # 1 - tanh^2 = 4 e / (1 + e)^2, e = exp(-2|x|): relatively accurate where tanh saturates
    # (1 - t^2 of a rounded t is 0 in float from |x| ~ 9 on, and coarse from ~4)
    e = tl.exp(-2.0 * tl.abs(x))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _capped(r, inv_temp, cap, inv_cap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        return cap * _tanh(r * inv_cap) * inv_temp
    else:
        return r * inv_temp


@triton.jit
def _option_stats_kernel(
    L_ptr, stride_l, Y_ptr, LOGP_ptr, LSE_ptr, MEAN_ptr, ENT_ptr,
    V, inv_temp, cap, inv_cap,
    BLOCK_V: tl.constexpr, SOFTCAP: tl.constexpr, WITH_MEAN: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = L_ptr + row * stride_l
    y = tl.load(Y_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    total = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        inside = c < V
        r = tl.load(base + c, mask=inside, other=0.0).to(tl.float32)
        # the mask is applied after the cap: tanh of a padding value would give a finite -c
        z = tl.where(inside, _capped(r, inv_temp, cap, inv_cap, SOFTCAP), float("-inf"))
        m, s, t = online_lse_tile(z, m, s, t, WITH_ENTROPY)
        if WITH_MEAN:
            total += tl.sum(tl.where(inside, z, 0.0), axis=0)
    lse = m + tl.log(s)
    z_y = _capped(tl.load(base + y).to(tl.float32), inv_temp, cap, inv_cap, SOFTCAP)
    tl.store(LOGP_ptr + row, z_y - lse)
    tl.store(LSE_ptr + row, lse)
    if WITH_MEAN:
        tl.store(MEAN_ptr + row, total / V)
    if WITH_ENTROPY:
        tl.store(ENT_ptr + row, lse - t / s)


@triton.jit
def _option_dlogits_kernel(
    L_ptr, stride_l, Y_ptr, LSE_ptr, F_ptr, T_ptr, U_ptr,
    V, inv_temp, cap, inv_cap,
    BLOCK_V: tl.constexpr, SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = L_ptr + row * stride_l
    y = tl.load(Y_ptr + row)
    lse = tl.load(LSE_ptr + row)
    f = tl.load(F_ptr + row).to(tl.float32)
    tg = tl.load(T_ptr + row).to(tl.float32)
    u = tl.load(U_ptr + row).to(tl.float32)
    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        inside = c < V
        r = tl.load(base + c, mask=inside, other=0.0).to(tl.float32)
        if SOFTCAP:
            x = r * inv_cap
            z = cap * _tanh(x) * inv_temp
            dz_dr = _sech2(x) * inv_temp
        else:
            z = r * inv_temp
            dz_dr = inv_temp
        p = tl.exp(z - lse)
        g = (f * p - u - tl.where(c == y, tg, 0.0)) * dz_dr
        tl.store(base + c, g.to(L_ptr.dtype.element_ty), mask=inside)


def _cap_args(softcap: Optional[float]) -> Tuple[float, float]:
    return (float(softcap), 1.0 / float(softcap)) if softcap is not None else (1.0, 1.0)


def option_row_stats(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, softcap: Optional[float],
    with_mean: bool = False, with_entropy: bool = False,
):
    """(logp, lse, mean z or None, entropy or None), each (rows,) float32, of a raw logits chunk."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    logp = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    mean = torch.empty_like(logp) if with_mean else lse  # dummy pointers when unused
    ent = torch.empty_like(logp) if with_entropy else lse
    cap, inv_cap = _cap_args(softcap)
    if rows:
        _option_stats_kernel[(rows,)](
            logits, logits.stride(0), labels, logp, lse, mean, ent,
            vocab, 1.0 / temperature, cap, inv_cap,
            BLOCK_V=vocab_tile(vocab), SOFTCAP=softcap is not None, WITH_MEAN=with_mean,
            WITH_ENTROPY=with_entropy, num_warps=ROW_WARPS,
        )
    return logp, lse, (mean if with_mean else None), (ent if with_entropy else None)


def option_row_dlogits_(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, f: torch.Tensor, t: torch.Tensor,
    u: torch.Tensor, temperature: float, softcap: Optional[float],
) -> torch.Tensor:
    """In place: raw logits <- d loss / d r for per-row factors f, t, u (module docstring)."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    cap, inv_cap = _cap_args(softcap)
    if rows:
        _option_dlogits_kernel[(rows,)](
            logits, logits.stride(0), labels, lse,
            f.to(torch.float32).contiguous(), t.to(torch.float32).contiguous(), u.to(torch.float32).contiguous(),
            vocab, 1.0 / temperature, cap, inv_cap,
            BLOCK_V=vocab_tile(vocab), SOFTCAP=softcap is not None, num_warps=ROW_WARPS,
        )
    return logits


def _factors(problem: PEARProblem, coef: torch.Tensor, ucoef: torch.Tensor, lse: torch.Tensor):
    """(f, t, u) of option_row_dlogits_ from the weighted and unweighted per-token factors."""
    o = problem.options
    eps = o.label_smoothing
    f = coef + ucoef * (2.0 * o.lse_square_scale) * lse if o.lse_square_scale else coef
    t = coef * (1.0 - eps) if eps else coef
    u = coef * (eps / problem.vocab_size) if eps else torch.zeros_like(coef)
    return f, t, u


def _kernels(problem: PEARProblem) -> "TritonOptionKernels":
    return TritonOptionKernels(contiguous_problem(problem))


class TritonOptionKernels(TritonKernels):
    """``chunk_driver.ChunkKernels`` with the option row kernels above; logits, scan, sink and
    fp16 post-scaling are TritonKernels'."""

    def stats(self, z, y) -> ChunkStats:
        o = self.problem.options
        logp, lse, mean, _ = option_row_stats(z, y, self.problem.temperature, o.softcap,
                                              with_mean=bool(o.label_smoothing))
        return ChunkStats(logp, lse, mean, lse)

    def logp_entropy(self, z, y):
        logp, _, _, ent = option_row_stats(z, y, self.problem.temperature, self.problem.options.softcap,
                                           with_entropy=True)
        return logp, ent

    def dlogits_(self, z, y, st: ChunkStats, coef, ucoef):
        coef = coef.to(torch.float32)
        ucoef = ucoef.to(torch.float32) if ucoef is not None else torch.zeros_like(coef)
        f, t, u = _factors(self.problem, coef, ucoef, st.lse)
        return option_row_dlogits_(z, y, st.lse, f, t, u, self.problem.temperature, self.problem.options.softcap)


def token_logprobs(problem: PEARProblem, with_entropy: bool = False):
    """(M,) float32 log-probs (and entropies) of the capped, tempered logits, chunk by chunk."""
    return chunk_driver.token_logprobs(problem, _kernels(problem), with_entropy)


def forward(problem: PEARProblem, grad_scale: Optional[float] = None,
            need: Tuple[bool, bool, bool] = (False, False, False)) -> ForwardResult:
    """Log-probs, weights, the token cross-entropy (smoothed), z-loss and lse per token, and
    with grad_scale the gradients."""
    return chunk_driver.forward(problem, _kernels(problem), grad_scale, need)


def backward(problem: PEARProblem, coef: torch.Tensor, need: Tuple[bool, bool, bool],
             ucoef: Optional[torch.Tensor] = None) -> Grads:
    """Recompute pass for per-token factors coef (= w dL/dloss_t) and ucoef (= dL/dloss_t,
    the unweighted z-loss factor; zeros when None)."""
    return chunk_driver.backward(problem, _kernels(problem), coef, need, ucoef)
