"""A couple of steps of the whole SFT -> GRPO -> evaluation loop on a very small model."""

import copy
import itertools
import math

import pytest
import torch

pytest.importorskip("transformers")

from pear_kernels import PEARConfig  # noqa: E402
from pear_kernels.rl import (  # noqa: E402
    ChainSolverPolicy,
    CharTokenizer,
    GRPOConfig,
    GRPOTrainer,
    SFTConfig,
    SumChainTask,
    collect_sft_data,
    evaluate,
    generate,
    pass_at_k,
    sft_train,
    tiny_qwen2,
)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    task = SumChainTask(3, 3)
    held = task.held_out(4, seed=0)
    tok = CharTokenizer(task.alphabet, task.eos)
    data = collect_sft_data(task, ChainSolverPolicy(0.5), 64, seed=0)
    model = tiny_qwen2(tok.vocab_size, hidden_size=32, num_layers=1, intermediate_size=64, num_heads=2, num_kv_heads=1)
    return task, held, tok, data, model


@pytest.mark.parametrize("variant", ["none", "token", "block", "sequence"])
def test_sft_steps(setup, variant):
    task, _, tok, data, init = setup
    model = copy.deepcopy(init)
    before = model.lm_head.weight.detach().clone()
    hist = sft_train(model, tok, data, PEARConfig(variant=variant), SFTConfig(steps=3, batch_size=16, seed=0))
    assert len(hist["loss"]) == 3 and all(math.isfinite(x) for x in hist["loss"])
    assert not torch.equal(before, model.lm_head.weight)
    assert hist["weights"] and all(0.0 < w <= math.exp(5.0) for w in hist["weights"])
    if variant == "none":
        assert all(w == 1.0 for w in hist["weights"])


def test_sft_until_stops_early_and_is_called_each_step(setup):
    task, _, tok, data, init = setup
    model = copy.deepcopy(init)
    seen = []
    hist = sft_train(model, tok, data, PEARConfig(variant="none"), SFTConfig(steps=6, batch_size=16, seed=0),
                     until=lambda done: seen.append(done) or done == 4)
    assert seen == [1, 2, 3, 4] and len(hist["loss"]) == 4 and model.training
    ref = copy.deepcopy(init)
    full = sft_train(ref, tok, data, PEARConfig(variant="none"), SFTConfig(steps=6, batch_size=16, seed=0))
    assert full["loss"][:4] == hist["loss"]  # the same batches up to the stop


class ParityTask(SumChainTask):
    """An easy reward (even completion length) so that a random model sees both outcomes."""

    def reward(self, problem, completion):
        return float(len(completion) % 2 == 0)


def test_grpo_steps_and_evaluation(setup):
    _, held, tok, _, init = setup
    task = ParityTask(3, 3)
    model, ref = copy.deepcopy(init), copy.deepcopy(init)
    cfg = GRPOConfig(steps=2, prompts_per_step=3, group_size=4, kl_coef=0.05, updates_per_batch=2,
                     aggregation="constant-length", scale_rewards_by_std=False, lr=1e-2, seed=0)
    hist = GRPOTrainer(model, tok, task, cfg, ref_model=ref).train()
    assert len(hist) == 2
    for m in hist:
        for key in ("reward", "kl", "clip_fraction", "entropy", "length", "loss"):
            assert math.isfinite(m[key]), key
        assert 0.0 < m["reward"] < 1.0 and m["entropy"] > 0.0 and m["length"] >= 1
    # the second update of a batch is off the sampling policy: the ratio moved, KL to ref appeared
    assert hist[-1]["kl"] > 0.0 and hist[-1]["ratio_mean"] != 1.0
    assert not torch.equal(ref.lm_head.weight, model.lm_head.weight)
    res = evaluate(model, tok, task, held, n_samples=4, k=2, seed=0)
    assert set(res) == {"pass@1", "pass@2", "greedy"} and all(0.0 <= v <= 1.0 for v in res.values())
    with pytest.raises(ValueError, match="ref_model"):
        GRPOTrainer(model, tok, task, GRPOConfig(kl_coef=0.1))


def test_generate_stops_at_eos_and_is_reproducible(setup):
    task, held, tok, _, model = setup
    prompts = [p.prompt for p in held] + ["1+2+3:"] * 3
    a = generate(model, tok, prompts, 12, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = generate(model, tok, prompts, 12, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert a == b
    for text in a:
        assert len(text) <= 12 and (tok.eos not in text or text.index(tok.eos) == len(text) - 1)
    g1 = generate(model, tok, prompts, 12, temperature=0.0)
    assert g1[-1] == g1[-2] == g1[-3]


def test_pass_at_k_matches_enumeration():
    for n, c, k in [(8, 0, 1), (8, 3, 1), (8, 3, 4), (5, 5, 2), (6, 2, 5)]:
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
