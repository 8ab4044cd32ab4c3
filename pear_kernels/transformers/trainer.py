"""PEARTrainer: transformers.Trainer with the fused PEAR loss and its weight statistics.

The model is patched with ``apply_pear_kernel`` (unless it already is), so the loss is the
model's own output and Trainer's gradient-accumulation path applies unchanged: the patched
forward accepts ``**kwargs``, so Trainer passes ``num_items_in_batch`` (the supervised tokens
of the whole accumulated batch) and does not divide the loss by the accumulation steps; the
sum of the micro-batch losses is the mean over the accumulated batch, as one big batch would
give. The collator pads behavior log-probs with the other per-token columns, and
``behavior_logprobs`` is a forward argument, so ``remove_unused_columns`` keeps it.

Logged (token-weighted means over the micro-batches since the last log): pear/mean_weight,
pear/ess_fraction, pear/ess, pear/ratio_clip_fraction, pear/weight_clip_fraction.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from transformers import Trainer

from ..config import PEARConfig
from .collator import PEARDataCollator
from .patch import apply_pear_kernel, pear_state, require_pear_forward

__all__ = ["PEARTrainer", "PEARMetrics", "check_loss_not_replaced", "default_pear_collator", "prepare_pear_model"]

_METRIC_KEYS = ("mean_weight", "ess", "ess_fraction", "ratio_clip_fraction", "weight_clip_fraction")


class PEARMetrics:
    """Token-weighted running means of the per-batch PEAR statistics (kept on device until logged)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self._sums: Optional[torch.Tensor] = None
        self._tokens: Optional[torch.Tensor] = None

    def add(self, metrics: Optional[Dict[str, torch.Tensor]]) -> None:
        if not metrics:
            return
        n = metrics["num_tokens"].to(torch.float64)
        values = torch.stack([metrics[k].to(torch.float64) for k in _METRIC_KEYS]) * n
        self._sums = values if self._sums is None else self._sums + values.to(self._sums.device)
        self._tokens = n if self._tokens is None else self._tokens + n.to(self._tokens.device)

    def summary(self, gather=None, prefix: str = "pear/") -> Dict[str, float]:
        if self._sums is None:
            return {}
        sums, tokens = self._sums, self._tokens
        if gather is not None:  # sum over data-parallel ranks
            sums, tokens = gather(sums), gather(tokens)
        denom = float(tokens.clamp_min(1))
        out = {f"{prefix}{k}": float(v) / denom for k, v in zip(_METRIC_KEYS, sums.tolist())}
        out[f"{prefix}supervised_tokens"] = float(tokens)
        return out


def prepare_pear_model(model, pear_config: Optional[PEARConfig], distill: Optional[dict] = None):
    """Patch the (PEFT-unwrapped) model if it is not patched yet; a given config (or
    distillation setting) replaces the old one."""
    base = model
    if hasattr(model, "get_base_model") and callable(model.get_base_model):
        base = model.get_base_model()
    state = pear_state(base)
    if state is None or pear_config is not None or distill is not None:
        if distill is None and state is not None:
            distill = state.distill
        apply_pear_kernel(base, pear_config if pear_config is not None else (state.config if state else None),
                          distill=distill)
    return model


def default_pear_collator(processing_class, model, padding_free: bool = False) -> PEARDataCollator:
    pad = getattr(processing_class, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(processing_class, "tokenizer", None), "pad_token_id", None)
    if pad is None:
        pad = getattr(processing_class, "eos_token_id", None)
    if pad is None:
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return PEARDataCollator(pad_token_id=0 if pad is None else int(pad), padding_free=padding_free)


def check_loss_not_replaced(trainer) -> None:
    """Label smoothing and compute_loss_func take the labels away from the model: no PEAR loss."""
    if getattr(trainer, "label_smoother", None) is not None:
        raise ValueError("label_smoothing_factor > 0 replaces the model's loss; it cannot be combined with PEAR")
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise ValueError("compute_loss_func replaces the model's loss; it cannot be combined with PEAR")


def _sum_across(trainer):
    if trainer.accelerator.num_processes <= 1:
        return None
    return lambda t: trainer.accelerator.reduce(t.to(trainer.accelerator.device), reduction="sum")


class PEARTrainer(Trainer):
    """Trainer for PEAR SFT. ``pear_config`` patches the model (default PEARConfig())."""

    def __init__(self, model=None, args=None, data_collator=None, *, pear_config: Optional[PEARConfig] = None,
                 distill_config: Optional[dict] = None, **kwargs):
        """``distill_config``: {"tail": "renormalize" | "bucket", "hard_weight": lam} for data
        carrying the teacher's stored top-k (``collect --top-k``): the model then trains with
        fused_pear_distill_loss instead of the PEAR SFT loss."""
        if model is None:
            raise ValueError("PEARTrainer needs a model instance (a *ForCausalLM)")
        prepare_pear_model(model, pear_config, distill_config)
        if data_collator is None:
            data_collator = default_pear_collator(kwargs.get("processing_class"), model)
        super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
        check_loss_not_replaced(self)
        self._pear_metrics = PEARMetrics()

    def _set_signature_columns_if_needed(self):
        # the columns come from the forward's signature: keep behavior_logprobs even when a later
        # patch replaced the forward, so compute_loss can say what happened
        super()._set_signature_columns_if_needed()
        for c in ("behavior_logprobs", "teacher_ids", "teacher_logprobs"):
            if c not in self._signature_columns:
                self._signature_columns.append(c)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        require_pear_forward(model)  # a later patch (Liger's fused CE) must not silently win
        if model.training and "labels" in inputs and "behavior_logprobs" not in inputs:
            raise KeyError(
                "the batch has no 'behavior_logprobs': use PEARDataCollator and a data set from "
                "load_pear_dataset (and keep the column: it is a forward argument of the patched model)"
            )
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        metrics = outputs.get("pear_metrics") if hasattr(outputs, "get") else None
        if metrics:
            self._pear_metrics.add(metrics)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs or not any(k.startswith("eval_") for k in logs):
            logs = {**logs, **self._pear_metrics.summary(_sum_across(self))}
            self._pear_metrics.reset()
        super().log(logs, start_time)
