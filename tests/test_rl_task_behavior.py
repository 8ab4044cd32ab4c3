"""The verifiable task's checker, the tokenizer, and the behavior policy's exact log-probs."""

import collections
import math
import random

import pytest

from pear_kernels.rl.batching import encode_batch
from pear_kernels.rl.behavior import ChainSolverPolicy
from pear_kernels.rl.tasks import ReasoningGymTask, SumChainTask, check_chain, parse_answer
from pear_kernels.rl.tokenizer import CharTokenizer


def test_checker_exact():
    task = SumChainTask()
    p = task.make([3, 5, 2, 7])
    assert p.prompt == "3+5+2+7:" and p.answer == "17"
    assert task.reward(p, "3+5=8+2=10+7=17.") == 1.0
    assert task.reward(p, "7+2=9+5=14+3=17.") == 1.0
    assert task.reward(p, "3+5=8+2=10+7=18.") == 0.0  # wrong answer
    assert task.reward(p, "3+5=8+2=10+7=17") == 0.0  # no end marker
    assert task.reward(p, "17.") == 0.0  # no '='
    assert task.reward(p, "3+5=8+2=10+7=017.") == 1.0  # the number, not its spelling
    assert task.reward(p, "3+5=8+2=10+7=1+7.") == 0.0
    assert parse_answer("1+2=3.junk") == 3
    # the strict verifier checks the whole chain
    assert check_chain(p.data, "7+2=9+5=14+3=17.")
    assert not check_chain(p.data, "3+5=8+2=10+7=17.x")
    assert not check_chain(p.data, "3+5=9+2=11+6=17.")  # wrong partial sums
    assert not check_chain(p.data, "3+5=8+5=13+4=17.")  # operands not the problem's


def test_held_out_problems_never_sampled_for_training():
    task = SumChainTask(2, 2, digit_max=3)  # only 16 problems exist
    held = task.held_out(6, seed=0)
    assert len(set(held)) == 6
    rng = random.Random(0)
    train = {task.sample(rng).data for _ in range(500)}
    assert train.isdisjoint({p.data for p in held})
    assert len(train) == 10


def test_completion_length_bound():
    task = SumChainTask(3, 5)
    policy = ChainSolverPolicy(0.5)
    worst = task.make([9, 9, 9, 9, 9])
    assert max(len(c) for c, _ in policy.traces(worst)) == task.max_completion_length()


@pytest.mark.parametrize("operands", [[3, 5, 2, 7], [4, 4, 1], [6, 6, 6], [0, 9, 9, 2, 0]])
@pytest.mark.parametrize("p_natural", [0.5, 0.8, 1.0])
def test_behavior_trace_probabilities_sum_to_one(operands, p_natural):
    task, policy = SumChainTask(2, 5), ChainSolverPolicy(p_natural)
    problem = task.make(operands)
    traces = policy.traces(problem)
    assert len({c for c, _ in traces}) == len(traces)  # each choice sequence is a distinct text
    assert math.fsum(math.exp(math.fsum(lp)) for _, lp in traces) == pytest.approx(1.0, abs=1e-12)
    for completion, logps in traces:
        assert len(logps) == len(completion)  # one log-prob per character = per token
        assert check_chain(problem.data, completion) and task.reward(problem, completion) == 1.0
        assert all(lp <= 0.0 for lp in logps)
        # only choice tokens (operand digits right after '+', or the first digit) are stochastic
        for i, lp in enumerate(logps):
            if lp != 0.0:
                assert i == 0 or completion[i - 1] == "+"


def test_behavior_per_token_logprobs_are_conditionals():
    # P(next token | prefix) estimated by enumeration equals exp(per-token log-prob)
    task, policy = SumChainTask(2, 5), ChainSolverPolicy(0.6)
    traces = policy.traces(task.make([1, 2, 2, 3]))
    prefix_mass = collections.defaultdict(float)
    for text, logps in traces:
        p = math.exp(math.fsum(logps))
        for i in range(len(text) + 1):
            prefix_mass[text[:i]] += p
    for text, logps in traces:
        for i, lp in enumerate(logps):
            cond = prefix_mass[text[: i + 1]] / prefix_mass[text[:i]]
            assert cond == pytest.approx(math.exp(lp), rel=1e-12)


