"""pass@1 and pass@k on held-out problems (unbiased estimator of Chen et al., 2021)."""

from __future__ import annotations

import math
from typing import Dict, Sequence

import torch

from .rollout import generate

__all__ = ["pass_at_k", "evaluate"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k draws without replacement from n samples, c correct, is correct)."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def evaluate(model, tokenizer, task, problems: Sequence, *, n_samples: int = 8, k: int = 8,
             temperature: float = 1.0, seed: int = 0, max_new_tokens: int = 0) -> Dict[str, float]:
    """Sample ``n_samples`` completions per problem; report pass@1, pass@k and greedy accuracy."""
    if k > n_samples:
        raise ValueError(f"k ({k}) must be <= n_samples ({n_samples})")
    max_new = max_new_tokens or task.max_completion_length() + 2
    gen = torch.Generator().manual_seed(seed)
    prompts = [p.prompt for p in problems for _ in range(n_samples)]
    texts = generate(model, tokenizer, prompts, max_new, temperature=temperature, generator=gen)
    correct = [0] * len(problems)
    for j, text in enumerate(texts):
        correct[j // n_samples] += int(task.reward(problems[j // n_samples], text) > 0)
    greedy = generate(model, tokenizer, [p.prompt for p in problems], max_new, temperature=0.0)
    return {
        "pass@1": sum(pass_at_k(n_samples, c, 1) for c in correct) / len(problems),
        f"pass@{k}": sum(pass_at_k(n_samples, c, k) for c in correct) / len(problems),
        "greedy": sum(task.reward(p, t) for p, t in zip(problems, greedy)) / len(problems),
    }
