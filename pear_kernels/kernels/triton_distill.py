"""Triton row kernels of the top-k distillation loss over a chunk of logits.

The chunk ``L`` (rows x V, float32 tempered logits of ``rows`` supervised tokens) comes from
the chunked path's matmul (kernels/torch_distill.py owns the chunk loop, the weight scan and
the K-sized per-token math); these two kernels replace its row work. One program per row
streams the vocabulary in tiles of BLOCK_V columns (a 152k row never has to fit in
registers), as triton_rows does for the SFT loss.

Pass 1, ``_stats_kernel``: online log-sum-exp over the tiles

    m' = max(m, max tile z);  s' = s exp(m - m') + sum exp(z - m');  lse = m + log s

then the student's log-probs of the sampled token and of the K teacher ids,
s_y = z_y - lse and s_k = z_{v_k} - lse (floored at -FLT_MAX: a -inf logit gives a finite
q * s, and 0 where q = 0). L is left as it was.

Pass 2, ``_dlogits_kernel``: with the per-row factor a, the K per-id factors b_k and the
hard-term factor c (already multiplied by w * grad_scale / temperature),

    dL/dz_u = a exp(z_u - lse) - c [u = y] + sum_k b_k [u = v_k]

written in place: the dense part tile by tile, then (after a barrier: the K sparse columns
were written by other threads of the program) the K columns read, corrected and written
back. The ids of a row are distinct (the API refuses duplicates), so no two corrections of a
row touch one column.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .torch_distill import TorchDistillRows
from .triton_rows import online_lse_tile, vocab_tile
from .triton_utils import ROW_WARPS, next_pow2

__all__ = ["TritonDistillRows", "distill_row_stats", "distill_row_dlogits_"]

# float32's lowest finite value: the floor of a log-prob whose logit is -inf (see pass 1)
# a constexpr: compiled @triton.jit code may read no other global (the interpreter does not
# check; tests/triton_compile_check.py compiles this kernel for sm80/sm90 and does)
_NEG_FLT_MAX = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _stats_kernel(
    L_ptr, stride_l, Y_ptr, IDS_ptr, stride_ids, SY_ptr, STOP_ptr, LSE_ptr,
    V, K,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = L_ptr + row * stride_l
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)  # unused without the entropy
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        z = tl.load(base + c, mask=c < V, other=float("-inf")).to(tl.float32)
        m, s, t = online_lse_tile(z, m, s, t, False)
    lse = m + tl.log(s)
    tl.store(LSE_ptr + row, lse)
    y = tl.load(Y_ptr + row)
    z_y = tl.load(base + y).to(tl.float32)
    tl.store(SY_ptr + row, tl.maximum(z_y - lse, _NEG_FLT_MAX))
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < K
    ids = tl.load(IDS_ptr + row * stride_ids + kk, mask=kmask, other=0)
    z_top = tl.load(base + ids, mask=kmask, other=0.0).to(tl.float32)
    tl.store(STOP_ptr + row * K + kk, tl.maximum(z_top - lse, _NEG_FLT_MAX), mask=kmask)


@triton.jit
def _dlogits_kernel(
    L_ptr, stride_l, Y_ptr, IDS_ptr, stride_ids, LSE_ptr, A_ptr, B_ptr, C_ptr,
    V, K,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, HAS_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = L_ptr + row * stride_l
    lse = tl.load(LSE_ptr + row)
    a = tl.load(A_ptr + row)
    y = tl.load(Y_ptr + row)
    if HAS_C:
        c_y = tl.load(C_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        inside = c < V
        z = tl.load(base + c, mask=inside, other=0.0).to(tl.float32)
        g = a * tl.exp(z - lse)
        if HAS_C:
            g = g - tl.where(c == y, c_y, 0.0)
        tl.store(base + c, g, mask=inside)
    # the K sparse columns below were written above by other threads of this program
    tl.debug_barrier()
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < K
    ids = tl.load(IDS_ptr + row * stride_ids + kk, mask=kmask, other=0)
    b = tl.load(B_ptr + row * K + kk, mask=kmask, other=0.0)
    g_top = tl.load(base + ids, mask=kmask, other=0.0)
    tl.store(base + ids, g_top + b, mask=kmask)


def _device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check(z: torch.Tensor, ids: torch.Tensor) -> None:
    if z.dtype != torch.float32 or z.dim() != 2 or z.stride(1) != 1:
        raise ValueError("the Triton distillation rows take a (rows, V) float32 logits chunk with contiguous rows")
    if ids.dim() != 2 or ids.shape[0] != z.shape[0]:
        raise ValueError("teacher ids must be (rows, K)")


def distill_row_stats(z: torch.Tensor, y: torch.Tensor, ids: torch.Tensor):
    """(s_y (rows,), s_top (rows, K), lse (rows,)), float32, of a tempered logits chunk."""
    _check(z, ids)
    rows, vocab = z.shape
    K = ids.shape[1]
    ids = ids.contiguous()
    s_y = torch.empty(rows, dtype=torch.float32, device=z.device)
    lse = torch.empty_like(s_y)
    s_top = torch.empty(rows, K, dtype=torch.float32, device=z.device)
    if rows:
        with _device(z):
            _stats_kernel[(rows,)](
                z, z.stride(0), y.contiguous(), ids, ids.stride(0), s_y, s_top, lse, vocab, K,
                BLOCK_V=vocab_tile(vocab), BLOCK_K=next_pow2(K), num_warps=ROW_WARPS,
            )
    return s_y, s_top, lse


def distill_row_dlogits_(z, lse, y, ids, a, b, c=None) -> torch.Tensor:
    """In place: z <- a softmax(z) - c onehot(y) + scatter(ids, b). Returns z."""
    _check(z, ids)
    rows, vocab = z.shape
    K = ids.shape[1]
    if rows:
        f32 = dict(dtype=torch.float32)
        a = a.to(**f32).contiguous()
        b = b.to(**f32).contiguous()
        c_arg = c.to(**f32).contiguous() if c is not None else a
        with _device(z):
            _dlogits_kernel[(rows,)](
                z, z.stride(0), y.contiguous(), ids.contiguous(), ids.contiguous().stride(0), lse.contiguous(),
                a, b, c_arg, vocab, K,
                BLOCK_V=vocab_tile(vocab), BLOCK_K=next_pow2(K), HAS_C=c is not None, num_warps=ROW_WARPS,
            )
    return z


class _CudaLogits:
    """fp32 tempered logits of a chunk from the SFT Triton path's GEMM (16-bit inputs: a
    tensor-core matmul, fp32 softmax math), not the CPU path's fp32 weight copy."""

    def __init__(self, problem):
        self.problem = problem

    def logits(self, h_c: torch.Tensor) -> torch.Tensor:
        from .triton_chunked import logits_chunk

        z = logits_chunk(self.problem, h_c)
        if self.problem.temperature != 1.0:
            z.mul_(1.0 / self.problem.temperature)
        return z


