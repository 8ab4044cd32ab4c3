"""Fully fused Triton kernels: logsumexp straight from hidden and weight tiles, and a backward
that recomputes the logit tiles. No (tokens x vocab) tensor, not even a chunk of one, is ever
written to global memory.

Forward, one program per (tile of BLOCK_M supervised tokens, vocabulary split):

    for each vocab tile [v0, v0 + BLOCK_V) of the split:
        z = (sum over H tiles of h[rows, k] @ W[v, k]^T  + b[v]) / T        (fp32 accumulator)
        online logsumexp (m, s), entropy accumulator t, target logit z[y] picked by column
    partials (m, s, t, z_y) per split, merged on the host side (a few (splits x R) ops):
    lse = M + log S;  logp = z_y - lse;  entropy = lse - T / S

FLOPs: 2 H per (token, vocab) pair, like the plain matmul; bytes: W is read once per token
tile, so arithmetic intensity grows with BLOCK_M (see benchmarks/test_gpu_bench.py).

Backward, one program per (token tile, vocab tile), given lse and the per-token factor coef:

    g      = coef / T * (exp(z - lse) - onehot(y))          (BLOCK_M x BLOCK_V, recomputed z)
    dh[r] += g @ W[v]       dW[v] += g^T @ h[r]       db[v] += sum_r g

accumulated with fp32 atomics (dh over vocab tiles, dW over token tiles). This recomputes one
matmul (4 in all against 3 for the chunked path) and trades the chunk buffer for atomic
traffic: dh receives V / BLOCK_V partial sums per element. It is correct (verified in the
interpreter) but untimed on a GPU; the chunked path (cuBLAS + row kernels) stays the default
for gradients, see triton_pear.py.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_utils import fp32_matmul_uses_tf32, interpreting

__all__ = [
    "fused_lse_forward", "fused_recompute_backward", "forward_configs", "backward_configs", "vocab_splits",
]


def _cfg(bm, bv, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


INTERPRETER_CONFIG = (16, 64, 32, 4, 1)


def _arch_major() -> Optional[int]:
    """Compute capability major of the current GPU, None under the interpreter or without one."""
    if interpreting() or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()[0]


def forward_configs(major: Optional[int] = -1):
    """Autotune space of the fused forward for an arch (default: the current device).

    The tile holds an fp32 (BLOCK_M x BLOCK_V) accumulator plus the softmax temporaries of the
    same size, so register pressure, not shared memory, limits it. ptxas (via
    tests/triton_compile_check.py, bf16 with bias and entropy) reports no spills for these:
    Hopper (sm90): 128x128 with K=32 and 128x64 with K=64, 8 warps (two warpgroups on the
    wgmma), 3-4 stages (16-24 KB of bf16 operands a stage, far under 228 KB).
    Ampere (sm80): 128x64x32 at 4 warps is spill-free; 128x128x32 and 128x64x64 at 8 warps
    spill 16-24 bytes, kept for large H where the wider tile halves the reads of h.
    64-row tiles at 4 warps spilled 90-600 bytes on both and are left out.
    Interpreter (major None): one config, the smallest tile tl.dot accepts along M (16), so
    tiny test shapes run few NumPy iterations.
    """
    major = _arch_major() if major == -1 else major
    if major is None:
        return [_cfg(*INTERPRETER_CONFIG)]
    if major >= 9:
        return [_cfg(128, 128, 32, 8, 3), _cfg(128, 128, 32, 8, 4), _cfg(128, 64, 64, 8, 3),
                _cfg(128, 64, 64, 8, 4)]
    return [_cfg(128, 64, 32, 4, 4), _cfg(128, 128, 32, 8, 3), _cfg(128, 64, 64, 8, 3),
            _cfg(128, 128, 32, 8, 4)]


def backward_configs(major: Optional[int] = -1):
    """Backward tiles hold g (BLOCK_M x BLOCK_V fp32) across the H loop and issue two dots per
    K step, so K = 32: with K = 64 every 4-warp tile and the 64x128 8-warp tile spilled
    (160-1400 bytes on sm80/sm90); these four compile without spills on both archs."""
    major = _arch_major() if major == -1 else major
    if major is None:
        return [_cfg(*INTERPRETER_CONFIG)]
    return [_cfg(64, 128, 32, 8, 3), _cfg(128, 64, 32, 8, 3), _cfg(64, 64, 32, 8, 3), _cfg(64, 64, 32, 4, 3)]


@triton.jit
def _logit_tile(H_ptr, W_ptr, B_ptr, rows, r_ok, v, v_ok, Hdim, stride_h, stride_w, inv_temp,
                HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """z = (h[rows] @ W[v]^T + b[v]) / T as an fp32 (BLOCK_M, BLOCK_V) tile."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
    kk = tl.arange(0, BLOCK_K)
    v_off = v.to(tl.int64)[:, None] * stride_w  # V * H passes 2^31 for large heads
    for k0 in range(0, Hdim, BLOCK_K):
        k = k0 + kk
        k_ok = k < Hdim
        h = tl.load(H_ptr + rows[:, None] * stride_h + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W_ptr + v_off + k[None, :], mask=v_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(B_ptr + v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temp


# Keyed on the row bucket (next power of two of R) and the split count as well: a config tuned
# on a first, tiny batch must not serve every later, large one.
@triton.autotune(configs=forward_configs(), key=["Hdim", "V", "R_BUCKET", "SPLITS"], warmup=5, rep=20)
@triton.jit
def _fused_forward_kernel(
    H_ptr, W_ptr, B_ptr, ROW_ptr, Y_ptr, M_ptr, S_ptr, T_ptr, ZY_ptr,
    R, R_BUCKET, Hdim, V, SPLITS, stride_h, stride_w, inv_temp,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial softmax statistics of one token tile over one vocabulary split (flash-decoding
    style): a few hundred token tiles cannot fill 132 SMs, so the vocabulary is split too and
    the (m, s, t, z_y) partials are merged afterwards."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    r_ok = r < R
    rows = tl.load(ROW_ptr + r, mask=r_ok, other=0)
    y = tl.load(Y_ptr + r, mask=r_ok, other=0)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    t = tl.zeros((BLOCK_M,), tl.float32)
    z_y = tl.zeros((BLOCK_M,), tl.float32)
    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), SPLITS)
    v_lo = split * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(V, v_lo + tiles_per_split * BLOCK_V)
    vv = tl.arange(0, BLOCK_V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        v = v0 + vv
        v_ok = v < v_hi
        z = _logit_tile(H_ptr, W_ptr, B_ptr, rows, r_ok, v, v_ok, Hdim, stride_h, stride_w, inv_temp,
                        HAS_BIAS, UPCAST, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
        z = tl.where(v_ok[None, :], z, float("-inf"))
        z_y += tl.sum(tl.where(v[None, :] == y[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # a row's first tile: m = -inf and m_new finite, so alpha = 0 and the empty sums vanish.
        # A tile (or a whole split) of nothing but -inf logits (a -inf bias masking padded
        # vocabulary) keeps m_new = -inf: shift by 0 there, or exp(-inf - -inf) = NaN would
        # reach s and, through the merge of the splits, every row's log-prob
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        if WITH_ENTROPY:
            # e = 0 exactly where z = -inf: drop those terms (0 * -inf would be NaN)
            t = t * alpha + tl.sum(tl.where(e > 0.0, e * z, 0.0), axis=1)
        m = m_new
    out = split * R + r
    tl.store(M_ptr + out, m, mask=r_ok)
    tl.store(S_ptr + out, s, mask=r_ok)
    tl.store(ZY_ptr + out, z_y, mask=r_ok)
    if WITH_ENTROPY:
        tl.store(T_ptr + out, t, mask=r_ok)


# Tuning zeroes dH/dW/dB before every timed run (they are accumulated into); warmup/rep (ms)
# bound that cost, and the row bucket keys the choice like the forward's.
@triton.autotune(configs=backward_configs(), key=["Hdim", "V", "R_BUCKET"],
                 reset_to_zero=["DH_ptr", "DW_ptr", "DB_ptr"], warmup=5, rep=20)
@triton.jit
def _fused_backward_kernel(
    H_ptr, W_ptr, B_ptr, ROW_ptr, Y_ptr, LSE_ptr, COEF_ptr, DH_ptr, DW_ptr, DB_ptr,
    R, R_BUCKET, Hdim, V, stride_h, stride_w, inv_temp,
    HAS_BIAS: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    # programs are issued with pid 0 fastest: consecutive programs share pid 1, and without a
    # rotation every resident program would add into the same dW rows at once. Offsetting
    # the vocabulary tile by the token tile spreads their atomics over different rows.
    pid_v = (tl.program_id(1) + pid_m) % tl.num_programs(1)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    r_ok = r < R
    v_ok = v < V
    rows = tl.load(ROW_ptr + r, mask=r_ok, other=0)
    y = tl.load(Y_ptr + r, mask=r_ok, other=0)
    lse = tl.load(LSE_ptr + r, mask=r_ok, other=0.0)
    # d/dL of coef * -log softmax(L / T)[y] = coef / T * (p - onehot); masked rows get coef 0
    c = tl.load(COEF_ptr + r, mask=r_ok, other=0.0).to(tl.float32) * inv_temp
    z = _logit_tile(H_ptr, W_ptr, B_ptr, rows, r_ok, v, v_ok, Hdim, stride_h, stride_w, inv_temp,
                    HAS_BIAS, UPCAST, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
    p = tl.exp(z - lse[:, None])
    g = c[:, None] * (p - tl.where(v[None, :] == y[:, None], 1.0, 0.0))
    g = tl.where(r_ok[:, None] & v_ok[None, :], g, 0.0)
    if NEED_DB:
        # relaxed: nothing is ordered against these sums within the launch (acq_rel would
        # compile to a fenced atom instead of a fire-and-forget red)
        tl.atomic_add(DB_ptr + v, tl.sum(g, axis=0), mask=v_ok, sem="relaxed")
    if UPCAST:
        g_dot = g
    else:
        g_dot = g.to(W_ptr.dtype.element_ty)  # bf16 tensor cores on a GPU
    kk = tl.arange(0, BLOCK_K)
    v64 = v.to(tl.int64)[:, None]
    r64 = r.to(tl.int64)[:, None]
    for k0 in range(0, Hdim, BLOCK_K):
        k = k0 + kk
        k_ok = k < Hdim
        if NEED_DH:
            w = tl.load(W_ptr + v64 * stride_w + k[None, :], mask=v_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            dh = tl.dot(g_dot, w, input_precision=PRECISION)
            tl.atomic_add(DH_ptr + r64 * Hdim + k[None, :], dh, mask=r_ok[:, None] & k_ok[None, :], sem="relaxed")
        if NEED_DW:
            h = tl.load(H_ptr + rows[:, None] * stride_h + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(g_dot), h, input_precision=PRECISION)
            tl.atomic_add(DW_ptr + v64 * Hdim + k[None, :], dw, mask=v_ok[:, None] & k_ok[None, :], sem="relaxed")


def _flags(hidden: torch.Tensor):
    """(UPCAST, dot precision). fp32 operands follow torch's matmul TF32 switch, so the fused
    kernels agree with what torch.mm would do on the same tensors."""
    if interpreting():
        return True, "ieee"
    if hidden.dtype == torch.float32:
        return True, "tf32" if fp32_matmul_uses_tf32() else "ieee"
    # 16-bit operands: tensor cores with fp32 accumulation; the precision flag only concerns fp32
    # operands, so keep Triton's default for them
    return False, "tf32"


# Smallest BLOCK_M among the GPU configs (sizes the split count before autotuning picks one)
_MIN_BLOCK_M = 64
# Each vocabulary split should stream at least this many columns to amortise reading its
# token tile and writing four partials per row.
_MIN_SPLIT_COLUMNS = 4096


def vocab_splits(rows: int, vocab: int, device: torch.device) -> int:
    """Vocabulary splits of the fused forward: about two programs per SM in all."""
    if interpreting() or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_tiles = triton.cdiv(max(rows, 1), _MIN_BLOCK_M)
    return int(max(1, min(triton.cdiv(2 * sms, row_tiles), vocab // _MIN_SPLIT_COLUMNS)))


def fused_lse_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    row_index: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
    with_entropy: bool = False, v_splits: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(logp, lse, entropy or None), (R,) float32, for tokens hidden[row_index] -> labels.

    The partials of the vocabulary splits merge as in a logsumexp of logsumexps:
        M = max_k m_k,  S = sum_k s_k e^(m_k - M),  lse = M + log S,
        E_p[z] = sum_k t_k e^(m_k - M) / S,  z_y = sum_k z_y,k (only y's split is nonzero).
    """
    R = row_index.numel()
    Hdim, V = hidden.shape[1], weight.shape[0]
    dev = hidden.device
    if R == 0:
        empty = torch.empty(0, dtype=torch.float32, device=dev)
        return empty, empty.clone(), (empty.clone() if with_entropy else None)
    assert hidden.stride(1) == 1 and weight.stride(1) == 1
    splits = int(v_splits) if v_splits is not None else vocab_splits(R, V, dev)
    part = torch.empty((4, splits, R), dtype=torch.float32, device=dev)
    m_p, s_p, t_p, zy_p = part.unbind(0)
    upcast, precision = _flags(hidden)
    grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]), splits)  # noqa: E731
    _fused_forward_kernel[grid](
        hidden, weight, bias if bias is not None else weight, row_index, labels, m_p, s_p, t_p, zy_p,
        R, triton.next_power_of_2(R), Hdim, V, splits, hidden.stride(0), weight.stride(0), 1.0 / temperature,
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, UPCAST=upcast, PRECISION=precision,
    )
    if splits == 1:
        m, s, zy = m_p[0], s_p[0], zy_p[0]
        lse = m + torch.log(s)
        ent = lse - t_p[0] / s if with_entropy else None
        return zy - lse, lse, ent
    m = m_p.amax(dim=0)
    scale = torch.exp(m_p - m)  # empty splits: m_k = -inf -> 0
    s = (s_p * scale).sum(dim=0)
    lse = m + torch.log(s)
    ent = lse - (t_p * scale).sum(dim=0) / s if with_entropy else None
    return zy_p.sum(dim=0) - lse, lse, ent


def fused_recompute_backward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    row_index: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
    need: Tuple[bool, bool, bool], temperature: float = 1.0,
):
    """fp32 (dh_compact (R, H) or None, dW (V, H) or None, db (V,) or None)."""
    R = row_index.numel()
    Hdim, V = hidden.shape[1], weight.shape[0]
    dev = hidden.device
    need_db = need[2] and bias is not None
    dh = torch.zeros((R, Hdim), dtype=torch.float32, device=dev) if need[0] else None
    dw = torch.zeros((V, Hdim), dtype=torch.float32, device=dev) if need[1] else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_db else None
    if R == 0 or not (need[0] or need[1] or need_db):
        return dh, dw, db
    upcast, precision = _flags(hidden)
    # absent outputs get their own scratch: autotuning zeroes every DH/DW/DB argument
    dummy = lambda: torch.zeros(1, dtype=torch.float32, device=dev)  # noqa: E731
    grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]), triton.cdiv(V, meta["BLOCK_V"]))  # noqa: E731
    _fused_backward_kernel[grid](
        hidden, weight, bias if bias is not None else weight, row_index, labels, lse, coef,
        dh if dh is not None else dummy(), dw if dw is not None else dummy(),
        db if db is not None else dummy(),
        R, triton.next_power_of_2(R), Hdim, V, hidden.stride(0), weight.stride(0), 1.0 / temperature,
        HAS_BIAS=bias is not None, NEED_DH=need[0], NEED_DW=need[1], NEED_DB=need_db,
        UPCAST=upcast, PRECISION=precision,
    )
    return dh, dw, db
