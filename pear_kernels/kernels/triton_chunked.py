"""Triton chunked row math: ``chunk_driver``'s strategy for the Triton backends.

Per chunk of supervised tokens: raw fp32 logits from a cuBLAS matmul (16-bit inputs: a
tensor-core matmul, fp32 softmax math), the Triton row kernels (triton_rows) for the softmax
statistics and the weighted dlogits in place, the Triton PEAR scan (triton_scan), and
cuBLAS gradients (``grad_sink``). triton_pear runs it for the plain loss, triton_options
subclasses it with the loss options' row kernels, triton_distill borrows its logits and sink.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from .backend import PEARProblem
from .chunk_driver import ChunkStats, GradSink, mm_fp32_out
from .triton_rows import row_dlogits_, row_stats
from .triton_scan import pear_log_weights, pear_scan_

__all__ = ["TritonKernels", "grad_sink", "grad_post_scale", "logits_chunk", "contiguous_problem", "hidden_rows", "weight_rows"]


def hidden_rows(problem: PEARProblem) -> torch.Tensor:
    h = problem.hidden
    return h if h.stride(-1) == 1 else h.contiguous()


def weight_rows(problem: PEARProblem) -> torch.Tensor:
    w = problem.weight
    return w if w.stride(-1) == 1 else w.contiguous()


def grad_sink(problem: PEARProblem, need, post_scale: float = 1.0) -> GradSink:
    """dh, dW, db from fp32 dlogits chunks with cuBLAS: 16-bit inputs run both GEMMs in the
    input dtype, dW accumulating in fp32 (an fp32 GEMM on CUDA cores would be ~15x slower than
    the two 16-bit ones on A100/H100); see chunk_driver.GradSink."""
    return GradSink(problem, need, weight_rows(problem), low_precision=True, post_scale=post_scale)


def grad_post_scale(problem: PEARProblem, grad_scale: float) -> float:
    """The part of ``grad_scale`` that ``grad_sink`` applies after its GEMMs instead of inside
    the dlogits it casts to the input dtype: all of it for fp16, where 1/normaliser folded into
    16-bit dlogits (p_u / N is 1e-10 at V = 152k, N = 64k) would flush them to zero; none for
    bf16 (fp32's exponent range) and fp32."""
    return grad_scale if problem.hidden.dtype == torch.float16 else 1.0


def logits_chunk(problem: PEARProblem, h_c: torch.Tensor) -> torch.Tensor:
    """Raw fp32 logits h W^T + b of a chunk (the temperature is applied by the row kernels).

    16-bit inputs: a tensor-core GEMM with fp32 accumulation *and an fp32 result* (torch's
    out_dtype GEMM on CUDA). A 16-bit result rounded to fp32 afterwards would move the
    log-probs by up to ~0.1 at logits of ~30 (bf16 keeps 8 bits), so the chunked path would
    disagree with the fused kernels (fp32 logit tiles) and with the CPU backends; without
    that GEMM (CPU tensors under the interpreter) the chunk is multiplied in fp32."""
    w, b = weight_rows(problem), problem.bias
    if h_c.dtype == torch.float32:
        return torch.addmm(b, h_c, w.t()) if b is not None else torch.mm(h_c, w.t())
    logits = torch.empty(h_c.shape[0], w.shape[0], dtype=torch.float32, device=h_c.device)
    if not mm_fp32_out(h_c, w.t(), logits, accumulate=False):
        if h_c.is_cuda:
            warnings.warn(
                "this torch has no 16-bit GEMM with an fp32 result (torch >= 2.8 on CUDA has it): "
                "pear_kernels' chunked Triton path multiplies the logits in fp32 instead, which is "
                "correct but slower; upgrade torch, or set PEAR_KERNELS_TRITON_FUSED=1",
                RuntimeWarning, stacklevel=2,
            )
        torch.mm(h_c.float(), w.t().float(), out=logits)  # exact products of 16-bit values
    if b is not None:
        logits += b
    return logits


class TritonKernels:
    """``chunk_driver.ChunkKernels`` with the Triton row kernels (triton_rows) over cuBLAS
    logits chunks, and the Triton PEAR scan (triton_scan)."""

    work_dtype = torch.float32

    def __init__(self, problem: PEARProblem):
        self.problem = problem

    def logits(self, h_c: torch.Tensor) -> torch.Tensor:
        return logits_chunk(self.problem, h_c)

    def stats(self, z, y) -> ChunkStats:
        logp, lse, _ = row_stats(z, y, self.problem.temperature)
        return ChunkStats(logp, None, None, lse)

    def logp_entropy(self, z, y):
        logp, _, ent = row_stats(z, y, self.problem.temperature, with_entropy=True)
        return logp, ent

    def weights(self, logp, behavior, d, incl, log_w_raw, start, end, coef_scale):
        p = self.problem
        pear_scan_(logp, behavior, p.layout, p.config, d, incl, start, end)
        return pear_log_weights(d, incl, p.layout, p.config, start, end, log_w_raw, coef_scale=coef_scale)

    def dlogits_(self, z, y, st: ChunkStats, coef, ucoef):
        return row_dlogits_(z, y, st.state, coef.to(torch.float32).contiguous(), self.problem.temperature)

    def sink(self, need, post_scale: float) -> GradSink:
        return grad_sink(self.problem, need, post_scale)

    def post_scale(self, grad_scale: float) -> float:
        return grad_post_scale(self.problem, grad_scale)


def contiguous_problem(problem: PEARProblem) -> PEARProblem:
    """The problem with row-contiguous hidden and weight (what the row kernels index)."""
    h, w = hidden_rows(problem), weight_rows(problem)
    return problem if (h is problem.hidden and w is problem.weight) else replace(problem, hidden=h, weight=w)


