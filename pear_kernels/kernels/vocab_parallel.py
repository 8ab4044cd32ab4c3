"""Vocabulary-parallel row statistics: one logits chunk split across a process group.

Each rank of ``group`` holds a contiguous shard [start, end) of the vocabulary (rows of
lm_head_weight, and of the bias), in rank order; hidden states and labels are the same on every
rank and labels are global ids. A chunk's logits z (rows x V) then exist only as column blocks
z_r (rows x V_r), one per rank. Everything the loss needs from a row is a few scalars, so the
ranks only exchange those (Megatron's vocab-parallel cross entropy does the same):

    m    = max_r max_v z_r[v]                                  all_reduce MAX
    s    = sum_r sum_v exp(z_r[v] - m)                         all_reduce SUM  } one collective
    tgt  = z_{r(y)}[y - start_{r(y)}]  (0 on the other ranks)  all_reduce SUM  }
    logp = tgt - m - log s                                     identical on every rank

Because logp is identical everywhere, every rank computes the same PEAR weights from it (with
``importance.py``, as in one process), the same loss, and its own columns of
dloss/dz = c * (softmax - onehot):

    dz_r = c * exp(z_r - m) / s  - c * onehot(y) restricted to the shard

which gives the local dW_r = dz_r^T h and db_r = sum dz_r exactly. The hidden-state gradient is
a sum over the vocabulary, dh = sum_r dz_r W_r, so each rank only has a partial dh;
``reduce_grad_hidden`` all-reduces it once per call (not per chunk), so hidden.grad is the full
gradient on every rank -- what Megatron's ColumnParallelLinear does in its input region
(identity forward, all-reduce backward). Callers must not reduce it again.

Every rank must run the same number of chunks (the collectives are matched one to one), so the
chunk length is derived from the largest shard, never from the local one.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist

from ..importance import scan_chunk

__all__ = ["VocabParallel"]


class VocabParallel:
    """Combines a chunk's row statistics over the ranks of a vocabulary-parallel group.

    The torch_chunked kernels call ``softmax_stats_``, ``dlogits_``, ``logp_entropy_`` and
    ``reduce_grad_hidden`` in place of their single-process versions; nothing else changes.
    The PEAR scan runs on the combined log-probs, identically on every rank.
    """

    scan = staticmethod(scan_chunk)

    def __init__(self, group, shard_sizes: List[int], rank: int):
        self.group = group
        self.shard_sizes = list(shard_sizes)
        self.rank = rank
        self.vocab_start = sum(self.shard_sizes[:rank])
        self.vocab_end = self.vocab_start + self.shard_sizes[rank]
        self.vocab_size = sum(self.shard_sizes)
        self.max_shard_size = max(self.shard_sizes)

    # -- row statistics -------------------------------------------------------------------

    def _local_labels(self, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Shard-local column of each label (clamped into range) and whether it is ours."""
        local = y - self.vocab_start
        hit = (local >= 0) & (local < self.vocab_end - self.vocab_start)
        return local.clamp(0, self.vocab_end - self.vocab_start - 1), hit

    def _row_max_(self, logits: torch.Tensor) -> torch.Tensor:
        m = logits.amax(dim=1)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
        return m

    def _target_logit(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        local, hit = self._local_labels(y)
        tgt = logits.gather(1, local[:, None]).squeeze(1)
        return torch.where(hit, tgt, torch.zeros_like(tgt))

    def softmax_stats_(self, logits: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """In place: logits <- exp(logits - global rowmax). Returns (logp of y, global sum of exp)."""
        tgt = self._target_logit(logits, y)
        m = self._row_max_(logits)
        logits.sub_(m[:, None]).exp_()
        # sum-exp and the target logit travel in one collective
        both = torch.stack([logits.sum(dim=1), tgt])
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=self.group)
        s, tgt = both[0], both[1]
        return tgt - m - torch.log(s), s

    def logp_entropy_(self, z: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logp of y, entropy) per row; z is overwritten. H = log s - sum_v p_v (z_v - m)."""
        tgt = self._target_logit(z, y)
        m = self._row_max_(z)
        z.sub_(m[:, None])
        z.clamp_(min=torch.finfo(z.dtype).min)  # -inf logits: p = 0 and p * z = 0, not NaN
        p = torch.exp(z)
        stats = torch.stack([p.sum(dim=1), (p * z).sum(dim=1), tgt])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group)
        s, pz, tgt = stats[0], stats[1], stats[2]
        log_s = torch.log(s)
        return tgt - m - log_s, log_s - pz / s

    def dlogits_(self, expz: torch.Tensor, s: torch.Tensor, y: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """In place: exp(z - m) -> coef * (softmax - onehot) on this shard's columns."""
        expz.mul_((coef / s)[:, None])
        local, hit = self._local_labels(y)
        # rows whose label lives on another rank subtract nothing here
        sub = torch.where(hit, coef, torch.zeros_like(coef)).to(expz.dtype)
        expz.scatter_add_(1, local[:, None], -sub[:, None])
        return expz

    def reduce_grad_hidden(self, dh: torch.Tensor) -> torch.Tensor:
        """Sum the partial hidden-state gradients of all shards (once per call)."""
        dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=self.group)
        return dh
