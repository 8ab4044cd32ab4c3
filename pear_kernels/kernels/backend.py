"""The backend contract: what every backend receives (``PEARProblem``), what it returns
(``ForwardResult``, ``Grads``), and the three calls it answers (``Backend``).

A backend (``torch_chunked``, ``native_cpu``, ``triton_pear``; ``ops.dispatch`` picks one) is a
module with the three functions of the ``Backend`` protocol. The chunked backends share one
loop (``chunk_driver``) and differ in their row math; the chunk sizing is here
(``PEARProblem.rows``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Protocol, Tuple, Union

import torch

from ..config import PEARConfig
from ..importance import SequenceLayout
from .vocab_parallel import VocabParallel

__all__ = ["Backend", "chunks_from_end", "PEARProblem", "Grads", "ForwardResult", "default_chunk_size",
           "CHUNK_BUDGET_BYTES", "GPU_MIN_CHUNK_ROWS", "LossOptions", "NO_OPTIONS", "work_dtype"]

# Working memory for one chunk of logits, by default. Chunk rows are chosen from a measured
# curve within this budget (a user sets it: pear_kernels.set_chunk_budget, or
# PEAR_KERNELS_CHUNK_MIB). Fused forward + backward at N=2048, V=151936, fp32, against the
# unchunked 3-GEMM floor (2-core Xeon with AVX-512, round-robin, 2026-12-05):
#     rows   128 (74 MiB)  220 (128 MiB)  512 (297 MiB)  1024 (594 MiB)
#     H=1024   1.10x         1.03x          0.90x          0.88x
#     H=2048     -           1.14x          0.99x          0.96x
# In fresh processes (benchmarks/harness.py, round-robin, the same day) at H=1024: 441 rows
# 1.14x, 1024 rows 1.05x (native row pass 1.02x); the chunked floor alone 1.07x and 0.99x.
# 512 MiB (883 rows at V=152k, 1046 at V=128k) is the default: near the flat end of the curve,
# under half of cut-cross-entropy's extra memory at N=2048 and 4% of the naive loss's at
# N=8192 (its ~2.6 copies of the N x V logits); 128 MiB gives 1.2% of naive for ~10% more time.
CHUNK_BUDGET_BYTES = 512 * 2**20
# Above this many rows a chunk gains nothing in matmul efficiency, and small-vocabulary
# problems (RL on toy tasks) would otherwise get one giant chunk.
MAX_CHUNK_ROWS = 8192
# On a GPU each chunk's dW += dlogits^T h reads and writes the fp32 dW (8 V H bytes) for 2 V H
# rows FLOPs: rows / 4 FLOP per byte. A 128 MiB budget would give ~220 rows at V = 152k (55
# FLOP/byte), far under an H100's ridge point (989 TFLOP/s / 3.35 TB/s = 295), i.e.
# memory-bound; 1024 rows reach 256 FLOP/byte for 0.9 GiB of fp32 + bf16 logits, so on a GPU
# chunks get at least that many rows unless the caller sets chunk_size.
GPU_MIN_CHUNK_ROWS = 1024


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the softmax math and the gradient accumulators: fp64 for fp64 inputs (the
    oracle and tests), fp32 otherwise (16-bit logits never reach the softmax)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class LossOptions:
    """Options of the token loss beyond the PEAR weight (the peers' names in brackets).

    softcap (Gemma 2/3 ``final_logit_softcapping``; Liger/cut-cross-entropy ``softcap``):
        z = softcap * tanh((h W^T + b) / softcap), then divided by the temperature.
    lse_square_scale (Liger ``lse_square_scale``, PaLM's z-loss): adds
        lse_square_scale * logsumexp(z)^2 per supervised token. Not multiplied by the PEAR
        weight: it regularises the scale of the logits, not the imitation of a token.
    label_smoothing (torch/Liger ``label_smoothing``): the token's cross-entropy becomes
        (1 - eps) * -log p[y] + eps * mean_v(-log p[v]); the PEAR weight multiplies the whole
        smoothed term (smoothing is part of the token's loss), and the log-ratio that builds
        the weight is always the plain log p[y].
    """

    softcap: Optional[float] = None
    lse_square_scale: float = 0.0
    label_smoothing: float = 0.0

    @property
    def active(self) -> bool:
        return self.softcap is not None or self.lse_square_scale != 0.0 or self.label_smoothing != 0.0


NO_OPTIONS = LossOptions()


@dataclass
class PEARProblem:
    hidden: torch.Tensor  # (N, H)
    weight: torch.Tensor  # (V, H)
    bias: Optional[torch.Tensor]  # (V,) or None
    labels: torch.Tensor  # (N,) int64
    behavior_logprobs: torch.Tensor  # (N,)
    layout: SequenceLayout
    config: PEARConfig
    temperature: float = 1.0
    chunk_size: Optional[int] = None
    # weight/bias are this rank's vocabulary shard; None: one process holds the whole vocabulary
    vocab_parallel: Optional[VocabParallel] = None
    # per-chunk primitives (softmax_stats_, dlogits_, logp_entropy_, scan, reduce_grad_hidden);
    # None = torch_chunked.LocalRows. The native CPU backend sets its own.
    row_math: Optional[object] = None
    options: LossOptions = NO_OPTIONS
    # also return the per-token logsumexp (ForwardResult.lse)
    want_lse: bool = False
    # bytes of working memory a chunk may use when chunk_size is not set (None: the default)
    chunk_budget: Optional[int] = None

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def rows(self) -> int:
        """Chunk length in compact (supervised) tokens: ``chunk_size`` if set, else the memory
        budget's rows (at least GPU_MIN_CHUNK_ROWS on CUDA)."""
        if self.chunk_size is not None:
            return max(1, int(self.chunk_size))
        # vocabulary-parallel ranks must agree on the chunking: size it for the largest shard
        vocab = self.vocab_size if self.vocab_parallel is None else self.vocab_parallel.max_shard_size
        rows = default_chunk_size(vocab, self.hidden.element_size(), self.chunk_budget)
        return max(rows, GPU_MIN_CHUNK_ROWS) if self.hidden.device.type == "cuda" else rows


def default_chunk_size(vocab_size: int, element_size: int = 4, budget_bytes: Optional[int] = None) -> int:
    """Rows per chunk: as many as the memory budget holds (default CHUNK_BUDGET_BYTES), at most
    MAX_CHUNK_ROWS. Per row: the fp32 logits/dlogits buffer, plus a half-precision logits copy
    for 16-bit inputs."""
    budget = CHUNK_BUDGET_BYTES if budget_bytes is None else budget_bytes
    per_row = vocab_size * (4 + (element_size if element_size < 4 else 0))
    return int(max(1, min(MAX_CHUNK_ROWS, budget // max(per_row, 1))))


@dataclass
class Grads:
    hidden: Optional[torch.Tensor]  # (N, H) hidden dtype
    weight: Optional[torch.Tensor]  # (V, H) float32 accumulator (float64 for float64 inputs)
    bias: Optional[torch.Tensor]  # (V,) same


@dataclass
class ForwardResult:
    logp: torch.Tensor  # (M,) float32 (float64 for float64 inputs)
    log_ratio: torch.Tensor  # (M,) float64, unclipped
    log_w_raw: torch.Tensor  # (M,) float64, before the log-weight clip
    log_w: torch.Tensor  # (M,) float64, clipped
    loss_sum: torch.Tensor  # () float64: sum_t w_t * token_ce_t + z_loss_t
    grads: Optional[Grads]
    # with LossOptions: the per-token cross-entropy term (smoothed) and z-loss, float64;
    # None means token_ce = -logp and no z-loss
    token_ce: Optional[torch.Tensor] = None
    z_loss: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None  # (M,) logsumexp of the (capped, tempered) logits


def chunks_from_end(m: int, rows: int) -> Iterator[Tuple[int, int]]:
    """[start, end) ranges of ``rows`` compact tokens covering [0, m), the last one first
    (every sequence is then visited from its end, as the token and block weights need)."""
    end = m
    while end > 0:
        start = max(0, end - rows)
        yield start, end
        end = start


class Backend(Protocol):
    """The three calls a backend module answers (``torch_chunked``, ``native_cpu``,
    ``triton_pear``). M is the number of supervised tokens, in the compact order of
    ``problem.layout.sup_index``.

    forward(problem, grad_scale=None, need=(dh, dW, db)) -> ForwardResult
        log-probs (M,), log-ratios and log-weights (M,) float64, the weighted loss sum; with
        ``grad_scale`` (d loss / d token loss: 1/normaliser for "mean", 1 for "sum") also
        the gradients in ``need`` (the "gradient in forward": no logits kept for backward).
    backward(problem, coef, need, ucoef=None) -> Grads
        the recompute path (reduction "none", a second differentiation): gradients for the
        per-token factors coef (M,) = w * d L / d token loss and ucoef (M,) = d L / d token
        loss (the unweighted z-loss factor; None: zero).
    token_logprobs(problem, with_entropy=False) -> (M,) log pi_theta [, (M,) entropy]
        float32 (float64 for float64 inputs), no weights, no gradient.
    """

    def forward(self, problem: PEARProblem, grad_scale: Optional[float] = None,
                need: Tuple[bool, bool, bool] = (False, False, False)) -> ForwardResult: ...

    def backward(self, problem: PEARProblem, coef: torch.Tensor, need: Tuple[bool, bool, bool],
                 ucoef: Optional[torch.Tensor] = None) -> Grads: ...

    def token_logprobs(self, problem: PEARProblem, with_entropy: bool = False
                       ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]: ...
