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

import struct
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from .checks import IGNORE_INDEX
from .kernels.vocab_parallel import VocabParallel
from .ops.dispatch import requested_backend  # the backend name is part of what ranks agree on

__all__ = ["global_num_items", "vocab_shard_range"]


def _group_size_rank(group) -> Tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def global_num_items(labels: torch.Tensor, group=None, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
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


# -- ranks agree before the first collective, or all raise ------------------------------------

# The fields every rank of a vocabulary-parallel group must agree on, in signature order.
# Floats travel as their IEEE bit patterns in int64, so equality is exact.
SIGNATURE_FIELDS = (
    "error", "hidden size H", "number of tokens N", "dtype", "device type", "chunk_size",
    "variant", "block_size", "gamma", "delta_clip low", "delta_clip high", "log_weight_clip low",
    "log_weight_clip high", "reduction", "temperature", "num_items_in_batch", "ignore_index",
    "bias given", "supervised token count", "labels checksum", "cu_seqlens checksum",
    "behavior_logprobs checksum", "hidden checksum", "backend", "chunk memory budget",
)


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _code(text: str) -> int:
    """A stable small integer for a short string (Python's hash() is salted per process)."""
    value = 0
    for ch in str(text):
        value = (value * 131 + ord(ch)) % (2**61 - 1)
    return value


def _checksum(t: Optional[torch.Tensor]) -> int:
    """Position-weighted checksum of an integer or float tensor (wraps deterministically)."""
    if t is None:
        return -1
    flat = t.reshape(-1)
    pos = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) % 65521 + 1
    if flat.is_floating_point():
        # bit patterns, so that NaN and -inf are compared too (a float sum could not see them)
        ints = flat.to(torch.float64).view(torch.int64) % 1000003
        return int((ints * pos).sum())
    return int((flat.to(torch.int64) * pos).sum())


def agree_vocab_parallel(
    group,
    check: Callable[[], object],
    *,
    hidden, weight, labels, behavior_logprobs, bias, cu_seqlens,
    config, reduction: str, temperature, num_items_in_batch, ignore_index, chunk_size, backend,
    chunk_budget=None,
):
    """Validate this rank's inputs, then agree with every rank of ``group`` before any other
    collective runs; returns (VocabParallel, backend name, what ``check()`` returned).

    ``check()`` is the local validation (labels are checked against the global vocabulary
    later, once the shard sizes are known). Its error is *not* raised at once: a rank that
    raised alone would leave the others waiting in a collective (a hang), and ranks whose
    inputs silently differ would combine unrelated statistics (a plausible wrong loss). So
    every rank builds a fixed-size signature (an error flag, the shapes, dtype, config,
    reduction, normaliser, supervised count and checksums of labels, cu_seqlens, behavior
    log-probs and hidden states), one all_gather exchanges them, and every rank then raises
    the same ValueError when any rank's inputs were invalid or any field differs.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "vocab_parallel_group needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group)"
        )
    try:
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
    except (RuntimeError, ValueError, TypeError) as err:
        raise TypeError(f"vocab_parallel_group must be a torch.distributed ProcessGroup: {err}") from None
    if rank < 0:
        raise ValueError("this process is not a member of vocab_parallel_group")

    local_error: Optional[BaseException] = None
    checked = None
    backend_name = "torch"
    try:
        backend_name = requested_backend(backend)
        if backend_name not in ("auto", "torch"):
            raise ValueError(
                f"vocab_parallel_group is supported by the 'torch' backend only, got backend={backend_name!r} "
                "(pass backend='torch' or 'auto', or unset PEAR_KERNELS_BACKEND)"
            )
        if not torch.is_tensor(weight) or weight.dim() != 2:
            raise ValueError("lm_head_weight must be this rank's (V_shard, H) vocabulary shard")
        checked = check()
    except (ValueError, TypeError) as err:
        local_error = err

    device = weight.device if torch.is_tensor(weight) else torch.device("cpu")
    sig: List[int] = [0] * (len(SIGNATURE_FIELDS) + 1)  # + the shard size, which may differ
    if local_error is not None:
        sig[0] = 1
    else:
        flat_labels = checked.labels
        mask = checked.mask
        ni = num_items_in_batch
        if torch.is_tensor(ni):
            ni = ni.item()
        fields = [
            0, hidden.shape[-1], flat_labels.numel(), _code(str(hidden.dtype)), _code(hidden.device.type),
            int(chunk_size or 0), _code(config.variant.value), int(config.block_size), _bits(config.gamma),
            _bits(config.delta_clip[0]), _bits(config.delta_clip[1]), _bits(config.log_weight_clip[0]),
            _bits(config.log_weight_clip[1]), _code(reduction), _bits(temperature),
            _bits(ni) if ni is not None else -1, int(ignore_index), int(bias is not None),
            int(mask.sum()), _checksum(flat_labels), _checksum(cu_seqlens),
            _checksum(torch.where(mask, checked.behavior_logprobs, torch.zeros_like(checked.behavior_logprobs))),
            _checksum(checked.hidden), _code(backend_name), int(chunk_budget or 0),
        ]
        sig = fields + [int(weight.shape[0])]
    mine = torch.tensor(sig, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu().tolist()

    bad = [r for r, row in enumerate(table) if row[0] != 0]
    if bad:
        # every rank takes this branch (same table): one more collective to share the messages
        messages: List[Optional[str]] = [None] * world
        text = None if local_error is None else f"{type(local_error).__name__}: {local_error}"
        dist.all_gather_object(messages, text, group=group)
        detail = "; ".join(f"rank {r}: {messages[r]}" for r in bad)
        raise ValueError(f"vocab_parallel_group: invalid inputs on rank(s) {bad}: {detail}")
    for i, name in enumerate(SIGNATURE_FIELDS):
        values = [row[i] for row in table]
        if len(set(values)) != 1:
            hint = ""
            if name.endswith("checksum"):
                hint = " (hidden, labels, behavior_logprobs and cu_seqlens must be the same on every rank)"
            raise ValueError(
                f"vocab_parallel_group: the {name} differs between ranks{hint}; every rank must call "
                f"with the same arguments (only lm_head_weight/bias are per-rank shards). "
                f"Per rank: {_show(name, values)}"
            )
    sizes = [row[-1] for row in table]
    if any(size == 0 for size in sizes):
        raise ValueError(f"every rank of vocab_parallel_group needs a non-empty vocabulary shard, got {sizes}")
    return VocabParallel(group, sizes, rank), "torch", checked


def _show(name: str, values: List[int]) -> str:
    if name in ("gamma", "temperature", "num_items_in_batch") or "clip" in name:
        return str([struct.unpack("<d", struct.pack("<q", v))[0] if v != -1 else None for v in values])
    if name in ("dtype", "device type", "variant", "reduction", "backend"):
        return f"{len(set(values))} different values"
    return str(values)
