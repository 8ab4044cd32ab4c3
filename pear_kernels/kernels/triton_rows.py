"""Triton row kernels over a chunk of logits: softmax statistics, then weighted dlogits in place.

The chunk ``L`` (rows x V, float32, the raw logits h W^T + b of ``rows`` supervised tokens)
is produced by a cuBLAS matmul; these kernels replace the torch row code of torch_chunked.
One program per row streams the vocabulary in tiles of BLOCK_V columns, so a row never has to
fit in registers (V = 152k works with a 2-4k tile).

Pass 1, ``row_stats``: online logsumexp of z = L / temperature over the tiles

    m' = max(m, max tile z);  s' = s * exp(m - m') + sum exp(z - m')
    t' = t * exp(m - m') + sum exp(z - m') * z          (only for the entropy)

then lse = m + log s, logp = z[y] - lse, entropy = lse - t / s  (H = lse - sum_v p_v z_v).

Pass 2, ``row_dlogits_``: given lse and the per-token factor coef_t (= w_t * grad_scale for
the PEAR loss, -dL/dlogp_t for the log-prob op), overwrite L with

    dloss/dL = coef_t / temperature * (softmax(z) - onehot(y))

(the 1/temperature is the chain rule through z = L / T). The weights are only known after
the scan over the whole chunk, hence two passes and not one.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_utils import ROW_WARPS, interpreting, next_pow2

__all__ = ["row_stats", "row_dlogits_", "vocab_tile", "online_lse_tile"]

# Largest vocabulary tile: 2048 fp32 per row program is 16 registers per thread at 4 warps;
# larger tiles spill, smaller ones issue more loop iterations for a 152k vocabulary.
MAX_BLOCK_V = 2048
# Under the interpreter every tile costs NumPy overhead but no registers: one tile per row.
INTERPRET_MAX_BLOCK_V = 4096


def vocab_tile(vocab_size: int) -> int:
    cap = INTERPRET_MAX_BLOCK_V if interpreting() else MAX_BLOCK_V
    return min(cap, next_pow2(vocab_size))


@triton.jit
def online_lse_tile(z, m, s, t, WITH_ENTROPY: tl.constexpr):
    """One vocabulary tile of a row's online logsumexp: the running max m, the running sum
    s = sum exp(z - m) and, with WITH_ENTROPY, t = sum exp(z - m) z, rescaled to the new max.
    Returns (m, s, t); after the last tile lse = m + log s and the entropy is lse - t / s."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    # a tile of nothing but -inf (a -inf bias masking padded vocabulary) keeps m = -inf:
    # shift by 0 then, or exp(-inf - -inf) = NaN would poison s
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    e = tl.exp(z - m_safe)
    s = s * alpha + tl.sum(e, axis=0)
    if WITH_ENTROPY:
        # e = 0 exactly where z = -inf (masked columns, -inf logits): 0 * -inf is NaN, so
        # those terms are dropped instead of multiplied
        t = t * alpha + tl.sum(tl.where(e > 0.0, e * z, 0.0), axis=0)
    return m_new, s, t


@triton.jit
def _row_stats_kernel(
    L_ptr, stride_l, Y_ptr, LOGP_ptr, LSE_ptr, ENT_ptr,
    V, inv_temp,
    BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = L_ptr + row * stride_l
    y = tl.load(Y_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        z = tl.load(base + c, mask=c < V, other=float("-inf")).to(tl.float32) * inv_temp
        m, s, t = online_lse_tile(z, m, s, t, WITH_ENTROPY)
    lse = m + tl.log(s)
    z_y = tl.load(base + y).to(tl.float32) * inv_temp
    tl.store(LOGP_ptr + row, z_y - lse)
    tl.store(LSE_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(ENT_ptr + row, lse - t / s)


@triton.jit
def _row_dlogits_kernel(
    L_ptr, stride_l, Y_ptr, LSE_ptr, COEF_ptr,
    V, inv_temp,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = L_ptr + row * stride_l
    y = tl.load(Y_ptr + row)
    lse = tl.load(LSE_ptr + row)
    # d/dL of coef * -log softmax(L / T)[y] = coef / T * (p - onehot)
    c_row = tl.load(COEF_ptr + row).to(tl.float32) * inv_temp
    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        inside = c < V
        z = tl.load(base + c, mask=inside, other=0.0).to(tl.float32) * inv_temp
        p = tl.exp(z - lse)
        g = c_row * (p - tl.where(c == y, 1.0, 0.0))
        tl.store(base + c, g.to(L_ptr.dtype.element_ty), mask=inside)


def row_stats(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(logp, lse, entropy or None), each (rows,) float32, of a (rows, V) logits chunk."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    logp = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if with_entropy else lse  # dummy pointer when unused
    if rows:
        _row_stats_kernel[(rows,)](
            logits, logits.stride(0), labels, logp, lse, ent,
            vocab, 1.0 / temperature,
            BLOCK_V=vocab_tile(vocab), WITH_ENTROPY=with_entropy, num_warps=ROW_WARPS,
        )
    return logp, lse, (ent if with_entropy else None)


def row_dlogits_(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """In place: logits <- coef / T * (softmax(logits / T) - onehot(labels)). Returns logits."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    if rows:
        _row_dlogits_kernel[(rows,)](
            logits, logits.stride(0), labels, lse, coef,
            vocab, 1.0 / temperature,
            BLOCK_V=vocab_tile(vocab), num_warps=ROW_WARPS,
        )
    return logits
