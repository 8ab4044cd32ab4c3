"""pear_weights against a direct float64 loop over the spec's definitions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pear_kernels import PEARConfig, pear_log_weights, pear_weights


def direct_log_weights(seqs, cfg: PEARConfig):
    """seqs: list of lists of (log_ratio or None for masked). Returns the same nesting."""
    lo, hi = cfg.delta_clip
    wlo, whi = cfg.log_weight_clip
    lg = math.log(cfg.gamma)
    out = []
    for seq in seqs:
        sup = [i for i, x in enumerate(seq) if x is not None]
        d = [min(max(seq[i], lo), hi) for i in sup]
        T = len(d)
        res = [None] * len(seq)
        for t in range(1, T + 1):  # 1-based, as in the spec
            if cfg.variant.value == "token":
                g = (T - t) * lg + sum(d[j - 1] for j in range(t + 1, T + 1))
            elif cfg.variant.value == "block":
                B = cfg.block_size
                k = (t - 1) // B + 1
                K = math.ceil(T / B)
                e_k = min(k * B, T)
                rho = [sum(d[(m - 1) * B : min(m * B, T)]) for m in range(1, K + 1)]
                g = (T - e_k) * lg + sum(rho[m - 1] for m in range(k + 1, K + 1))
            elif cfg.variant.value == "sequence":
                g = sum(d)
            else:
                g = 0.0
            res[sup[t - 1]] = min(max(g, wlo), whi)
        out.append(res)
    return out


def _pack(seqs):
    flat = [x for s in seqs for x in s]
    lr = torch.tensor([0.0 if x is None else x for x in flat], dtype=torch.float64)
    mask = torch.tensor([x is not None for x in flat], dtype=torch.bool)
    cu = torch.tensor([0] + list(torch.cumsum(torch.tensor([len(s) for s in seqs]), 0)), dtype=torch.int64)
    return lr, mask, cu


ratio = st.one_of(st.none(), st.floats(-3, 3, allow_nan=False, width=64))
sequences = st.lists(st.lists(ratio, min_size=1, max_size=11), min_size=1, max_size=4)
configs = st.builds(
    PEARConfig,
    variant=st.sampled_from(["token", "block", "sequence", "none"]),
    gamma=st.sampled_from([1.0, 0.999, 0.9, 0.5]),
    block_size=st.integers(1, 5),
    delta_clip=st.sampled_from([(-0.08, 0.3), (-1.0, 1.0), (-5.0, 5.0)]),
    log_weight_clip=st.sampled_from([(-10.0, 5.0), (-1.0, 0.5), (-100.0, 100.0)]),
)


@settings(max_examples=150, deadline=None)
@given(seqs=sequences, cfg=configs)
def test_packed_matches_direct_loop(seqs, cfg):
    lr, mask, cu = _pack(seqs)
    got = pear_log_weights(lr, mask, config=cfg, cu_seqlens=cu)
    want = direct_log_weights(seqs, cfg)
    flat_want = [0.0 if x is None else x for s in want for x in s]
    torch.testing.assert_close(got, torch.tensor(flat_want, dtype=torch.float64), rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    length=st.integers(1, 9),
    data=st.data(),
    cfg=configs,
)
def test_batched_rows_match_direct_loop(rows, length, data, cfg):
    seqs = [data.draw(st.lists(ratio, min_size=length, max_size=length)) for _ in range(rows)]
    lr, mask, _ = _pack(seqs)
    got = pear_weights(lr.view(rows, length), mask.view(rows, length), config=cfg)
    want = direct_log_weights(seqs, cfg)
    exp = torch.tensor([[0.0 if x is None else math.exp(x) for x in s] for s in want], dtype=torch.float64)
    torch.testing.assert_close(got, exp, rtol=1e-12, atol=0)


@settings(max_examples=60, deadline=None)
@given(seqs=sequences, gamma=st.sampled_from([1.0, 0.99, 0.7]))
def test_block_size_one_is_token(seqs, gamma):
    lr, mask, cu = _pack(seqs)
    a = pear_log_weights(lr, mask, cu_seqlens=cu, variant="block", block_size=1, gamma=gamma)
    b = pear_log_weights(lr, mask, cu_seqlens=cu, variant="token", gamma=gamma)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_hand_computed_token_block_sequence():
    # one sequence, T = 5 supervised tokens, no clipping in play
    lr = torch.tensor([0.1, -0.05, 0.2, 0.0, 0.3], dtype=torch.float64)
    cfg = dict(gamma=0.5, delta_clip=(-1, 1), log_weight_clip=(-50, 50))
    lg = math.log(0.5)
    tok = pear_log_weights(lr, variant="token", **cfg)
    want = [4 * lg + 0.45, 3 * lg + 0.5, 2 * lg + 0.3, lg + 0.3, 0.0]
    torch.testing.assert_close(tok, torch.tensor(want, dtype=torch.float64))
    blk = pear_log_weights(lr, variant="block", block_size=2, **cfg)
    # blocks {1,2} {3,4} {5}: e = 2, 4, 5
    want_b = [3 * lg + 0.5, 3 * lg + 0.5, lg + 0.3, lg + 0.3, 0.0]
    torch.testing.assert_close(blk, torch.tensor(want_b, dtype=torch.float64))
    seq = pear_log_weights(lr, variant="sequence", **cfg)
    torch.testing.assert_close(seq, torch.full((5,), 0.55, dtype=torch.float64))


def test_extreme_ratios_are_finite_and_masked_are_zero():
    lr = torch.tensor([[1e4, -1e4, float("inf"), 0.0], [-float("inf"), 1e30, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    for variant in ("token", "block", "sequence", "none"):
        w = pear_weights(lr, mask, variant=variant, delta_clip=(-1e5, 1e5))
        assert torch.isfinite(w).all()
        assert (w[~mask] == 0).all()
        assert (w[mask] <= math.exp(5.0) + 1e-9).all() and (w[mask] >= math.exp(-10.0) - 1e-12).all()


def test_all_masked_and_length_one():
    lr = torch.zeros(2, 3, dtype=torch.float64)
    assert (pear_weights(lr, torch.zeros(2, 3, dtype=torch.bool)) == 0).all()
    one = pear_weights(torch.tensor([[0.2]]), torch.tensor([[True]]))
    assert one.item() == pytest.approx(1.0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mask"):
        pear_weights(torch.zeros(3), torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        pear_weights(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="cu_seqlens"):
        pear_weights(torch.zeros(4), cu_seqlens=torch.tensor([0, 3, 2, 4]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        pear_weights(torch.zeros(4), cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="log_ratio"):
        pear_weights(torch.zeros(4, dtype=torch.int64))


@pytest.mark.parametrize("dtype, high", [(torch.float16, 12.0), (torch.float32, 89.0), (torch.float64, 710.0)])
def test_pear_weights_refuse_a_clip_that_overflows_their_dtype(dtype, high):
    """pear_weights returns exp(log-weight) in log_ratio's dtype: an upper log-weight clip whose
    exp overflows it would hand back inf weights; pear_log_weights (float64 logs) still works."""
    lr = torch.full((6,), 200.0, dtype=dtype)
    kw = dict(variant="sequence", delta_clip=(-1.0, 1e3), log_weight_clip=(-10.0, high))
    with pytest.raises(ValueError, match="log_weight_clip"):
        pear_weights(lr, **kw)
    assert torch.isfinite(pear_log_weights(lr, **kw)).all()
    ok = dict(kw, log_weight_clip=(-10.0, high - 1.0))
    assert torch.isfinite(pear_weights(lr, **ok)).all()
