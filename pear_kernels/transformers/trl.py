"""TRL integration: PEARSFTTrainer, an SFTTrainer that trains with the fused PEAR loss.

Checked against TRL 1.16's SFTTrainer, which would otherwise lose PEAR in four ways:

1. Its ``compute_loss`` never uses the model's loss: it calls ``model(..., fused_lm_head=True)``
   (a forward TRL installs with ``add_fused_lm_head``) and sums ``-log_probs`` itself, so a
   patched model would silently train with plain NLL. ``loss_type`` ("nll", "dft", or the
   deprecated "chunked_nll" alias TRL still accepts) only switches between those built-in losses.
   Here ``compute_loss`` calls the model without ``fused_lm_head``, which TRL's wrapper passes
   to the PEAR-patched forward, and ``loss_type="dft"``, label smoothing and ``compute_loss_func``
   are refused.
2. Its default collator (DataCollatorForLanguageModeling) builds its batch from input_ids and
   the masks only, dropping ``behavior_logprobs``; PEARDataCollator is used instead.
3. Dataset preparation re-tokenizes text and appends EOS, and truncates, which would misalign
   stored log-probs; examples must come tokenized from ``load_pear_dataset`` and preparation is
   skipped (``dataset_kwargs={"skip_prepare_dataset": True}``).
4. Its signature columns are input_ids, labels and seq_lengths, so ``remove_unused_columns``
   would drop behavior_logprobs; they are extended here.
5. With ``padding_free=True`` it refuses any custom collator; PEARDataCollator(padding_free=True)
   packs instead (TRL sees padding_free=False on a copy of the config), and the patched forward
   keeps every PEAR weight inside its own sequence.
6. ``completion_only_loss`` (None or True) and ``assistant_only_loss=True`` hold by construction:
   the supervised tokens are exactly those with behavior log-probs, the response (for chat
   records, the final assistant reply; earlier turns are context). TRL would refuse
   ``assistant_only_loss`` on pre-tokenized data, so it sees False on a copy.
   ``completion_only_loss=False`` (train on prompt tokens too) is refused: prompt tokens have
   no behavior log-probs. ``packing=True`` is refused (TRL re-packs prepared data);
   ``padding_free=True`` packs at collation instead.
7. ``use_liger_kernel=True``: TRL applies Liger inside ``__init__``; its module patches
   (RMSNorm, RoPE, SwiGLU) stay and the PEAR forward is put back on top of its fused
   cross-entropy, so the loss stays PEAR's.
"""

from __future__ import annotations

import copy
from typing import Optional

try:

    from trl import SFTConfig, SFTTrainer
except ImportError as exc:  # pragma: no cover
    raise ImportError("the TRL integration needs trl: pip install pear_kernels[hf]") from exc

import torch

from ..config import PEARConfig
from .patch import require_pear_forward
from .trainer import (
    PEARMetrics,
    _sum_across,
    check_loss_not_replaced,
    default_pear_collator,
    prepare_pear_model,
)

__all__ = ["PEARSFTTrainer", "pear_sft_config"]

_REQUIRED_COLUMNS = ("input_ids", "labels", "behavior_logprobs")


def pear_sft_config(output_dir: str, **kwargs) -> "SFTConfig":
    """An SFTConfig with the settings PEAR needs: pre-tokenized data, no re-tokenization, no EOS
    appended, no truncation at preparation, no column removal by signature (the collator picks
    its columns)."""
    dataset_kwargs = dict(kwargs.pop("dataset_kwargs", None) or {})
    dataset_kwargs["skip_prepare_dataset"] = True
    kwargs.setdefault("remove_unused_columns", False)
    kwargs.setdefault("report_to", "none")
    return SFTConfig(output_dir=output_dir, dataset_kwargs=dataset_kwargs, **kwargs)


def _columns(dataset):
    if dataset is None:
        return None
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    try:
        first = dataset[0]
    except Exception:
        return None
    return list(first.keys()) if isinstance(first, dict) else None


