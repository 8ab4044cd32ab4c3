"""Process-group workers for tests/test_distributed.py (gloo on 127.0.0.1, CPU only).

The ranks are started with ``torch.multiprocessing`` (fork where available, so they inherit the
imported torch/transformers; ``PEAR_TEST_START_METHOD=spawn`` re-imports this module instead),
each with one intra-op thread. Each worker writes what it computed to
``out_dir/<task>_rank<r>.pt`` and the test process compares it with the single-process oracle:
the assertions all live in the tests.

Inputs are rebuilt from seeds in every process (CPU generators are deterministic), so nothing
but results crosses a process boundary.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# -- vocabulary-parallel cases -----------------------------------------------------------------

VOCAB = 53  # odd, so even splits are uneven too
HIDDEN = 16

# name -> options. kind "loss" runs fused_pear_loss, "logprobs" fused_token_logprobs.
# "packed": (N, H) input with cu_seqlens; otherwise (B, T, H) rows with prompt, gap and padding.
VP_CASES: Dict[str, dict] = {
    "token_mean_bias_chunk5": dict(variant="token", reduction="mean", bias=True, chunk_size=5, stats=True),
    "block_sum": dict(variant="block", block_size=3, reduction="sum"),
    "sequence_packed_prepass_temp": dict(
        variant="sequence", reduction="mean", packed=True, chunk_size=4, temperature=0.7, bias=True
    ),
    "sequence_one_chunk": dict(variant="sequence", reduction="mean"),
    "none_num_items": dict(variant="none", reduction="mean", num_items=50.0, bias=True, chunk_size=7),
    "token_packed_none_reduction": dict(variant="token", reduction="none", packed=True, chunk_size=3, bias=True),
    "block_none_reduction": dict(variant="block", block_size=2, reduction="none", chunk_size=6),
    "logprobs_entropy": dict(kind="logprobs", bias=True, chunk_size=4, temperature=1.3),
    # 16/32-bit inputs: fp32 softmax math and, for bf16, a bf16 hidden gradient all-reduced
    "token_float32": dict(variant="token", reduction="mean", bias=True, chunk_size=6, dtype=torch.float32),
    "token_bfloat16": dict(variant="token", reduction="mean", chunk_size=6, dtype=torch.bfloat16),
}


def make_case(name: str):
    """float64 inputs of one case: hidden, weight, bias, labels, behavior, cu_seqlens, grad_out."""
    opts = VP_CASES[name]
    g = torch.Generator().manual_seed(1000 + sorted(VP_CASES).index(name))
    B, T = 3, 13
    hidden = torch.randn(B, T, HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64) * (2.0 / HIDDEN**0.5)
    bias = torch.randn(VOCAB, generator=g, dtype=torch.float64) * 0.3 if opts.get("bias") else None
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    labels[:, :3] = -100  # prompts
    labels[:, 7:9] = -100  # a masked span inside every sequence
    labels[-1, -2:] = -100  # padding
    labels[0, 4] = VOCAB - 1  # the last row of the last shard
    labels[1, 4] = 0
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    behavior = (logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=0.0)
    cu = None
    if opts.get("packed"):
        hidden, labels, behavior = hidden.reshape(B * T, HIDDEN), labels.reshape(-1), behavior.reshape(-1)
        cu = torch.tensor([0, 5, 5, 17, 30, B * T])  # uneven segments, one empty
    grad_out = torch.randn(labels.shape, generator=g, dtype=torch.float64)
    dtype = opts.get("dtype", torch.float64)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    return dict(hidden=hidden, weight=weight, bias=bias, labels=labels, behavior=behavior,
                cu_seqlens=cu, grad_out=grad_out)


def run_case(name: str, hidden, weight, bias, labels, behavior, cu_seqlens, grad_out, group=None):
    """Forward + backward of one case; ``weight``/``bias`` may be a shard (with ``group``)."""
    from pear_kernels import fused_pear_loss, fused_token_logprobs

    opts = VP_CASES[name]
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True) if bias is not None else None
    out: dict = {}
    extra = {} if group is None else {"vocab_parallel_group": group}
    if opts.get("kind") == "logprobs":
        logp, ent = fused_token_logprobs(
            h, w, labels, bias=b, temperature=opts.get("temperature", 1.0), return_entropy=True,
            chunk_size=opts.get("chunk_size"), **extra,
        )
        (logp * grad_out).sum().backward()
        out.update(logp=logp.detach(), entropy=ent.detach())
    else:
        res = fused_pear_loss(
            h, w, labels, behavior, bias=b, variant=opts["variant"], block_size=opts.get("block_size"),
            cu_seqlens=cu_seqlens, temperature=opts.get("temperature", 1.0), reduction=opts["reduction"],
            num_items_in_batch=opts.get("num_items"), chunk_size=opts.get("chunk_size"),
            return_stats=opts.get("stats", False), **extra,
        )
        loss, stats = res if opts.get("stats") else (res, None)
        (loss * grad_out).sum().backward() if opts["reduction"] == "none" else loss.backward()
        out["loss"] = loss.detach()
        if stats is not None:
            out["weights"] = stats.weights
            out["ess"] = stats.ess
    out.update(dh=h.grad, dw=w.grad, db=b.grad if b is not None else None)
    return out


def shard_sizes(world: int) -> List[int]:
    """Uneven contiguous shards (including a one-row shard) for 4 ranks; the even split otherwise."""
    if world == 4:
        return [20, 1, 17, 15]
    base, extra = divmod(VOCAB, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def _vp_task(rank: int, world: int, group, sizes: List[int], group_rank: int) -> dict:
    start = sum(sizes[:group_rank])
    end = start + sizes[group_rank]
    results = {"range": (start, end)}
    for name in VP_CASES:
        c = make_case(name)
        w = c["weight"][start:end]
        b = c["bias"][start:end] if c["bias"] is not None else None
        results[name] = run_case(name, c["hidden"], w, b, c["labels"], c["behavior"], c["cu_seqlens"],
                                 c["grad_out"], group=group)
    # errors: they must be raised on every rank alike (nobody left waiting in a collective)
    c = make_case("block_sum")
    w = c["weight"][start:end]
    errors = {}
    from pear_kernels import fused_pear_loss

    r = group_rank
    hid, beh, labels = c["hidden"], c["behavior"], c["labels"]
    sup = (labels >= 0).nonzero()
    first = tuple(sup[0].tolist())

    def with_(t, idx, value):
        t = t.clone()
        t[idx] = value
        return t

    # each scenario: the arguments of fused_pear_loss on this rank (only rank 1 differs)
    scenarios = {
        "backend": dict(backend="triton"),
        "label_out_of_range": dict(labels=torch.where(labels >= 0, VOCAB, -100)),
        "chunk_mismatch": dict(chunk_size=3 + group_rank),
        "nan_behavior_one_rank": dict(behavior=with_(beh, first, float("nan")) if r == 1 else beh),
        "bad_label_one_rank": dict(labels=with_(labels, first, 10**6) if r == 1 else labels),
        "supervised_count": dict(labels=with_(labels, first, -100) if r == 1 else labels),
        "labels_differ": dict(labels=with_(labels, first, (int(labels[first]) + 1) % VOCAB) if r == 1 else labels),
        "variant": dict(variant="token" if r == 1 else "block"),
        "reduction": dict(reduction="sum" if r == 1 else "mean"),
        "dtype": dict(hidden=hid.float() if r == 1 else hid, weight=w.float() if r == 1 else w),
        "hidden_size": dict(hidden=hid[..., :-1] if r == 1 else hid, weight=w[:, :-1] if r == 1 else w),
        "behavior_differs": dict(behavior=beh - 0.5 * r),
        "hidden_differs": dict(hidden=hid + 0.01 * r),
        "num_items": dict(num_items_in_batch=10.0 + r),
    }
    for key, kwargs in scenarios.items():
        args = dict(hidden=hid, weight=w, labels=labels, behavior=beh)
        args.update(kwargs)
        h_, w_, y_, b_ = (args.pop(k) for k in ("hidden", "weight", "labels", "behavior"))
        if "variant" not in args:
            args["variant"] = "block"
        try:
            fused_pear_loss(h_, w_, y_, b_, vocab_parallel_group=group, **args)
            errors[key] = None
        except (ValueError, TypeError) as err:
            errors[key] = f"{type(err).__name__}: {err}"
    results["errors"] = errors
    return results


def task_vocab_parallel(rank: int, world: int) -> dict:
    """Every case with the vocabulary split over all ranks (uneven shards for 4 ranks)."""
    return _vp_task(rank, world, dist.group.WORLD, shard_sizes(world), rank)


def task_vocab_parallel_subgroups(rank: int, world: int) -> dict:
    """2-D layout: tensor-parallel groups of 2 ranks ({0,1}, {2,3}); the groups run concurrently."""
    groups = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]
    group = groups[rank // 2]
    return _vp_task(rank, world, group, shard_sizes(2), rank % 2)


def task_num_items(rank: int, world: int) -> dict:
    from pear_kernels.distributed import global_num_items

    labels = torch.full((2, 5), -100)
    labels[:, : rank + 1] = 7  # rank r supervises 2 (r + 1) tokens
    return {"global": global_num_items(labels), "local": int((labels != -100).sum())}


# -- data-parallel training of a tiny Hugging Face model ---------------------------------------

GLOBAL_BATCH, SEQ_LEN, STEPS, LR = 4, 16, 5, 0.5


def build_model(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    return PearLM(Qwen2ForCausalLM(config))


class PearLM(torch.nn.Module):
    """A causal LM whose forward returns the fused PEAR loss (what the HF patch will do).

    The loss is computed inside forward so FSDP has the lm_head weight unsharded while it runs.
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, labels, behavior, num_items_in_batch=None):
        from pear_kernels import fused_pear_loss

        hidden = self.lm.model(input_ids=input_ids).last_hidden_state
        return fused_pear_loss(
            hidden[:, :-1], self.lm.lm_head.weight, labels[:, 1:], behavior[:, 1:],
            num_items_in_batch=num_items_in_batch, chunk_size=16,
        )