class TritonDistillRows(TorchDistillRows):
    """Row math for kernels/torch_distill.py's chunk loop, in Triton (see the module docstring).

    On CUDA the chunks' GEMMs, gradient accumulators and chunk size are triton_pear's (16-bit
    GEMMs with fp32 results, at least GPU_MIN_CHUNK_ROWS tokens a chunk); on CPU tensors (the
    interpreter) the chunked path's."""

    name = "triton"

    @staticmethod
    def buffer(problem):
        return _CudaLogits(problem) if problem.hidden.is_cuda else TorchDistillRows.buffer(problem)

    @staticmethod
    def sink(problem, need, buffer, post_scale: float = 1.0):
        if problem.hidden.is_cuda:
            from .triton_chunked import grad_sink

            return grad_sink(problem, need, post_scale)
        return TorchDistillRows.sink(problem, need, buffer, post_scale)

    @staticmethod
    def post_scale(problem, grad_scale: float) -> float:
        # on CUDA the gradients go through grad_sink (dlogits cast to the input dtype): its rule;
        # on CPU tensors through the fp32 sink of the chunked path, which needs none
        if problem.hidden.is_cuda:
            from .triton_chunked import grad_post_scale

            return grad_post_scale(problem, grad_scale)
        return 1.0

    @staticmethod
    def rows(problem) -> int:
        return problem.rows()  # at least GPU_MIN_CHUNK_ROWS on CUDA

    @staticmethod
    def stats_(z, y, ids):
        return distill_row_stats(z, y, ids)

    @staticmethod
    def dlogits_(z, aux, y, ids, a, b, c):
        return distill_row_dlogits_(z, aux, y, ids, a, b, c)
