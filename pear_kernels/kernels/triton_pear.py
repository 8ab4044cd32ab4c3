"""Triton PEAR backend: the GPU path, the ``Backend`` contract of backend.py.

Kernels (each in its own module):
- triton_fused.fused_lse_forward: log-probs (and entropies) straight from hidden and weight
  tiles, logits never in global memory. Used whenever no gradient is needed in forward
  (reduction "none", the log-prob op, the sequence-variant pre-pass) and by the fused path.
- triton_scan: the PEAR weight scan (clip, segmented suffix sums with a carry, log-weights).
- triton_rows: softmax statistics and weighted dlogits, in place, over a cuBLAS logits chunk.
- triton_fused.fused_recompute_backward: gradients recomputing logit tiles (fp32 atomics).

Gradients, two paths:
- chunked (default): ``chunk_driver``'s passes with ``TritonKernels`` as the row math: per
  chunk of supervised tokens, visited from the end of the batch: logits = h W^T (cuBLAS) ->
  row_stats -> scan + log-weights -> dlogits in place -> dh, dW, db (cuBLAS). 3 matmuls, one
  (rows x V) fp32 buffer; the weight of every token of a chunk is known before its dlogits
  are reduced into dW because the scan carries from later chunks.
- fused (``fused=True``; ``ops.dispatch`` reads PEAR_KERNELS_TRITON_FUSED=1): fused forward over
  all tokens, the scan, then the recompute backward. 4 matmuls, no logits buffer at all;
  untimed on a GPU, so opt-in.

float64 problems are handed to torch_chunked: fp64 serves oracles and tests, not training, and
the kernels here keep their softmax state in fp32.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Tuple

import torch

from . import chunk_driver, torch_chunked, triton_options
from .backend import ForwardResult, Grads, PEARProblem
from .chunk_driver import compact_labels
from .triton_chunked import TritonKernels, contiguous_problem, hidden_rows, weight_rows
from .triton_fused import fused_lse_forward, fused_recompute_backward
from .triton_scan import pear_log_weights, pear_scan_

__all__ = ["forward", "backward", "token_logprobs"]

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _use_fused(fused: Optional[bool]) -> bool:
    """The fused recompute backward accumulates with fp32 atomics, whose order (and so the last
    bits of dh/dW) varies from run to run: under torch.use_deterministic_algorithms(True) the
    chunked path (cuBLAS GEMMs, no atomics) serves the gradients instead. ``fused`` None:
    chunked (ops.dispatch turns PEAR_KERNELS_TRITON_FUSED into fused=True)."""
    if torch.are_deterministic_algorithms_enabled():
        return False
    return bool(fused)


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


def _fused_logprobs(problem: PEARProblem, with_entropy: bool = False):
    return fused_lse_forward(
        hidden_rows(problem), weight_rows(problem), problem.bias, problem.layout.sup_index,
        compact_labels(problem), problem.temperature, with_entropy,
    )


def _scan_all(problem, logp, behavior, d, incl) -> None:
    pear_scan_(logp, behavior, problem.layout, problem.config, d, incl, 0, logp.numel())


def _fused_grads(problem: PEARProblem, lse, coef, need) -> Grads:
    h = hidden_rows(problem)
    dh_c, dw, db = fused_recompute_backward(
        h, weight_rows(problem), problem.bias, problem.layout.sup_index, compact_labels(problem),
        lse, coef, need, problem.temperature,
    )
    dh = None
    if dh_c is not None:  # fp32, rounded to the input dtype after the upstream gradient
        dh = problem.layout.to_tokens(dh_c, dtype=torch.float32)
    return Grads(dh, dw, db)


@_on_problem_device
def token_logprobs(problem: PEARProblem, with_entropy: bool = False):
    """(M,) float32 log-probs of the supervised labels (and entropies), fully fused."""
    if problem.hidden.dtype not in _TRITON_DTYPES:
        return torch_chunked.token_logprobs(problem, with_entropy)
    if problem.options.active:  # softcap: the chunked option kernels (triton_options)
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
        return triton_options.forward(problem, grad_scale, need)
    if grad_scale is None or not any(need) or _use_fused(fused):
        layout, config = problem.layout, problem.config
        m = layout.num_supervised
        dev = problem.hidden.device
        want_grads = grad_scale is not None and any(need)
        behavior = problem.behavior_logprobs[layout.sup_index].to(torch.float64).contiguous()
        d = torch.empty(m, dtype=torch.float64, device=dev)
        incl = torch.empty(m, dtype=torch.float64, device=dev)
        log_w_raw = torch.empty(m, dtype=torch.float64, device=dev)
        logp, lse, _ = _fused_logprobs(problem)
        _scan_all(problem, logp, behavior, d, incl)
        coef = pear_log_weights(d, incl, layout, config, 0, m, log_w_raw,
                                coef_scale=grad_scale if want_grads else None)
        grads = _fused_grads(problem, lse, coef, need) if want_grads else None
        return chunk_driver.finish(problem, logp, behavior, log_w_raw, grads)
    problem = contiguous_problem(problem)
    return chunk_driver.forward(problem, TritonKernels(problem), grad_scale, need)


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
        return triton_options.backward(problem, coef, need, ucoef)
    coef32 = coef.to(torch.float32).contiguous()
    if _use_fused(fused):
        _, lse, _ = _fused_logprobs(problem)
        return _fused_grads(problem, lse, coef32, need)
    problem = contiguous_problem(problem)
    return chunk_driver.backward(problem, TritonKernels(problem), coef32, need)
