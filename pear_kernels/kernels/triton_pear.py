"""Triton PEAR backend: the GPU path, same interface as torch_chunked (see problem.py).

Kernels (each in its own module):
- triton_fused.fused_lse_forward: log-probs (and entropies) straight from hidden and weight
  tiles, logits never in global memory. Used whenever no gradient is needed in forward
  (reduction "none", the log-prob op, the sequence-variant pre-pass) and by the fused path.
- triton_scan: the PEAR weight scan (clip, segmented suffix sums with a carry, log-weights).
- triton_rows: softmax statistics and weighted dlogits, in place, over a cuBLAS logits chunk.
- triton_fused.fused_recompute_backward: gradients recomputing logit tiles (fp32 atomics).

Gradients, two paths:
- chunked (default): per chunk of supervised tokens, visited from the end of the batch:
  logits = h W^T (cuBLAS) -> row_stats -> scan + log-weights -> dlogits in place -> dh, dW,
  db (cuBLAS). 3 matmuls, one (rows x V) fp32 buffer; the weight of every token of a chunk is
  known before its dlogits are reduced into dW because the scan carries from later chunks.
- fused (``fused=True`` or PEAR_KERNELS_TRITON_FUSED=1): fused forward over all tokens, the scan,
  then the recompute backward. 4 matmuls, no logits buffer at all; untimed on a GPU, so opt-in.

float64 problems are handed to torch_chunked: fp64 serves oracles and tests, not training, and
the kernels here keep their softmax state in fp32.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from ..config import Variant
from ..weights import clip_log_weights
from . import torch_chunked
from .problem import ForwardResult, Grads, PEARProblem, chunks_from_end
from .triton_fused import fused_lse_forward, fused_recompute_backward
from .triton_rows import row_dlogits_, row_stats
from .triton_scan import pear_log_weights, pear_scan_

__all__ = ["forward", "backward", "token_logprobs", "FUSED_ENV_VAR", "GPU_MIN_CHUNK_ROWS"]

FUSED_ENV_VAR = "PEAR_KERNELS_TRITON_FUSED"
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Each chunk's dW += dlogits^T h reads and writes the fp32 dW (8 V H bytes) for 2 V H rows
# FLOPs: rows / 4 FLOP per byte. The default 128 MiB budget (CHUNK_BUDGET_BYTES) gives ~220
# rows at V = 152k (55 FLOP/byte), far under an H100's ridge point (989 TFLOP/s / 3.35 TB/s = 295), i.e.
# memory-bound; 1024 rows reach 256 FLOP/byte for 0.9 GiB of fp32 + bf16 logits, so on a GPU
# chunks get at least that many rows unless the caller sets chunk_size.
GPU_MIN_CHUNK_ROWS = 1024


def _rows(problem: PEARProblem) -> int:
    if problem.chunk_size is not None or problem.hidden.device.type != "cuda":
        return problem.rows()
    return max(problem.rows(), GPU_MIN_CHUNK_ROWS)


def _use_fused(fused: Optional[bool]) -> bool:
    if fused is not None:
        return bool(fused)
    return os.environ.get(FUSED_ENV_VAR, "0").strip().lower() in ("1", "true", "yes")


def _hidden(problem: PEARProblem) -> torch.Tensor:
    h = problem.hidden
    return h if h.stride(-1) == 1 else h.contiguous()


def _weight(problem: PEARProblem) -> torch.Tensor:
    w = problem.weight
    return w if w.stride(-1) == 1 else w.contiguous()


def _compact_labels(problem: PEARProblem) -> torch.Tensor:
    return problem.labels[problem.layout.sup_index].contiguous()


def _fused_logprobs(problem: PEARProblem, with_entropy: bool = False):
    return fused_lse_forward(
        _hidden(problem), _weight(problem), problem.bias, problem.layout.sup_index,
        _compact_labels(problem), problem.temperature, with_entropy,
    )


def _scan_all(problem, logp, behavior, d, incl) -> None:
    pear_scan_(logp, behavior, problem.layout, problem.config, d, incl, 0, logp.numel())


def _fused_grads(problem: PEARProblem, lse, coef, need) -> Grads:
    h = _hidden(problem)
    dh_c, dw, db = fused_recompute_backward(
        h, _weight(problem), problem.bias, problem.layout.sup_index, _compact_labels(problem),
        lse, coef, need, problem.temperature,
    )
    dh = None
    if dh_c is not None:
        dh = torch.zeros_like(problem.hidden)
        dh[problem.layout.sup_index] = dh_c.to(dh.dtype)
    return Grads(dh, dw, db)


class _ChunkGrads:
    """dh (into the chunk's token rows), dW and db from one fp32 dlogits chunk (cuBLAS)."""

    def __init__(self, problem: PEARProblem, need):
        h, w = problem.hidden, problem.weight
        self.w = _weight(problem)
        self.dh = torch.zeros_like(h) if need[0] else None
        self.dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need[1] else None
        has_b = need[2] and problem.bias is not None
        self.db = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if has_b else None

    def add(self, dlogits, h_c, rows) -> None:
        if self.dh is not None:
            self.dh[rows] = torch.mm(dlogits.to(self.w.dtype), self.w)
        if self.dw is not None:
            self.dw.addmm_(dlogits.t(), h_c.to(torch.float32))
        if self.db is not None:
            self.db += dlogits.sum(dim=0)

    def result(self) -> Grads:
        return Grads(self.dh, self.dw, self.db)


def _logits_chunk(problem: PEARProblem, h_c: torch.Tensor) -> torch.Tensor:
    """Raw fp32 logits h W^T + b of a chunk (the temperature is applied by the row kernels)."""
    w, b = _weight(problem), problem.bias
    if h_c.dtype == torch.float32:
        return torch.addmm(b, h_c, w.t()) if b is not None else torch.mm(h_c, w.t())
    logits = torch.mm(h_c, w.t()).float()  # 16-bit tensor-core matmul, fp32 softmax math
    if b is not None:
        logits += b
    return logits


def _chunked_logprobs(problem: PEARProblem) -> torch.Tensor:
    m = problem.layout.num_supervised
    out = torch.empty(m, dtype=torch.float32, device=problem.hidden.device)
    h, y_all = _hidden(problem), _compact_labels(problem)
    for start, end in chunks_from_end(m, _rows(problem)):
        logits = _logits_chunk(problem, h[problem.layout.sup_index[start:end]])
        out[start:end], _, _ = row_stats(logits, y_all[start:end], problem.temperature)
    return out


def _finish(problem, logp, behavior, log_w_raw, grads) -> ForwardResult:
    log_w = clip_log_weights(log_w_raw, problem.config)
    return ForwardResult(
        logp=logp,
        log_ratio=logp.to(torch.float64) - behavior,
        log_w_raw=log_w_raw,
        log_w=log_w,
        loss_sum=-(log_w.exp() * logp.to(torch.float64)).sum(),
        grads=grads,
    )


def token_logprobs(problem: PEARProblem, with_entropy: bool = False):
    """(M,) float32 log-probs of the supervised labels (and entropies), fully fused."""
    if problem.hidden.dtype not in _TRITON_DTYPES:
        return torch_chunked.token_logprobs(problem, with_entropy)
    logp, _, ent = _fused_logprobs(problem, with_entropy)
    return (logp, ent) if with_entropy else logp


def forward(
    problem: PEARProblem,
    grad_scale: Optional[float] = None,
    need: Tuple[bool, bool, bool] = (False, False, False),
    fused: Optional[bool] = None,
) -> ForwardResult:
    """Log-probs, weights and the weighted loss sum; with grad_scale, the gradients too."""
    if problem.hidden.dtype not in _TRITON_DTYPES:
        return torch_chunked.forward(problem, grad_scale, need)
    layout, config = problem.layout, problem.config
    m = layout.num_supervised
    dev = problem.hidden.device
    behavior = problem.behavior_logprobs[layout.sup_index].to(torch.float64).contiguous()
    d = torch.empty(m, dtype=torch.float64, device=dev)
    incl = torch.empty(m, dtype=torch.float64, device=dev)
    log_w_raw = torch.empty(m, dtype=torch.float64, device=dev)
    want_grads = grad_scale is not None and any(need)

    if not want_grads or _use_fused(fused):
        logp, lse, _ = _fused_logprobs(problem)
        _scan_all(problem, logp, behavior, d, incl)
        coef = pear_log_weights(d, incl, layout, config, 0, m, log_w_raw,
                                coef_scale=grad_scale if want_grads else None)
        grads = _fused_grads(problem, lse, coef, need) if want_grads else None
        return _finish(problem, logp, behavior, log_w_raw, grads)

    rows = _rows(problem)
    # The sequence weight needs every log-prob of its sequence before any of its gradients.
    weights_known = config.variant is Variant.SEQUENCE and m > rows
    coef_all = None
    if weights_known:
        # log-probs from the same cuBLAS logits the gradient pass will see, so the loss and
        # its gradient agree for 16-bit inputs (the fused kernel never rounds logits)
        logp_all = _chunked_logprobs(problem)
        _scan_all(problem, logp_all, behavior, d, incl)
        coef_all = pear_log_weights(d, incl, layout, config, 0, m, log_w_raw, coef_scale=grad_scale)
    else:
        logp_all = torch.empty(m, dtype=torch.float32, device=dev)
    sink = _ChunkGrads(problem, need)
    h, y_all = _hidden(problem), _compact_labels(problem)
    for start, end in chunks_from_end(m, rows):
        token_rows = layout.sup_index[start:end]
        h_c = h[token_rows]
        y = y_all[start:end]
        logits = _logits_chunk(problem, h_c)
        logp, lse, _ = row_stats(logits, y, problem.temperature)
        if weights_known:
            coef = coef_all[start:end]
        else:
            logp_all[start:end] = logp
            pear_scan_(logp, behavior, layout, config, d, incl, start, end)
            coef = pear_log_weights(d, incl, layout, config, start, end, log_w_raw, coef_scale=grad_scale)
        row_dlogits_(logits, y, lse, coef, problem.temperature)
        sink.add(logits, h_c, token_rows)
    return _finish(problem, logp_all, behavior, log_w_raw, sink.result())


def backward(
    problem: PEARProblem, coef: torch.Tensor, need: Tuple[bool, bool, bool], fused: Optional[bool] = None
) -> Grads:
    """Recompute pass: gradients for per-token factors ``coef`` (M,) of w * grad_output."""
    if problem.hidden.dtype not in _TRITON_DTYPES:
        return torch_chunked.backward(problem, coef, need)
    coef32 = coef.to(torch.float32).contiguous()
    if _use_fused(fused):
        _, lse, _ = _fused_logprobs(problem)
        return _fused_grads(problem, lse, coef32, need)
    layout = problem.layout
    sink = _ChunkGrads(problem, need)
    h, y_all = _hidden(problem), _compact_labels(problem)
    for start, end in chunks_from_end(layout.num_supervised, _rows(problem)):
        token_rows = layout.sup_index[start:end]
        h_c = h[token_rows]
        y = y_all[start:end]
        logits = _logits_chunk(problem, h_c)
        _, lse, _ = row_stats(logits, y, problem.temperature)
        row_dlogits_(logits, y, lse, coef32[start:end], problem.temperature)
        sink.add(logits, h_c, token_rows)
    return sink.result()