class PEARSFTTrainer(SFTTrainer):
    """SFTTrainer with the PEAR loss. ``pear_config`` patches the model (default PEARConfig())."""

    def __init__(self, model=None, args: Optional["SFTConfig"] = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, *, pear_config: Optional[PEARConfig] = None, **kwargs):
        if model is None or isinstance(model, str):
            raise ValueError("PEARSFTTrainer needs a model instance, patched before TRL wraps its forward")
        if processing_class is None:
            raise ValueError("PEARSFTTrainer needs processing_class (the tokenizer the data was built with)")
        if args is None:
            args = pear_sft_config("pear-sft")
        if not isinstance(args, SFTConfig):
            raise TypeError(f"args must be an SFTConfig (see pear_sft_config), got {type(args).__name__}")
        if not (args.dataset_kwargs or {}).get("skip_prepare_dataset", False):
            raise ValueError(
                "SFTTrainer's dataset preparation re-tokenizes and appends EOS, which misaligns stored behavior "
                "log-probs: set dataset_kwargs={'skip_prepare_dataset': True} (pear_sft_config does)"
            )
        if args.packing:
            raise ValueError("packing=True re-packs prepared data; use padding_free=True to pack at collation")
        if args.completion_only_loss is False:
            raise ValueError(
                "completion_only_loss=False would train on prompt tokens, which have no behavior log-probs: "
                "PEAR supervises the response only (leave it None or True)"
            )
        if args.loss_type == "dft":
            raise ValueError("loss_type='dft' replaces the loss; it cannot be combined with PEAR")
        if args.label_smoothing_factor > 0:
            raise ValueError("label_smoothing_factor > 0 replaces the model's loss; it cannot be combined with PEAR")
        # a PEARDataset (load_pear_dataset's result) is accepted as it is: TRL wants a datasets.Dataset
        from .data import PEARDataset

        if isinstance(train_dataset, PEARDataset):
            train_dataset = train_dataset.to_hf_dataset()
        if isinstance(eval_dataset, PEARDataset):
            eval_dataset = eval_dataset.to_hf_dataset()
        for name, ds in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            cols = _columns(ds)
            if cols is not None and not all(c in cols for c in _REQUIRED_COLUMNS):
                raise ValueError(
                    f"{name} has columns {cols}; PEAR needs {list(_REQUIRED_COLUMNS)}: build it with "
                    "load_pear_dataset(...).to_hf_dataset()"
                )
        # patch first: TRL's add_fused_lm_head wraps whatever forward the model has at __init__
        prepare_pear_model(model, pear_config)
        padding_free = bool(args.padding_free)
        if args.padding_free or args.assistant_only_loss:
            # TRL refuses a custom collator with padding_free=True; PEARDataCollator packs by itself
            # (position_ids restart per example), so TRL is told padding_free=False on a copy.
            # assistant_only_loss holds by construction (labels cover the reply only); TRL would
            # look for a chat-template mask that pre-tokenized data does not carry.
            args = copy.copy(args)
            args.padding_free = False
            args.assistant_only_loss = False
        if data_collator is None:
            data_collator = default_pear_collator(processing_class, model, padding_free=padding_free)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        # TRL's use_liger_kernel=True applies Liger inside __init__, after the patch above: put
        # the PEAR forward back on top (Liger's RMSNorm/RoPE/SwiGLU module patches stay)
        prepare_pear_model(self.model, pear_config)
        check_loss_not_replaced(self)
        self._pear_metrics = PEARMetrics()

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for c in ("behavior_logprobs", "attention_mask", "position_ids"):
            if c not in self._signature_columns:
                self._signature_columns.append(c)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        require_pear_forward(model)  # a later patch (Liger's fused CE) must not silently win
        mode = "train" if self.model.training else "eval"
        if model.training and "behavior_logprobs" not in inputs:
            raise KeyError("the batch has no 'behavior_logprobs': use PEARDataCollator (the default here)")
        inputs = dict(inputs)
        inputs["use_cache"] = False
        if num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**inputs)  # no fused_lm_head: TRL's wrapper hands the call to the PEAR forward
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        # as Trainer.compute_loss / SFTTrainer: num_items_in_batch counts every rank's tokens, DDP averages
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        metrics = outputs.get("pear_metrics") if hasattr(outputs, "get") else None
        if metrics:
            self._pear_metrics.add(metrics)
        if mode == "train":
            mask = inputs.get("attention_mask")
            n = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(n.to(self.accelerator.device)).sum())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        if "loss" in logs or not any(k.startswith("eval_") for k in logs):
            logs = {**logs, **self._pear_metrics.summary(_sum_across(self))}
            self._pear_metrics.reset()
        super().log(logs, start_time)


