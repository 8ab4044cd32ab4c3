"""torch.distributed on CPU (gloo, 127.0.0.1): vocabulary-parallel PEAR and DDP/FSDP training.

Two process launches serve every test here (processes are expensive on a shared machine):
2 ranks (vocabulary parallel over both, global_num_items, DDP, FSDP2 and FSDP1 training of a
tiny Qwen2, and DDP with the wrong per-rank normalizer as a counter-check) and 4 ranks (vocabulary parallel with uneven shards, then two concurrent
tensor-parallel groups of 2). The workers (tests/dist_workers.py) only compute and save; the
comparisons with the float64 single-process oracle happen here.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pear_kernels import fused_pear_loss, reference_pear_loss
from pear_kernels.distributed import global_num_items, vocab_shard_range
from tests import dist_workers as W

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

# float64: only the summation order differs. 16/32-bit: vs the float64 oracle on the same
# (rounded) inputs; bf16 gradients are stored in bf16 (relative step 2^-8).
TOLERANCE = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=2e-3, rtol=1.6e-2),
}


def _unwrap(results):
    errors = [r["error"] for r in results if not r["ok"]]
    if errors:
        pytest.fail("worker failed:\n" + errors[0])
    return [r["value"] for r in results]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tasks = ["vocab_parallel", "num_items", "ddp", "fsdp", "fsdp1", "ddp_local_mean"]
    return W.launch(2, tasks, str(tmp_path_factory.mktemp("dist2")))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return W.launch(
        4, ["vocab_parallel", "vocab_parallel_subgroups", "num_items"], str(tmp_path_factory.mktemp("dist4"))
    )


# -- the single-process oracle -------------------------------------------------------------------


def _reference(name: str) -> dict:
    c = W.make_case(name)
    opts = W.VP_CASES[name]
    h = c["hidden"].double().requires_grad_(True)
    w = c["weight"].double().requires_grad_(True)
    b = c["bias"].double().requires_grad_(True) if c["bias"] is not None else None
    out = {}
    if opts.get("kind") == "logprobs":
        logits = h @ w.t() + (b if b is not None else 0.0)
        logprobs = torch.log_softmax(logits / opts.get("temperature", 1.0), -1)
        mask = c["labels"] != -100
        logp = logprobs.gather(-1, c["labels"].clamp(min=0)[..., None])[..., 0] * mask
        ent = -(logprobs.exp() * logprobs).sum(-1) * mask
        (logp * c["grad_out"]).sum().backward()
        out.update(logp=logp.detach(), entropy=ent.detach())
    else:
        res = reference_pear_loss(
            h, w, c["labels"], c["behavior"], bias=b, variant=opts["variant"], block_size=opts.get("block_size"),
            cu_seqlens=c["cu_seqlens"], temperature=opts.get("temperature", 1.0), reduction=opts["reduction"],
            num_items_in_batch=opts.get("num_items"), return_stats=opts.get("stats", False),
            compute_dtype=torch.float64,
        )
        loss, stats = res if opts.get("stats") else (res, None)
        (loss * c["grad_out"]).sum().backward() if opts["reduction"] == "none" else loss.backward()
        out["loss"] = loss.detach()
        if stats is not None:
            out["weights"], out["ess"] = stats.weights, stats.ess
    out.update(dh=h.grad, dw=w.grad, db=b.grad if b is not None else None)
    return out


def _check_vocab_parallel(per_rank, name, group_of):
    """per_rank[r][name] against the oracle; group_of(r) lists the ranks of r's group in order."""
    ref = _reference(name)
    tol = TOLERANCE[W.VP_CASES[name].get("dtype", torch.float64)]
    for r, res in enumerate(per_rank):
        got = res[name]
        # replicated outputs: identical to the single-process result on every rank
        for key in ("loss", "logp", "entropy", "weights", "ess"):
            if key in ref:
                torch.testing.assert_close(got[key].double(), ref[key].double(), **tol,
                                           msg=lambda m, k=key: f"rank {r} {k}: {m}")
        # the hidden gradient is the full one on every rank (reduced inside the op)
        torch.testing.assert_close(got["dh"].double(), ref["dh"], **tol,
                                   msg=lambda m: f"rank {r} grad hidden: {m}")
        start, end = res["range"]
        torch.testing.assert_close(got["dw"].double(), ref["dw"][start:end], **tol,
                                   msg=lambda m: f"rank {r} grad weight shard: {m}")
        if ref["db"] is not None:
            torch.testing.assert_close(got["db"].double(), ref["db"][start:end], **tol,
                                       msg=lambda m: f"rank {r} grad bias shard: {m}")
    dtype = W.VP_CASES[name].get("dtype", torch.float64)
    if dtype != torch.float64:
        # the sharded run against the single-process fused loss in the same dtype: the logits
        # are the same dot products, so the loss agrees to rounding and the gradients to the
        # rounding of the partial hidden gradients before their all-reduce (one bf16 ulp)
        same = W.run_case(name, **W.make_case(name))
        grad_tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=8e-3)
        for r, res in enumerate(per_rank):
            start, end = res["range"]
            torch.testing.assert_close(res[name]["loss"], same["loss"], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(res[name]["dh"], same["dh"], **grad_tol)
            torch.testing.assert_close(res[name]["dw"], same["dw"][start:end], **grad_tol)
    for r in range(len(per_rank)):
        ranks = group_of(r)
        ranges = [per_rank[q]["range"] for q in ranks]
        assert ranges[0][0] == 0 and ranges[-1][1] == W.VOCAB
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("name", sorted(W.VP_CASES))
def test_vocab_parallel_2_ranks(two_ranks, name):
    _check_vocab_parallel(_unwrap(two_ranks["vocab_parallel"]), name, lambda r: [0, 1])


@pytest.mark.parametrize("name", sorted(W.VP_CASES))
def test_vocab_parallel_4_ranks_uneven(four_ranks, name):
    per_rank = _unwrap(four_ranks["vocab_parallel"])
    assert [e - s for s, e in (p["range"] for p in per_rank)] == W.shard_sizes(4)
    _check_vocab_parallel(per_rank, name, lambda r: [0, 1, 2, 3])


@pytest.mark.parametrize("name", sorted(W.VP_CASES))
def test_vocab_parallel_subgroups(four_ranks, name):
    """Two tensor-parallel groups ({0,1}, {2,3}) at once: collectives stay inside each group."""
    _check_vocab_parallel(_unwrap(four_ranks["vocab_parallel_subgroups"]), name,
                          lambda r: [r - r % 2, r - r % 2 + 1])


@pytest.mark.parametrize("run", ["two_ranks", "four_ranks"])
def test_vocab_parallel_errors_on_every_rank(run, request):
    for res in _unwrap(request.getfixturevalue(run)["vocab_parallel"]):
        err = res["errors"]
        assert err["backend"] is not None and err["backend"].startswith("ValueError") and "backend" in err["backend"]
        # validated against the global vocabulary, not the shard
        assert err["label_out_of_range"] is not None and f"[0, {W.VOCAB})" in err["label_out_of_range"]
        assert err["chunk_mismatch"] is not None and "chunk_size differs" in err["chunk_mismatch"]
        # issue: a problem on one rank, or ranks that disagree, raise the same error on
        # every rank (never a hang, an abort or a silently wrong loss)
        expected = {
            "nan_behavior_one_rank": "invalid inputs on rank(s) [1]",
            "bad_label_one_rank": "labels checksum differs",
            "supervised_count": "supervised token count differs",
            "labels_differ": "labels checksum differs",
            "variant": "variant differs",
            "reduction": "reduction differs",
            "dtype": "dtype differs",
            "hidden_size": "hidden size H differs",
            "behavior_differs": "behavior_logprobs checksum differs",
            "hidden_differs": "hidden checksum differs",
            "num_items": "num_items_in_batch differs",
        }
        for key, text in expected.items():
            assert err[key] is not None and err[key].startswith("ValueError") and text in err[key], (key, err[key])


@pytest.mark.parametrize("run,world", [("two_ranks", 2), ("four_ranks", 4)])
def test_global_num_items(run, world, request):
    per_rank = _unwrap(request.getfixturevalue(run)["num_items"])
    expected = sum(2 * (r + 1) for r in range(world))
    assert [int(p["global"]) for p in per_rank] == [expected] * world
    assert [p["local"] for p in per_rank] == [2 * (r + 1) for r in range(world)]


# -- data parallel training ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_process_curve():
    pytest.importorskip("transformers")
    return W.train_single_process()


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp1"])
def test_data_parallel_loss_curve_matches_one_process(two_ranks, single_process_curve, mode):
    per_rank = _unwrap(two_ranks[mode])
    ref = torch.tensor(single_process_curve, dtype=torch.float64)
    for res in per_rank:
        curve = torch.tensor(res["curve"], dtype=torch.float64)
        torch.testing.assert_close(curve, ref, atol=2e-5, rtol=1e-5)
    # the parameters must actually move, or matching curves would prove little (the PEAR loss
    # need not fall monotonically: the weights follow the model's own log-probs)
    assert float(ref.max() - ref.min()) > 0.05
    # the ranks held different token counts, so a per-rank mean would have been wrong
    assert per_rank[0]["local_counts"] != per_rank[1]["local_counts"]
    if mode == "fsdp":
        assert per_rank[0]["lm_head"] == ("DTensor", (64, 64))  # 128 vocabulary rows over 2 ranks


def test_per_rank_mean_gives_another_curve(two_ranks, single_process_curve):
    """Sanity of the test above: with each rank's own token mean (no global normalizer) the
    2-process curve leaves the 1-process one, so the tolerance there does catch it."""
    curve = torch.tensor(_unwrap(two_ranks["ddp_local_mean"])[0]["curve"], dtype=torch.float64)
    ref = torch.tensor(single_process_curve, dtype=torch.float64)
    assert float((curve - ref).abs().max()) > 1e-2


# -- single-process API checks (no process group) ---------------------------------------------------


def test_vocab_shard_range_partitions():
    for vocab in (1, 5, 53, 128):
        for world in range(1, 6):
            if vocab < world:
                with pytest.raises(ValueError, match="smaller than the group size"):
                    vocab_shard_range(vocab, rank=0, world_size=world)
                continue
            ranges = [vocab_shard_range(vocab, rank=r, world_size=world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == vocab
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [e - s for s, e in ranges]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert vocab_shard_range(10) == (0, 10)  # no process group: one rank holds everything
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_shard_range(0)
    with pytest.raises(ValueError, match="rank"):
        vocab_shard_range(10, rank=3, world_size=2)


def test_global_num_items_without_process_group():
    labels = torch.tensor([[-100, 3, 4], [5, -100, -100]])
    assert int(global_num_items(labels)) == 3
    assert int(global_num_items(labels, ignore_index=4)) == 5
    with pytest.raises(TypeError, match="labels"):
        global_num_items(labels.float())


def test_vocab_parallel_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    labels, behavior = torch.tensor([1, 2, 3, 4]), torch.full((4,), -1.0)
    with pytest.raises(ValueError, match="init_process_group"):
        fused_pear_loss(hidden, weight, labels, behavior, vocab_parallel_group=object())
