"""Triton PEAR scan: per-decision clip, segmented suffix sums with a carry, log-weights.

The Triton twin of ``weights.fill_suffix_sums`` + ``weights.log_weights_for_range`` (the
weight math of record lives in weights.py; this re-implements it for the GPU and is tested
against the reference loss). It works on the compact supervised tokens [start, end) of one
chunk; chunks are visited from the end of the batch, so everything after ``end`` is final.

``pear_scan`` (one program, the chunk in one tile):

    d_i    = clip(logp_i - logp_beta_i, delta_lo, delta_hi)                       (float64)
    incl_i = sum_{j >= i, same sequence, j < end} d_j  +  [seq continues past end] * incl[end]

The chunk is loaded back to front (k = end - 1 - i), which turns the suffix sum into a
forward segmented prefix sum; a segment starts at the last supervised token of each sequence
(seq_end_i == i + 1). Combine of (value, starts-a-segment) pairs, a to the left of b:

    (va, fa) + (vb, fb) = (vb if fb else va + vb, fa or fb)

which is associative, so tl.associative_scan applies. Tokens whose sequence runs past the
chunk (seq_end_i > end) belong to the first segment in scan order and add the carry incl[end]
that the previous (later) chunk left behind; that is how one sequence spans chunks, and
packed rows need nothing more than their seq_end (cu_seqlens become segment boundaries).

``pear_log_weights`` (tiled over the chunk), per variant, with n_after_i = T - t:

    token:    log G_i = n_after_i log(gamma) + incl_{i+1}   (0 when i ends its sequence)
    block:    log G_i = n_after_e log(gamma) + incl_{e+1},  e = last token of i's block
              (= the token weight at e: the discounted sum of the block sums rho_m, m > k;
              e may lie in a later chunk, whose incl/d are already final)
    sequence: log G_i = incl at the sequence's first token (needs the whole sequence scanned)
    none:     0
    log w_i = clip(log G_i, logw_lo, logw_hi);  coef_i = exp(log w_i) * scale

A separate launch reads incl at other tokens' indices, which a single program could only do
after a block-wide barrier; the second launch makes the ordering explicit and costs ~5 us.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..config import PEARConfig, Variant
from ..importance import SequenceLayout
from .triton_utils import next_pow2

__all__ = ["pear_scan_", "pear_log_weights", "scan_params", "VARIANT_CODES"]

VARIANT_CODES = {Variant.NONE: 0, Variant.TOKEN: 1, Variant.BLOCK: 2, Variant.SEQUENCE: 3}
# Elementwise tile of the weight kernel: 1024 fp64 over 4 warps is 8 per thread.
WEIGHT_BLOCK = 1024


@triton.jit
def _segmented_add(va, fa, vb, fb):
    # flags are int32 (0/1), not i1: scans over 1-bit tuples are a rarely exercised codegen path
    return tl.where(fb != 0, vb, va + vb), fa | fb


# start/end change with every chunk: no value specialisation (and no recompile) on them
@triton.jit(do_not_specialize=["start", "end", "M"])
def _pear_scan_kernel(
    LOGP_ptr, BEH_ptr, SEQ_END_ptr, D_ptr, INCL_ptr, PARAMS_ptr,
    start, end, M,
    BLOCK: tl.constexpr,
):
    k = tl.arange(0, BLOCK)
    n = end - start
    valid = k < n
    i = end - 1 - k  # back to front
    i_safe = tl.where(valid, i, start)
    logp = tl.load(LOGP_ptr + (i_safe - start), mask=valid, other=0.0).to(tl.float64)
    beh = tl.load(BEH_ptr + i_safe, mask=valid, other=0.0).to(tl.float64)
    delta_lo = tl.load(PARAMS_ptr + 0)
    delta_hi = tl.load(PARAMS_ptr + 1)
    d = tl.minimum(tl.maximum(logp - beh, delta_lo), delta_hi)
    d = tl.where(valid, d, 0.0)
    seq_end = tl.load(SEQ_END_ptr + i_safe, mask=valid, other=0)
    starts = ((seq_end == i_safe + 1) & valid).to(tl.int32)
    suffix, _ = tl.associative_scan((d, starts), 0, _segmented_add)
    carry_ok = end < M
    carry = tl.load(INCL_ptr + end, mask=carry_ok, other=0.0)
    suffix = tl.where(seq_end > end, suffix + carry, suffix)
    tl.store(D_ptr + i_safe, d, mask=valid)
    tl.store(INCL_ptr + i_safe, suffix, mask=valid)


@triton.jit(do_not_specialize=["start", "end"])
def _pear_weights_kernel(
    D_ptr, INCL_ptr, N_AFTER_ptr, BLOCK_END_ptr, SEQ_START_ptr, SEQ_END_ptr,
    LOGW_RAW_ptr, COEF_ptr, PARAMS_ptr,
    start, end, M, scale,
    VARIANT: tl.constexpr, WRITE_COEF: tl.constexpr, BLOCK: tl.constexpr,
):
    i = start + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = i < end
    log_gamma = tl.load(PARAMS_ptr + 2)
    logw_lo = tl.load(PARAMS_ptr + 3)
    logw_hi = tl.load(PARAMS_ptr + 4)
    if VARIANT == 0:
        log_g = tl.zeros((BLOCK,), tl.float64)
    elif VARIANT == 3:
        first = tl.load(SEQ_START_ptr + i, mask=valid, other=0)
        log_g = tl.load(INCL_ptr + first, mask=valid, other=0.0)
    else:
        if VARIANT == 2:
            e = tl.load(BLOCK_END_ptr + i, mask=valid, other=0)
        else:
            e = i
        n_after = tl.load(N_AFTER_ptr + e, mask=valid, other=0).to(tl.float64)
        # the sum strictly after e, read at e + 1 (never incl_e - d_e: with an unbounded
        # delta clip an infinite d_e would give inf - inf = NaN)
        seq_end = tl.load(SEQ_END_ptr + e, mask=valid, other=0)
        has_next = valid & (e + 1 < seq_end)
        after = tl.load(INCL_ptr + tl.minimum(e + 1, M - 1), mask=has_next, other=0.0)
        log_g = n_after * log_gamma + tl.where(has_next, after, 0.0)
    tl.store(LOGW_RAW_ptr + i, log_g, mask=valid)
    if WRITE_COEF:
        log_w = tl.minimum(tl.maximum(log_g, logw_lo), logw_hi)
        coef = tl.exp(log_w.to(tl.float32)) * scale
        tl.store(COEF_ptr + (i - start), coef, mask=valid)


# Tokens per scan program. An (fp64, int32) pair per token: ptxas reports no spills up to
# 4096 tokens at 8 warps, and spills at 8192 even with 16 warps, so longer ranges are scanned
# in pieces from their end, joined by the same carry that joins chunks.
MAX_SCAN_BLOCK = 4096


def _scan_warps(n: int) -> int:
    return 4 if n <= 2048 else 8


@functools.lru_cache(maxsize=64)
def scan_params(config: PEARConfig, device) -> torch.Tensor:
    """The float constants of the scan as a float64 tensor: scalar kernel arguments would be
    rounded to fp32 (0.3, log 0.999), and the weights must match weights.py to ~1e-15."""
    return torch.tensor(
        [*config.delta_clip, config.log_gamma, *config.log_weight_clip], dtype=torch.float64, device=device
    )


def pear_scan_(
    logp_chunk: torch.Tensor, behavior: torch.Tensor, layout: SequenceLayout,
    config: PEARConfig, d: torch.Tensor, incl: torch.Tensor, start: int, end: int,
) -> None:
    """Fill d[start:end] and incl[start:end] (float64, length M) from the chunk's log-probs.

    ``behavior`` is the (M,) compact behavior log-probs; incl[end] (if end < M) must be final.
    """
    params = scan_params(config, d.device)
    hi = end
    while hi > start:
        lo = max(start, hi - MAX_SCAN_BLOCK)
        _pear_scan_kernel[(1,)](
            logp_chunk[lo - start:], behavior, layout.seq_end, d, incl, params,
            lo, hi, d.numel(),
            BLOCK=next_pow2(hi - lo), num_warps=_scan_warps(hi - lo),
        )
        hi = lo


def pear_log_weights(
    d: torch.Tensor, incl: torch.Tensor, layout: SequenceLayout, config: PEARConfig,
    start: int, end: int, log_w_raw: torch.Tensor, coef_scale=None,
):
    """Write unclipped log G into log_w_raw[start:end]; with ``coef_scale`` also return the
    (end - start,) float32 coef = exp(clipped log G) * coef_scale."""
    if end <= start:
        return torch.empty(0, dtype=torch.float32, device=d.device) if coef_scale is not None else None
    coef = (
        torch.empty(end - start, dtype=torch.float32, device=d.device)
        if coef_scale is not None else log_w_raw
    )
    block = min(WEIGHT_BLOCK, next_pow2(end - start))
    _pear_weights_kernel[(triton.cdiv(end - start, block),)](
        d, incl, layout.n_after, layout.block_end, layout.seq_start, layout.seq_end,
        log_w_raw, coef, scan_params(config, d.device),
        start, end, d.numel(), float(coef_scale or 0.0),
        VARIANT=VARIANT_CODES[config.variant], WRITE_COEF=coef_scale is not None,
        BLOCK=block, num_warps=4,
    )
    return coef if coef_scale is not None else None
