"""A reference GRPO loop: sample G completions per prompt, score them, update the policy.

One step:
  1. draw ``prompts_per_step`` training problems, sample ``group_size`` completions each
     (the current policy is the sampling policy: on-policy);
  2. reward each with the task's exact checker; group-normalised advantages;
  3. log-probs of the sampled tokens under the sampling policy (old) and, when ``kl_coef`` > 0,
     under the frozen reference model, all through the fused kernel;
  4. ``updates_per_batch`` gradient steps on the clipped GRPO loss (fused, from hidden states).

Everything is plain PyTorch plus the fused kernels; the model is any causal LM whose
``model.model(input_ids)`` returns final hidden states (Hugging Face layout).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from ..logprobs import fused_token_logprobs
from .advantages import group_advantages
from .batching import encode_batch
from .grpo_loss import AGGREGATIONS, fused_grpo_loss
from .model import final_hidden_states, lm_head_params
from .rollout import generate

__all__ = ["GRPOConfig", "GRPOTrainer"]


@dataclass
class GRPOConfig:
    steps: int = 50
    prompts_per_step: int = 16
    group_size: int = 8
    lr: float = 1e-3
    eps_low: float = 0.2
    eps_high: float = 0.28
    kl_coef: float = 0.0
    scale_rewards_by_std: bool = True  # False: Dr.GRPO
    aggregation: str = "token-mean"
    updates_per_batch: int = 1
    temperature: float = 1.0
    max_grad_norm: float = 1.0
    max_new_tokens: int = 0  # 0: the task's max_completion_length() + 2
    seed: int = 0

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        for name in ("steps", "prompts_per_step", "group_size", "updates_per_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "steps" else 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}")


class GRPOTrainer:
    def __init__(self, model, tokenizer, task, config: GRPOConfig, ref_model=None):
        if config.kl_coef > 0 and ref_model is None:
            raise ValueError("kl_coef > 0 needs ref_model (e.g. a frozen copy of the initial policy)")
        self.model, self.tokenizer, self.task, self.config = model, tokenizer, task, config
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
        self.rng = random.Random(f"grpo-prompts-{config.seed}")
        self.gen = torch.Generator().manual_seed(config.seed)
        self.max_new = config.max_new_tokens or task.max_completion_length() + 2

    def _logprobs(self, model, input_ids, labels) -> torch.Tensor:
        hidden = final_hidden_states(model, input_ids)[:, :-1]
        weight, bias = lm_head_params(model)
        return fused_token_logprobs(hidden, weight, labels, bias=bias, temperature=self.config.temperature)

    def step(self) -> Dict[str, float]:
        cfg = self.config
        problems = [self.task.sample(self.rng) for _ in range(cfg.prompts_per_step)]
        expanded = [p for p in problems for _ in range(cfg.group_size)]
        completions = generate(
            self.model, self.tokenizer, [p.prompt for p in expanded], self.max_new,
            temperature=cfg.temperature, generator=self.gen,
        )
        rewards = torch.tensor([self.task.reward(p, c) for p, c in zip(expanded, completions)])
        adv = group_advantages(rewards, cfg.group_size, scale_by_std=cfg.scale_rewards_by_std)
        batch = encode_batch(self.tokenizer, [p.prompt for p in expanded], completions)
        mask = batch.mask
        self.model.train()
        with torch.no_grad():
            old_logp = self._logprobs(self.model, batch.input_ids, batch.labels)
            ref_logp = self._logprobs(self.ref_model, batch.input_ids, batch.labels) if self.ref_model is not None else None

        metrics: Dict[str, float] = {}
        for _ in range(cfg.updates_per_batch):
            hidden = final_hidden_states(self.model, batch.input_ids)[:, :-1]
            weight, bias = lm_head_params(self.model)
            loss, metrics = fused_grpo_loss(
                hidden, weight, batch.labels, old_logp, adv, bias=bias, ref_logp=ref_logp,
                temperature=cfg.temperature, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                kl_coef=cfg.kl_coef, aggregation=cfg.aggregation, max_completion_length=self.max_new,
            )
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.opt.step()
        groups = rewards.view(-1, cfg.group_size)
        metrics.update(
            loss=float(loss.detach()),
            reward=float(rewards.mean()),
            reward_std=float(rewards.std()) if rewards.numel() > 1 else 0.0,
            solved_groups=float((groups.min(dim=1).values > 0).float().mean()),
            zero_adv_groups=float((groups.max(dim=1).values == groups.min(dim=1).values).float().mean()),
            length=float(mask.sum(dim=1).float().mean()),
        )
        return metrics

    def train(self, log: Optional[Callable[[int, Dict[str, float]], None]] = None) -> List[Dict[str, float]]:
        history = []
        for step in range(self.config.steps):
            metrics = self.step()
            history.append(metrics)
            if log is not None:
                log(step, metrics)
        return history
