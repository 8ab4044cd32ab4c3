"""torch.distributed helpers: the global loss normalizer and vocabulary shards.

Data parallelism (DDP, FSDP, DeepSpeed ZeRO): every rank sees a different slice of the global
batch and the optimizer step uses the *average* of the ranks' gradients. For the per-token mean
of the global batch, each rank must divide its weighted token-loss sum by the number of
supervised tokens of the whole global batch (not its own), and multiply by the world size to
undo the gradient averaging:

    n = global_num_items(labels)                     # same value on every rank
    loss = fused_pear_loss(..., num_items_in_batch=n) * world_size
    loss.backward()                                  # DDP/FSDP average -> exact global mean

(the Hugging Face Trainer does the same with ``average_tokens_across_devices=True``). Dividing
by the local count instead weights a rank's tokens by how few it has, and the loss curve then
depends on how the batch was split.

Vocabulary (tensor) parallelism: ``fused_pear_loss(..., vocab_parallel_group=group)`` with each
rank holding ``lm_head_weight[start:end]`` for ``start, end = vocab_shard_range(V, group)`` (or
any contiguous split in rank order, uneven allowed). See kernels/vocab_parallel.py.

Only torch is imported here.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .kernels.vocab_parallel import VocabParallel
from .ops.dispatch import requested_backend

__all__ = ["global_num_items", "vocab_shard_range"]


def _group_size_rank(group) -> Tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def global_num_items(labels: torch.Tensor, group=None, *, ignore_index: int = -100) -> torch.Tensor:
    """Number of supervised tokens (labels != ignore_index) summed over the ranks of ``group``.

    Pass the labels exactly as the loss sees them (already shifted). Returns a 0-d int64 tensor
    on labels' device (a CUDA tensor for NCCL), equal on every rank; without an initialised
    process group, the local count. Every rank of ``group`` must call it (it is a collective).
    """
    if not torch.is_tensor(labels):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    count = (labels != ignore_index).sum().to(torch.int64)
    if _group_size_rank(group)[0] > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count


def vocab_shard_range(vocab_size: int, group=None, *, rank: Optional[int] = None,
                      world_size: Optional[int] = None) -> Tuple[int, int]:
    """[start, end) of this rank's contiguous vocabulary shard, for an even split in rank order.

    The first ``vocab_size % world_size`` ranks get one row more (every shard is non-empty when
    vocab_size >= world_size). ``rank``/``world_size`` default to the group's.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    g_world, g_rank = _group_size_rank(group)
    world = g_world if world_size is None else world_size
    rank = g_rank if rank is None else rank
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world!r}")
    if vocab_size < world:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the group size {world}")
    base, extra = divmod(vocab_size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def setup_vocab_parallel(group, weight, labels, chunk_size, backend) -> Tuple[VocabParallel, str]:
    """For the public API: the shard layout (one all_gather) and the backend to run.

    Vocabulary parallelism is implemented by the chunked PyTorch path only: "auto" resolves to
    it on every device, any other explicit choice is an error rather than a silent fallback.
    """
    name = requested_backend(backend)
    if name not in ("auto", "torch"):
        raise ValueError(
            f"vocab_parallel_group is supported by the 'torch' backend only, got backend={name!r} "
            "(pass backend='torch' or 'auto', or unset PEAR_KERNELS_BACKEND)"
        )
    return VocabParallel.create(group, weight, labels, chunk_size), "torch"
