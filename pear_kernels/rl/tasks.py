"""Verifiable tasks: problems with an exact checker, generated in the repo (no downloads).

``SumChainTask`` (the default): add n single-digit numbers, showing the running sum.

    prompt      "3+5+2+7:"
    completion  "3+5=8+2=10+7=17."        (any order of the operands is a valid chain)

The reward is the outcome only: 1.0 when the number after the last "=" of the completion
(up to the end marker ".") is the true sum, else 0.0. ``check_chain`` is the stricter
verifier of the whole computation (each operand used once, every partial sum right); the
tests use it on behavior traces.

``ReasoningGymTask`` wraps a reasoning-gym data set as an optional source (its own scorer is
the checker). reasoning-gym is imported only there.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["Problem", "SumChainTask", "ReasoningGymTask", "parse_answer", "check_chain"]

END = "."  # end-of-completion marker; also the tokenizer's eos


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    data: Tuple[int, ...] = field(default=())  # the operands for SumChainTask
    meta: Optional[Dict[str, Any]] = field(default=None, compare=False, hash=False)


def parse_answer(completion: str) -> Optional[int]:
    """The number after the last '=' of a completion that ends with END, else None."""
    if END not in completion:
        return None
    body = completion[: completion.index(END)]
    if "=" not in body:
        return None
    tail = body.rsplit("=", 1)[1]
    if not tail.isdigit() or len(tail) > 3:
        return None
    return int(tail)


def check_chain(operands: Sequence[int], completion: str) -> bool:
    """True iff the completion is a full, correct running-sum chain over the operands."""
    if not completion.endswith(END) or completion.count(END) != 1:
        return False
    body = completion[:-1]
    parts = body.split("=")
    if len(parts) != len(operands):
        return False
    try:
        first, *steps = parts
        terms = first.split("+")
        if len(terms) != 2:
            return False
        used = [int(terms[0]), int(terms[1])]
        total = used[0] + used[1]
        for k, step in enumerate(steps):
            if k < len(steps) - 1:
                value, nxt = step.split("+")
                if int(value) != total:
                    return False
                used.append(int(nxt))
                total += int(nxt)
            elif int(step) != total:
                return False
    except ValueError:
        return False
    return sorted(used) == sorted(operands)


class SumChainTask:
    """Sums of ``n_min``..``n_max`` single digits; held-out problems never appear in training.

    The alphabet is "0123456789+=:." (':' ends the prompt, '.' the completion).
    """

    alphabet = "0123456789+=:" + END
    eos = END

    def __init__(self, n_min: int = 3, n_max: int = 4, digit_max: int = 9):
        if not (2 <= n_min <= n_max):
            raise ValueError(f"need 2 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
        if not (1 <= digit_max <= 9):
            raise ValueError(f"digit_max must be in [1, 9], got {digit_max}")
        self.n_min, self.n_max, self.digit_max = n_min, n_max, digit_max
        self._held_out: set = set()

    def max_completion_length(self, n: Optional[int] = None) -> int:
        """Upper bound on completion characters: 'a+b=s', then '+x=s' per operand, then END."""
        n = self.n_max if n is None else n
        sum_digits = len(str(n * self.digit_max))
        return (4 + sum_digits) + (n - 2) * (3 + sum_digits) + 1

    def make(self, operands: Sequence[int]) -> Problem:
        ops = tuple(int(x) for x in operands)
        return Problem(prompt="+".join(map(str, ops)) + ":", answer=str(sum(ops)), data=ops)

    def sample(self, rng: random.Random, n: Optional[int] = None) -> Problem:
        """A training problem (never one of the held-out set)."""
        while True:
            k = n if n is not None else rng.randint(self.n_min, self.n_max)
            ops = tuple(rng.randint(0, self.digit_max) for _ in range(k))
            if ops not in self._held_out:
                return self.make(ops)

    def held_out(self, count: int, seed: int) -> List[Problem]:
        """``count`` distinct evaluation problems; later ``sample`` calls exclude them."""
        rng = random.Random(f"held-out-{seed}")
        out: List[Problem] = []
        seen = set()
        while len(out) < count:
            k = rng.randint(self.n_min, self.n_max)
            ops = tuple(rng.randint(0, self.digit_max) for _ in range(k))
            if ops not in seen:
                seen.add(ops)
                out.append(self.make(ops))
        self._held_out |= seen
        return out

    def reward(self, problem: Problem, completion: str) -> float:
        got = parse_answer(completion)
        return 1.0 if got is not None and str(got) == problem.answer else 0.0


class ReasoningGymTask:
    """Problems from a reasoning-gym data set; reward = the data set's own ``score_answer``.

    Needs ``pip install pear_kernels[reasoning-gym]``. Completions are scored on the text
    before the first ``eos``. Its characters are arbitrary text, so build the tokenizer from
    ``alphabet_of(problems)``.
    """

    eos = "\n"

    def __init__(self, name: str, size: int = 1000, seed: int = 0, **config: Any):
        try:
            import reasoning_gym
        except ImportError as err:
            raise ImportError(
                "ReasoningGymTask needs reasoning-gym: pip install pear_kernels[reasoning-gym]"
            ) from err
        self.dataset = reasoning_gym.create_dataset(name, size=size, seed=seed, **config)
        self.problems = [
            Problem(prompt=e["question"] + "\n", answer=str(e["answer"]), meta=dict(e)) for e in self.dataset
        ]

    def sample(self, rng: random.Random, n: Optional[int] = None) -> Problem:
        return self.problems[rng.randrange(len(self.problems))]

    def reward(self, problem: Problem, completion: str) -> float:
        answer = completion.split(self.eos, 1)[0].strip()
        return float(self.dataset.score_answer(answer=answer, entry=problem.meta))

    @staticmethod
    def alphabet_of(problems: Sequence[Problem]) -> str:
        chars = sorted({ch for p in problems for ch in p.prompt + p.answer} | {"\n"})
        return "".join(chars)