def make_batch(step: int):
    """Global batch of one step: rows with different prompt lengths and padding, so the ranks
    hold different numbers of supervised tokens (a per-rank mean would then be wrong).

    Two batches alternate, so the curve both moves (each is seen again) and covers more than one
    batch."""
    g = torch.Generator().manual_seed(7 + step % 2)
    ids = torch.randint(0, 128, (GLOBAL_BATCH, SEQ_LEN), generator=g)
    labels = ids.clone()
    for r, prompt in enumerate((2, 9, 4, 12)):
        labels[r, :prompt] = -100
    labels[1, -3:] = -100
    behavior = -torch.rand(GLOBAL_BATCH, SEQ_LEN, generator=g, dtype=torch.float32) * 6.0
    return ids, labels, behavior


def train_single_process(steps: int = STEPS) -> List[float]:
    model = build_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    curve = []
    for step in range(steps):
        ids, labels, behavior = make_batch(step)
        loss = model(ids, labels, behavior)
        loss.backward()
        opt.step()
        opt.zero_grad()
        curve.append(loss.item())
    return curve


def _train_distributed(rank: int, world: int, wrap, local_mean: bool = False) -> dict:
    """``local_mean``: the naive normalizer (each rank's own token mean), to show it is wrong."""
    from pear_kernels.distributed import global_num_items

    model = wrap(build_model())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    per_rank = GLOBAL_BATCH // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    curve, local_counts = [], []
    for step in range(STEPS):
        ids, labels, behavior = make_batch(step)
        ids, labels, behavior = ids[rows], labels[rows], behavior[rows]
        if local_mean:
            loss = model(ids, labels, behavior)
            loss.backward()
            loss = loss / world  # logged: the average of the ranks' means
        else:
            n = global_num_items(labels[:, 1:])
            loss = model(ids, labels, behavior, num_items_in_batch=n)
            # DDP/FSDP average gradients over ranks; this rank's share of the global mean is `loss`
            (loss * world).backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        curve.append(total.item())
        local_counts.append(int((labels[:, 1:] != -100).sum()))
    return {"curve": curve, "local_counts": local_counts}


