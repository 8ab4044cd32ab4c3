"""Bad input gets a clear error naming the argument; nothing is silently wrong."""

from __future__ import annotations

import pytest
import torch

from pear_kernels import fused_pear_loss, fused_token_logprobs, reference_pear_loss

from .conftest import make_problem


@pytest.fixture
def args():
    hidden, weight, labels, behavior, bias = make_problem((2, 6), 8, 20, torch.float32, bias=True)
    return dict(hidden=hidden, lm_head_weight=weight, labels=labels, behavior_logprobs=behavior, bias=bias)


def call(fn, a, **kw):
    a = dict(a)
    return fn(a.pop("hidden"), a.pop("lm_head_weight"), a.pop("labels"), a.pop("behavior_logprobs"), **a, **kw)


FNS = [fused_pear_loss, reference_pear_loss]


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize(
    "change, exc, name",
    [
        (dict(hidden=torch.zeros(2, 6)), ValueError, "hidden"),
        (dict(hidden=torch.zeros(2, 6, 8, dtype=torch.int64)), TypeError, "hidden"),
        (dict(lm_head_weight=torch.zeros(20, 9)), ValueError, "lm_head_weight"),
        (dict(lm_head_weight=torch.zeros(20, 8, dtype=torch.float64)), TypeError, "lm_head_weight"),
        (dict(labels=torch.zeros(2, 5, dtype=torch.int64)), ValueError, "labels"),
        (dict(labels=torch.zeros(2, 6)), TypeError, "labels"),
        (dict(behavior_logprobs=torch.zeros(12)), ValueError, "behavior_logprobs"),
        (dict(behavior_logprobs=torch.zeros(2, 6, dtype=torch.int64)), TypeError, "behavior_logprobs"),
        (dict(bias=torch.zeros(19)), ValueError, "bias"),
        (dict(bias=torch.zeros(20, dtype=torch.float64)), TypeError, "bias"),
        (dict(lm_head_weight=torch.zeros(20, 8, device="meta")), ValueError, "lm_head_weight"),
    ],
)
def test_shape_dtype_device(fn, args, change, exc, name):
    args.update(change)
    with pytest.raises(exc, match=name):
        call(fn, args)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("bad", [20, -1, -5, 10**6])
def test_label_range(fn, args, bad):
    args["labels"][1, 4] = bad
    with pytest.raises(ValueError, match=r"labels.*\[10\] = " + str(bad)):
        call(fn, args)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.5])
def test_behavior_logprobs_values(fn, args, bad):
    args["behavior_logprobs"][0, 5] = bad
    with pytest.raises(ValueError, match=r"behavior_logprobs.*\[5\]"):
        call(fn, args)


def test_behavior_values_on_masked_tokens_are_ignored(args):
    args["behavior_logprobs"][0, 0] = float("nan")  # a prompt token: never read
    args["behavior_logprobs"][0, 1] = float("-inf")  # teacher could not produce: clipped ratio
    args["labels"][0, 1] = 3
    loss = call(fused_pear_loss, args)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "cu, msg",
    [
        (torch.tensor([0, 5, 3, 12]), "non-decreasing"),
        (torch.tensor([0, 5, 11]), "end at"),
        (torch.tensor([1, 5, 12]), "start at 0"),
        (torch.tensor([0.0, 12.0]), "integer"),
        (torch.tensor([12]), "at least 2"),
    ],
)
def test_cu_seqlens(args, cu, msg):
    flat = {k: (v.reshape(12, -1).squeeze(-1) if k != "lm_head_weight" and k != "bias" else v) for k, v in args.items()}
    flat["hidden"] = args["hidden"].reshape(12, 8)
    with pytest.raises((ValueError, TypeError), match="cu_seqlens.*" + msg):
        call(fused_pear_loss, flat, cu_seqlens=cu)


def test_cu_seqlens_with_rows_is_refused(args):
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(fused_pear_loss, args, cu_seqlens=torch.tensor([0, 12]))


@pytest.mark.parametrize(
    "kw, exc, name",
    [
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
        (dict(num_items_in_batch=5, reduction="sum"), ValueError, "num_items_in_batch"),
        (dict(variant="seq"), ValueError, "variant"),
        (dict(gamma=2.0), ValueError, "gamma"),
        (dict(block_size=0), ValueError, "block_size"),
        (dict(delta_clip=(1.0, -1.0)), ValueError, "delta_clip"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(backend="cuda-magic"), ValueError, "backend"),
    ],
)
def test_options(args, kw, exc, name):
    with pytest.raises(exc, match=name):
        call(fused_pear_loss, args, **kw)


def test_token_logprobs_checks_labels(args):
    args["labels"][0, 3] = 99
    with pytest.raises(ValueError, match="labels"):
        fused_token_logprobs(args["hidden"], args["lm_head_weight"], args["labels"])


def test_token_logprobs_checks_chunk_size(args):
    with pytest.raises(ValueError, match="chunk_size"):
        fused_token_logprobs(args["hidden"], args["lm_head_weight"], args["labels"], chunk_size=0)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("kw, exc, name", [
    (dict(num_items_in_batch=10**400), ValueError, "num_items_in_batch"),  # beyond float: no OverflowError
    (dict(num_items_in_batch=float("inf")), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=torch.tensor(float("nan"))), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=torch.tensor([3.0, 4.0])), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=True), TypeError, "num_items_in_batch"),
    (dict(ignore_index=2**70), ValueError, "ignore_index"),  # beyond int64: no OverflowError
    (dict(ignore_index=None), TypeError, "ignore_index"),
    (dict(ignore_index=-100.0), TypeError, "ignore_index"),
])
def test_number_arguments_out_of_range(fn, args, kw, exc, name):
    with pytest.raises(exc, match=name):
        call(fn, args, **kw)


@pytest.mark.parametrize("fn", FNS)
def test_numpy_scalars_are_numbers(fn, args):
    """Data pipelines hand out numpy scalars: they are accepted like the Python numbers."""
    np = pytest.importorskip("numpy")
    base = call(fn, args, num_items_in_batch=7, variant="block", block_size=3)
    got = call(fn, args, num_items_in_batch=np.int64(7), ignore_index=np.int64(-100), variant="block",
               block_size=np.int32(3))
    assert float(got) == float(base)
    assert float(call(fn, args, num_items_in_batch=np.float32(7.0))) == float(call(fn, args, num_items_in_batch=7))
