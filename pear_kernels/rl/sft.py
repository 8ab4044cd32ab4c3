"""SFT on behavior-policy traces through pear_kernels.fused_pear_loss (plain SFT = variant "none").

The data are collected once, offline, with their exact per-token behavior log-probs, as PEAR
assumes. Every step runs the model body, takes the final hidden states and hands them with
the LM head weight to the fused loss: no (tokens x vocab) logits are built.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..config import PEARConfig
from ..loss import fused_pear_loss
from .batching import encode_batch
from .model import final_hidden_states, lm_head_params

__all__ = ["SFTExample", "collect_sft_data", "SFTConfig", "sft_train"]


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    completion: str
    behavior_logprobs: tuple  # one per completion token


def collect_sft_data(task, policy, size: int, seed: int) -> List[SFTExample]:
    """``size`` behavior traces on training problems, each with its per-token log-probs."""
    rng = random.Random(f"sft-data-{seed}")
    data = []
    for _ in range(size):
        problem = task.sample(rng)
        completion, logps = policy.sample(problem, rng)
        data.append(SFTExample(problem.prompt, completion, tuple(logps)))
    return data


@dataclass
class SFTConfig:
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    seed: int = 0


def sft_train(
    model,
    tokenizer,
    data: Sequence[SFTExample],
    pear: PEARConfig,
    config: SFTConfig,
    *,
    log: Optional[Callable[[int, Dict[str, float]], None]] = None,
    keep_weights_from: Optional[int] = None,
    until: Optional[Callable[[int], bool]] = None,
) -> Dict[str, list]:
    """Train in place. Returns the history: loss and PEAR stats per step, and (from step
    ``keep_weights_from`` on, default the last fifth) the PEAR weights of every supervised
    token, for plotting their distribution. ``until(steps_done)`` is called after each step;
    training stops early when it returns True (``config.steps`` is the most it runs)."""
    rng = random.Random(f"sft-batches-{config.seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(config.warmup_steps, 1))
    )
    keep_from = config.steps - max(1, config.steps // 5) if keep_weights_from is None else keep_weights_from
    history: Dict[str, list] = {"loss": [], "mean_weight": [], "ess_fraction": [], "weights": []}
    data = list(data)
    model.train()
    for step in range(config.steps):
        batch_ex = rng.sample(data, config.batch_size) if len(data) >= config.batch_size else data
        batch = encode_batch(
            tokenizer, [e.prompt for e in batch_ex], [e.completion for e in batch_ex],
            [e.behavior_logprobs for e in batch_ex],
        )
        hidden = final_hidden_states(model, batch.input_ids)[:, :-1]
        weight, bias = lm_head_params(model)
        loss, stats = fused_pear_loss(
            hidden, weight, batch.labels, batch.behavior_logprobs, bias=bias, config=pear, return_stats=True
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        opt.step()
        sched.step()
        history["loss"].append(float(loss.detach()))
        history["mean_weight"].append(float(stats.mean_weight))
        history["ess_fraction"].append(float(stats.ess_fraction))
        if step >= keep_from:
            history["weights"].append(stats.weights[stats.mask].detach().clone())
        if log is not None:
            log(step, {"loss": float(loss.detach()), **stats.scalars()})
        if until is not None and until(step + 1):
            model.train()  # the callback may have evaluated
            break
    history["weights"] = torch.cat(history["weights"]).tolist() if history["weights"] else []
    return history