def test_behavior_sampling_frequencies_match_probabilities():
    task, policy = SumChainTask(2, 5), ChainSolverPolicy(0.5)
    problem = task.make([1, 2, 3])
    probs = {c: math.exp(math.fsum(lp)) for c, lp in policy.traces(problem)}
    rng = random.Random(0)
    n = 6000
    counts = collections.Counter(policy.sample(problem, rng)[0] for _ in range(n))
    assert set(counts) <= set(probs)
    for c, p in probs.items():
        assert abs(counts[c] / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3
    for c, lp in [policy.sample(problem, rng) for _ in range(5)]:
        assert math.fsum(lp) == pytest.approx(policy.logprob(problem, c))


def test_trace_logprobs_score_another_policys_trace():
    # the natural-order trace of (3, 5, 2, 7) under p_natural 0.2, written out by hand: the first
    # digit is one of 4 distinct values (P = 0.2 for the leftmost), then one of 3 (0.2), then of
    # 2 (0.2), then the last value is forced (P = 1); every other character has P = 1
    task, teacher = SumChainTask(2, 6), ChainSolverPolicy(0.2)
    problem = task.make([3, 5, 2, 7])
    natural = ChainSolverPolicy(1.0).sample(problem, random.Random(0))[0]
    assert natural == "3+5=8+2=10+7=17" + task.eos
    got = teacher.trace_logprobs(problem, natural)
    want = [0.0] * len(natural)
    want[0] = want[2] = want[6] = math.log(0.2)  # "3", "5" after the first '+', "2" after the second
    assert got == pytest.approx(want, abs=1e-15)
    assert teacher.logprob(problem, natural) == pytest.approx(3 * math.log(0.2))
    # a trace the teacher cannot write (wrong sum) has no log-probs
    assert teacher.trace_logprobs(problem, "3+5=9+2=11+7=18" + task.eos) is None
    assert teacher.logprob(problem, "3+5=9" + task.eos) == -math.inf
    # a shuffled trace: the student's own style (p 1.0) cannot write it
    assert ChainSolverPolicy(1.0).trace_logprobs(problem, "5+3=8+2=10+7=17" + task.eos) is None


def test_tokenizer_and_label_alignment():
    task, policy = SumChainTask(), ChainSolverPolicy(0.5)
    tok = CharTokenizer(task.alphabet, task.eos)
    problem = task.make([3, 5, 2])
    completion, logps = policy.sample(problem, random.Random(1))
    assert tok.decode(tok.encode(problem.prompt + completion)) == problem.prompt + completion
    batch = encode_batch(tok, [problem.prompt, "1+2:"], [completion, "1+2=3."], [logps, [0.0] * 6])
    ids, labels, blp = batch.input_ids, batch.labels, batch.behavior_logprobs
    # the label at t is the token at t+1, and its behavior log-prob is the one of that character
    row = [tok.itos[i] for i in labels[0][batch.mask[0]].tolist()]
    assert "".join(row) == completion
    assert blp[0][batch.mask[0]].tolist() == pytest.approx(logps)
    assert (labels[0][batch.mask[0]] == ids[0, 1:][batch.mask[0]]).all()
    assert int(batch.mask[1].sum()) == 6 and blp[1].abs().sum() == 0
    with pytest.raises(ValueError, match="vocabulary"):
        tok.encode("3*4")
    with pytest.raises(ValueError, match="behavior_logprobs"):
        encode_batch(tok, ["1+2:"], ["1+2=3."], [[0.0]])


def test_reasoning_gym_is_optional():
    try:
        import reasoning_gym  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pear_kernels\[reasoning-gym\]"):
            ReasoningGymTask("chain_sum", size=4)
    else:  # pragma: no cover - only where the extra is installed
        task = ReasoningGymTask("chain_sum", size=4)
        p = task.problems[0]
        assert task.reward(p, p.answer + "\n") == 1.0
