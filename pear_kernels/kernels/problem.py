"""What every backend receives and returns: one problem in, one result out.

A backend module (``torch_chunked``, ``triton_pear``, ...) exposes

    forward(problem, grad_scale=None, need=(dh, dW, db)) -> ForwardResult
    backward(problem, coef, log_w_unused, need) -> Grads        (recompute path, reduction="none")
    token_logprobs(problem) -> (M,) float32 log pi_theta of the supervised labels

``grad_scale`` is the factor d loss / d token_loss (1/normalizer for "mean", 1 for "sum");
when it is given, forward also returns the gradients (the Liger-style "gradient in forward":
no logits are kept for backward, and backward only scales). ``coef`` (M,) is the full
per-token factor of (softmax - onehot) / temperature for the recompute path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

from ..config import PEARConfig
from ..weights import SequenceLayout
from .vocab_parallel import VocabParallel

__all__ = ["chunks_from_end", "PEARProblem", "Grads", "ForwardResult", "default_chunk_size", "CHUNK_BUDGET_BYTES",
           "LossOptions", "NO_OPTIONS"]

# Working memory for one chunk of logits. 128 MiB keeps a chunk of a 152k vocabulary at about
# 220 rows. The three matmuls (H=2048) measured on a 2-core Xeon: 324 GFLOP/s at 256 rows, 323
# at 441, 280 at 128, so little is lost below 256 MiB; the naive loss keeps ~2.6 copies of the
# (N x V) logits, so at N=8192, V=151936 this is ~1% of its extra memory (256 MiB was ~2%).
CHUNK_BUDGET_BYTES = 128 * 2**20
# Above this many rows a chunk gains nothing in matmul efficiency, and small-vocabulary
# problems (RL on toy tasks) would otherwise get one giant chunk.
MAX_CHUNK_ROWS = 8192


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

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def rows(self) -> int:
        """Chunk length in compact (supervised) tokens."""
        if self.chunk_size is not None:
            return max(1, int(self.chunk_size))
        # vocabulary-parallel ranks must agree on the chunking: size it for the largest shard
        vocab = self.vocab_size if self.vocab_parallel is None else self.vocab_parallel.max_shard_size
        return default_chunk_size(vocab, self.hidden.element_size())


def default_chunk_size(vocab_size: int, element_size: int = 4) -> int:
    # per row: fp32 logits/dlogits buffer, plus a half-precision logits copy for 16-bit inputs
    per_row = vocab_size * (4 + (element_size if element_size < 4 else 0))
    return int(max(1, min(MAX_CHUNK_ROWS, CHUNK_BUDGET_BYTES // max(per_row, 1))))


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
