"""torch.distributed demo: vocabulary-parallel PEAR and the global loss normalizer.

    torchrun --nproc_per_node 2 examples/distributed.py            # CPU, gloo
    torchrun --nproc_per_node 8 examples/distributed.py --cuda     # one GPU per rank, NCCL

1. Vocabulary parallel: every rank holds one contiguous shard of the lm_head rows and calls
   fused_pear_loss(..., vocab_parallel_group=...). The loss and the gradients are compared with
   the single-process loss, which every rank also computes from the full weight for the demo.
2. Data parallel: every rank holds a slice of the batch and normalises by global_num_items. The
   sum over ranks is compared with the loss of the whole batch in one process.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from pear_kernels import fused_pear_loss
from pear_kernels.distributed import global_num_items, vocab_shard_range


def make_batch(device, dtype, batch=8, seq=64, hidden=128, vocab=5003):
    g = torch.Generator().manual_seed(0)  # the same batch on every rank
    h = torch.randn(batch, seq, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / hidden**0.5
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    for r in range(batch):
        labels[r, : 4 + 5 * r] = -100  # prompts of different lengths
    behavior = -torch.rand(batch, seq, generator=g, dtype=torch.float64) * 8
    return h.to(device, dtype), w.to(device, dtype), labels.to(device), behavior.to(device, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="NCCL on one GPU per rank")
    args = parser.parse_args()
    if args.cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if args.cuda else torch.device("cpu")
    dtype = torch.float32 if args.cuda else torch.float64
    hidden, weight, labels, behavior = make_batch(device, dtype)

    # 1. vocabulary parallel over all ranks
    start, end = vocab_shard_range(weight.shape[0])
    h = hidden.clone().requires_grad_(True)
    shard = weight[start:end].clone().requires_grad_(True)
    loss = fused_pear_loss(h, shard, labels, behavior, vocab_parallel_group=dist.group.WORLD)
    loss.backward()

    h1 = hidden.clone().requires_grad_(True)
    w1 = weight.clone().requires_grad_(True)
    loss1 = fused_pear_loss(h1, w1, labels, behavior)
    loss1.backward()
    err = torch.stack([
        (loss - loss1).abs().double(),
        (h.grad - h1.grad).abs().max().double(),
        (shard.grad - w1.grad[start:end]).abs().max().double(),
    ])
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"vocab parallel over {world} ranks (shard {end - start} of {weight.shape[0]} rows on rank 0): "
              f"loss {loss.item():.6f}; max |diff| vs one process: loss {err[0]:.2e}, "
              f"grad hidden {err[1]:.2e}, grad weight shard {err[2]:.2e}")

    # 2. data parallel: rows split over ranks, global normaliser
    rows = torch.arange(labels.shape[0], device=device) % world == rank
    n = global_num_items(labels[rows])
    part = fused_pear_loss(hidden[rows], weight, labels[rows], behavior[rows], num_items_in_batch=n)
    total = part.detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        print(f"data parallel: {int(n)} supervised tokens in the global batch; sum of rank losses "
              f"{total.item():.6f} vs one process {loss1.item():.6f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
