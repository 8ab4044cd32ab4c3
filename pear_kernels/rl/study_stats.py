"""Statistics of the paired SFT-then-RL study: paired differences, bootstrap intervals, gates,
and the style of a sum-chain trace.

Paired design: every arm of a seed starts from the same base checkpoint and sees the same SFT
data, RL prompts and sampling seeds, so the per-seed difference arm - plain removes the
between-seed variation; the interval is a percentile bootstrap over seeds of the mean of
those differences.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .tasks import END

__all__ = ["paired_differences", "bootstrap_mean_ci", "seeds_above", "Gate", "written_order",
           "is_natural_order"]


def paired_differences(arm: Dict[int, float], base: Dict[int, float]) -> Dict[int, float]:
    """arm[s] - base[s] for every seed s present in both (seed -> value mappings)."""
    if not isinstance(arm, dict) or not isinstance(base, dict):
        raise TypeError("arm and base must be dicts seed -> value")
    return {s: float(arm[s]) - float(base[s]) for s in sorted(set(arm) & set(base))}


def bootstrap_mean_ci(values: Sequence[float], *, level: float = 0.95, resamples: int = 10_000,
                      seed: int = 0) -> Tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean over ``values``.

    Resamples ``len(values)`` values with replacement ``resamples`` times; low/high are the
    (1-level)/2 and (1+level)/2 empirical quantiles (nearest-rank) of the resampled means.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("values must not be empty")
    if not (0.0 < level < 1.0):
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    n = len(vals)
    mean = sum(vals) / n
    rng = random.Random(seed)
    means = sorted(sum(vals[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    # symmetric nearest-rank indices; the 1e-9 keeps e.g. 0.1 * 10 from flooring to 0
    lo_i = min(resamples - 1, int((1.0 - level) / 2.0 * resamples + 1e-9))
    hi_i = max(lo_i, resamples - 1 - lo_i)
    return mean, means[lo_i], means[hi_i]


def seeds_above(diffs: Dict[int, float]) -> Tuple[int, int]:
    """(number of seeds with a strictly positive difference, number of seeds)."""
    return sum(1 for d in diffs.values() if d > 0), len(diffs)


@dataclass(frozen=True)
class Gate:
    """A pre-registered check: ``value`` must lie in [low, high] (None = unbounded)."""

    name: str
    value: Optional[float]
    low: Optional[float] = None
    high: Optional[float] = None

    @property
    def status(self) -> str:
        if self.value is None:
            return "not measured"
        if self.low is not None and self.value < self.low:
            return "FAIL"
        if self.high is not None and self.value > self.high:
            return "FAIL"
        return "pass"

    def line(self) -> str:
        rng = f"[{'-inf' if self.low is None else self.low}, {'inf' if self.high is None else self.high}]"
        val = "—" if self.value is None else f"{self.value:.3f}"
        return f"- {self.name}: {val} (required {rng}): **{self.status}**"


def written_order(completion: str) -> Optional[List[int]]:
    """Operands in the order a running-sum chain adds them ('3+5=8+2=10.' -> [3, 5, 2]),
    or None when the text is not a chain."""
    body = completion.split(END, 1)[0]
    parts = body.split("=")
    if len(parts) < 2:
        return None
    try:
        first = parts[0].split("+")
        if len(first) != 2:
            return None
        order = [int(first[0]), int(first[1])]
        for step in parts[1:-1]:
            pieces = step.split("+")
            if len(pieces) != 2:
                return None
            order.append(int(pieces[1]))
    except ValueError:
        return None
    return order


def is_natural_order(operands: Sequence[int], completion: str) -> bool:
    """True iff the chain adds the operands in prompt order (the student's own style)."""
    return written_order(completion) == list(operands)
