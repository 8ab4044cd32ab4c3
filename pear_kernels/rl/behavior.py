"""A behavior policy with exact per-token log-probs: a stochastic programmatic solver.

PEAR needs log pi_beta(y_t) for every supervised token of the SFT data. A teacher model gives
them only approximately (sampling temperature, numerics); this solver gives them exactly.

For SumChainTask it writes a running-sum chain ("3+5=8+2=10+7=17.") choosing which operand
to add next. At each choice point, among the *distinct values* still unused:

    P(value of the leftmost unused operand) = p_natural
    P(each other distinct unused value)     = (1 - p_natural) / (#distinct unused values - 1)

(probability 1 when only one distinct value is left). The chosen operand is the leftmost
unused one with that value. Choosing by value, not by position, is what makes each choice a
single token: the digit written *is* the decision, and the next state is a function of the
text so far, so log pi_beta(token) is exactly the log of the choice probability, and every
other character (running sums, '+', '=', '.') is determined (log-prob 0). A trace's
log-probability is the sum of its per-token log-probs, and the probabilities of all traces
of a problem sum to 1 (tests enumerate them).

Why this policy: its out-of-order chains (probability 1 - p_natural at each choice) are the
kind of trace a tiny student executes badly (it must remember which operands are used), so
the SFT data contain many continuations the student would not produce itself, which is the
situation PEAR reweights.
"""

from __future__ import annotations

import math
import random
from typing import Dict, List, Optional, Sequence, Tuple

from .tasks import END, Problem

__all__ = ["ChainSolverPolicy"]


class ChainSolverPolicy:
    """Running-sum solver for SumChainTask; ``p_natural`` = P(leftmost unused operand next)."""

    def __init__(self, p_natural: float = 0.5):
        if not (0.0 < p_natural <= 1.0):
            raise ValueError(f"p_natural must be in (0, 1], got {p_natural}")
        self.p_natural = float(p_natural)

    def choice_distribution(self, unused: Sequence[int]) -> Dict[int, float]:
        """Probability of writing each distinct unused value next (unused in prompt order)."""
        values = list(dict.fromkeys(unused))  # distinct, in order of first occurrence
        if not values:
            raise ValueError("no unused operand left to choose")
        natural = unused[0]
        if len(values) == 1 or self.p_natural == 1.0:  # zero-probability choices do not exist
            return {natural: 1.0}
        other = (1.0 - self.p_natural) / (len(values) - 1)
        return {v: (self.p_natural if v == natural else other) for v in values}

    # one step of the solver: append the text for a chosen value, with its per-char log-probs
    @staticmethod
    def _write(chars: List[str], logps: List[float], text: str, choice_logp: float, choice_at: int) -> None:
        for i, ch in enumerate(text):
            chars.append(ch)
            logps.append(choice_logp if i == choice_at else 0.0)

    def _extend(self, unused: List[int], value: int) -> List[int]:
        rest = list(unused)
        rest.remove(value)  # removes the leftmost occurrence
        return rest

    def sample(self, problem: Problem, rng: random.Random) -> Tuple[str, List[float]]:
        """One completion and its exact per-character (= per-token) behavior log-probs."""
        return self._walk(list(problem.data), rng=rng)[0]

    def traces(self, problem: Problem) -> List[Tuple[str, List[float]]]:
        """Every completion the policy can write for ``problem``, with per-token log-probs."""
        return self._walk(list(problem.data), rng=None)

    def _walk(self, operands: List[int], rng) -> List[Tuple[str, List[float]]]:
        """Depth-first over the choices (all of them when rng is None, one sampled path else)."""
        if len(operands) < 2:
            raise ValueError("a chain needs at least two operands")
        results: List[Tuple[str, List[float]]] = []

        def pick(unused: List[int]):
            dist = self.choice_distribution(unused)
            if rng is None:
                return list(dist.items())
            values, probs = zip(*dist.items())
            v = rng.choices(values, weights=probs)[0]
            return [(v, dist[v])]

        def rec(unused: List[int], total: int, chars: List[str], logps: List[float], first: bool) -> None:
            if not unused:
                self._write(chars, logps, END, 0.0, -1)
                results.append(("".join(chars), list(logps)))
                return
            for value, prob in pick(unused):
                c, lp = list(chars), list(logps)
                new_total = total + value
                if first:  # "a" of "a+b=s": just the digit
                    self._write(c, lp, str(value), math.log(prob), 0)
                    rec(self._extend(unused, value), new_total, c, lp, False)
                    continue
                text = f"+{value}={new_total}"  # "+b=s": the choice is the digit after '+'
                self._write(c, lp, text, math.log(prob), 1)
                rec(self._extend(unused, value), new_total, c, lp, False)

        rec(list(operands), 0, [], [], True)
        return results

    def trace_logprobs(self, problem: Problem, completion: str) -> Optional[List[float]]:
        """Per-token log-probs of ``completion`` under the policy, as ``sample`` gives them for
        it (None if the policy cannot write it): the behavior log-probs of a trace that another
        policy wrote, e.g. the natural-order trace scored under a p_natural = 0.2 teacher."""
        for text, logps in self.traces(problem):
            if text == completion:
                return logps
        return None

    def logprob(self, problem: Problem, completion: str) -> float:
        """Total log-probability of ``completion`` under the policy (-inf if it cannot write it)."""
        logps = self.trace_logprobs(problem, completion)
        return -math.inf if logps is None else math.fsum(logps)