def task_ddp(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    return _train_distributed(rank, world, lambda m: DistributedDataParallel(m))


def task_ddp_local_mean(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    return _train_distributed(rank, world, lambda m: DistributedDataParallel(m), local_mean=True)


def task_fsdp(rank: int, world: int) -> dict:
    """FSDP2 (``fully_shard``): each decoder layer, then the root (embeddings, norm, lm_head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))

    probe = {}

    def wrap(model):
        for layer in model.lm.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # proof that the parameters really are sharded: DTensors holding 1/world of the rows
        weight = model.lm.lm_head.weight
        probe["lm_head"] = (type(weight).__name__, tuple(weight.to_local().shape))
        return model

    out = _train_distributed(rank, world, wrap)
    out.update(probe)
    return out


def task_fsdp1(rank: int, world: int) -> dict:
    """FSDP1 (accelerate's default ``fsdp_version``): one unit per decoder layer, use_orig_params."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    def wrap(model):
        return FullyShardedDataParallel(
            model, auto_wrap_policy=ModuleWrapPolicy({Qwen2DecoderLayer}),
            device_id=torch.device("cpu"), use_orig_params=True,
        )

    return _train_distributed(rank, world, wrap)


TASKS = {
    "vocab_parallel": task_vocab_parallel,
    "vocab_parallel_subgroups": task_vocab_parallel_subgroups,
    "num_items": task_num_items,
    "ddp": task_ddp,
    "ddp_local_mean": task_ddp_local_mean,
    "fsdp": task_fsdp,
    "fsdp1": task_fsdp1,
}


# -- launcher ------------------------------------------------------------------------------------


# fork: the children inherit the imported torch (a spawn start re-imports it in every rank:
# seconds of CPU each on a shared machine). Each rank sets one intra-op thread right away.
START_METHOD = os.environ.get("PEAR_TEST_START_METHOD", "fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, tasks: List[str]) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        for task in tasks:
            start = time.perf_counter()
            try:
                result = {"ok": True, "value": TASKS[task](rank, world)}
            except Exception:  # reported by the test that reads this task
                result = {"ok": False, "error": traceback.format_exc()}
            result["seconds"] = time.perf_counter() - start
            torch.save(result, os.path.join(out_dir, f"{task}_rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(world: int, tasks: List[str], out_dir: str, timeout: float = 300.0) -> Dict[str, List[dict]]:
    """Run ``tasks`` on ``world`` gloo processes; returns {task: [result of rank 0, 1, ...]}."""
    if START_METHOD == "fork" and {"ddp", "ddp_local_mean", "fsdp", "fsdp1"} & set(tasks):
        try:  # import once here, so that every forked rank inherits it
            import transformers.models.qwen2.modeling_qwen2  # noqa: F401
        except ImportError:  # the training tasks then report it and their tests skip
            pass
    for attempt in range(3):
        try:
            _run(world, tasks, out_dir, timeout)
            break
        except mp.ProcessRaisedException as err:
            # the free port was taken by someone else between probing and binding: try another
            if "address already in use" not in str(err).lower() or attempt == 2:
                raise
    out: Dict[str, List[dict]] = {}
    for task in tasks:
        out[task] = [torch.load(os.path.join(out_dir, f"{task}_rank{r}.pt"), weights_only=False)
                     for r in range(world)]
    return out


def _run(world: int, tasks: List[str], out_dir: str, timeout: float) -> None:
    ctx = mp.start_processes(
        _worker, args=(world, _free_port(), out_dir, tasks), nprocs=world, join=False, start_method=START_METHOD
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            raise TimeoutError(f"distributed workers did not finish {tasks} within {timeout} s")
