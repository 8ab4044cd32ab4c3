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

import contextlib
import functools
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
    """The fused recompute backward accumulates with fp32 atomics, whose order (and so the last
    bits of dh/dW) varies from run to run: under torch.use_deterministic_algorithms(True) the
    chunked path (cuBLAS GEMMs, no atomics) serves the gradients instead."""
    if torch.are_deterministic_algorithms_enabled():
        return False
    if fused is not None:
        return bool(fused)
    return os.environ.get(FUSED_ENV_VAR, "0").strip().lower() in ("1", "true", "yes")


def device_context(tensor: torch.Tensor):
    """Triton launches on the *current* CUDA device and stream; with the head on another GPU
    than the current one (device_map="auto") a launch would read foreign memory. Every entry
    point runs inside the device of its tensors."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def _on_problem_device(fn):
    @functools.wraps(fn)
    def wrapper(problem, *args, **kwargs):
        with device_context(problem.hidden):
            return fn(problem, *args, **kwargs)

    return wrapper


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
    if dh_c is not None:  # fp32, rounded to the input dtype after the upstream gradient
        dh = torch.zeros(problem.hidden.shape, dtype=torch.float32, device=problem.hidden.device)
        dh[problem.layout.sup_index] = dh_c
    return Grads(dh, dw, db)


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> bool:
    """out (fp32) = / += a @ b for 16-bit a, b on tensor cores with fp32 accumulation and an
    fp32 result (torch's out_dtype GEMM, CUDA only). False where it is not available."""
    if not a.is_cuda:
        return False
    try:
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


class _ChunkGrads:
    """dh (into the chunk's token rows), dW and db from one fp32 dlogits chunk (cuBLAS).

    16-bit inputs: the dlogits are cast to the input dtype once and serve both GEMMs. dW runs
    as a 16-bit GEMM with fp32 accumulation into the fp32 buffer (an fp32 GEMM on CUDA cores
    would be ~15x slower than the two 16-bit ones on A100/H100); the buffer is written, not
    zero-filled, by the first chunk. ``post_scale``: a factor applied after the GEMMs instead
    of inside dlogits (fp16: 1/normalizer folded into the dlogits would flush most entries to
    zero at N = 16k and more). dh is kept in fp32 for 16-bit inputs and rounded once, after
    the upstream gradient is applied (GradScaler's scale included).
    """

    def __init__(self, problem: PEARProblem, need, post_scale: float = 1.0):
        h, w = problem.hidden, problem.weight
        self.w = _weight(problem)
        self.post_scale = post_scale
        self.dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need[0] else None
        self.dw = torch.empty(w.shape, dtype=torch.float32, device=w.device) if need[1] else None
        self._dw_written = False
        has_b = need[2] and problem.bias is not None
        self.db = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if has_b else None

    def add(self, dlogits, h_c, rows) -> None:
        sixteen = self.w.dtype in (torch.float16, torch.bfloat16)
        d_in = dlogits.to(self.w.dtype) if sixteen else dlogits
        if self.dh is not None:
            dh_c = torch.mm(d_in, self.w).to(torch.float32)
            self.dh[rows] = dh_c * self.post_scale if self.post_scale != 1.0 else dh_c
        if self.dw is not None:
            if not (sixteen and _mm_fp32_out(d_in.t(), h_c, self.dw, self._dw_written)):
                h32 = h_c.to(torch.float32)
                if self._dw_written:
                    self.dw.addmm_(dlogits.t(), h32)
                else:
                    torch.mm(dlogits.t(), h32, out=self.dw)
            self._dw_written = True
        if self.db is not None:
            self.db += dlogits.sum(dim=0)

    def result(self) -> Grads:
        if self.dw is not None:
            if not self._dw_written:
                self.dw.zero_()
            elif self.post_scale != 1.0:
                self.dw.mul_(self.post_scale)
        if self.db is not None and self.post_scale != 1.0:
            self.db.mul_(self.post_scale)
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


@_on_problem_device
def token_logprobs(problem: PEARProblem, with_entropy: bool = False):
    """(M,) float32 log-probs of the supervised labels (and entropies), fully fused."""
    if problem.hidden.dtype not in _TRITON_DTYPES:
        return torch_chunked.token_logprobs(problem, with_entropy)
    if problem.options.active:  # softcap: the chunked option kernels (triton_options)
        from . import triton_options

        return triton_options.token_logprobs(problem, with_entropy)
    logp, _, ent = _fused_logprobs(problem, with_entropy)
    return (logp, ent) if with_entropy else logp


@_on_problem_device
def forward(
    problem: PEARProblem,
    grad_scale: Optional[float] = None,
    need: Tuple[bool, bool, bool] = (False, False, False),
    fused: Optional[bool] = None,
) -> ForwardResult:
    """Log-probs, weights and the weighted loss sum; with grad_scale, the gradients too."""
    if problem.hidden.dtype not in _TRITON_DTYPES:
        return torch_chunked.forward(problem, grad_scale, need)
    if problem.options.active or problem.want_lse:  # always chunked: triton_options
        from . import triton_options

        return triton_options.forward(problem, grad_scale, need)
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
    # fp16: the normaliser is applied after the GEMMs, not inside the 16-bit dlogits
    post_scale = grad_scale if problem.hidden.dtype == torch.float16 else 1.0
    coef_scale = grad_scale / post_scale
    # The sequence weight needs every log-prob of its sequence before any of its gradients.
    weights_known = config.variant is Variant.SEQUENCE and m > rows
    coef_all = None
    if weights_known:
        # log-probs from the same cuBLAS logits the gradient pass will see, so the loss and
        # its gradient agree for 16-bit inputs (the fused kernel never rounds logits)
        logp_all = _chunked_logprobs(problem)
        _scan_all(problem, logp_all, behavior, d, incl)
        coef_all = pear_log_weights(d, incl, layout, config, 0, m, log_w_raw, coef_scale=coef_scale)
    else:
        logp_all = torch.empty(m, dtype=torch.float32, device=dev)
    sink = _ChunkGrads(problem, need, post_scale)
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
            coef = pear_log_weights(d, incl, layout, config, start, end, log_w_raw, coef_scale=coef_scale)
        row_dlogits_(logits, y, lse, coef, problem.temperature)
        sink.add(logits, h_c, token_rows)
    return _finish(problem, logp_all, behavior, log_w_raw, sink.result())


@_on_problem_device
def backward(
    problem: PEARProblem, coef: torch.Tensor, need: Tuple[bool, bool, bool], fused: Optional[bool] = None,
    ucoef: Optional[torch.Tensor] = None,
) -> Grads:
    """Recompute pass: gradients for per-token factors ``coef`` (M,) of w * grad_output
    (with loss options, ``ucoef`` (M,) = grad_output for the unweighted z-loss)."""
    if problem.hidden.dtype not in _TRITON_DTYPES:
        return torch_chunked.backward(problem, coef, need, ucoef)
    if problem.options.active or problem.want_lse:
        from . import triton_options

        return triton_options.backward(problem, coef, need, ucoef)
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
