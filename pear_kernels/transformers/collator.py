"""PEARDataCollator: pads (or packs) examples, keeping behavior log-probs aligned with input_ids.

The stock collators either drop unknown columns (TRL's DataCollatorForLanguageModeling,
transformers' default_data_collator with remove_unused_columns) or pad only the columns they
know. Here every per-token column is padded by the same amount on the same side:
input_ids with the pad id, attention_mask with 0, labels with -100 (so padding is never
supervised) and behavior_logprobs with 0.0 (unused where labels are -100).

``padding_free=True`` concatenates the batch into one row with ``position_ids`` restarting at 0
for each example (what DataCollatorWithFlattening does); the patched forward recovers the
sequence boundaries from the positions, so no PEAR weight crosses one.

flash-attn: with ``attn_implementation="flash_attention_2"`` (GPU, flash-attn installed),
transformers runs varlen attention on such a packed row: from ``position_ids`` it derives
``cu_seq_lens_q/k`` and ``max_length_q/k`` itself, or takes them from the batch when
``return_flash_attn_kwargs=True`` (int32 cumulative lengths, Python-int max lengths, exactly
as DataCollatorWithFlattening(return_flash_attn_kwargs=True) returns them), which spares the
derivation (a host sync) in every layer. No attention crosses a packed boundary either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from ..checks import IGNORE_INDEX

__all__ = ["PEARDataCollator"]

_COLUMNS = ("input_ids", "labels", "behavior_logprobs")
# stored teacher top-k for distillation: (tokens, K) per example, aligned with input_ids
_TEACHER_COLUMNS = ("teacher_ids", "teacher_logprobs")


@dataclass
class PEARDataCollator:
    pad_token_id: int = 0
    padding_side: str = "right"
    pad_to_multiple_of: Optional[int] = None
    padding_free: bool = False
    ignore_index: int = IGNORE_INDEX
    return_flash_attn_kwargs: bool = False

    def __post_init__(self):
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.pad_to_multiple_of is not None and (
            not isinstance(self.pad_to_multiple_of, int) or self.pad_to_multiple_of < 1
        ):
            raise ValueError(f"pad_to_multiple_of must be a positive int, got {self.pad_to_multiple_of!r}")
        if self.pad_token_id is None:
            raise ValueError("pad_token_id must be an int (the tokenizer has no pad token: set one)")

    def _check(self, features: List[Dict[str, Any]]) -> List[Dict[str, list]]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        rows = []
        for i, f in enumerate(features):
            missing = [c for c in _COLUMNS if c not in f]
            if missing:
                raise KeyError(
                    f"example {i} of the batch lacks {missing}; PEAR needs input_ids, labels and "
                    "behavior_logprobs (build examples with pear_kernels.transformers.load_pear_dataset)"
                )
            cols = _COLUMNS + tuple(c for c in _TEACHER_COLUMNS if c in f)
            if sum(c in f for c in _TEACHER_COLUMNS) == 1:
                raise KeyError(f"example {i} of the batch has only one of {list(_TEACHER_COLUMNS)}")
            if i and ("teacher_ids" in f) != ("teacher_ids" in rows[0]):
                raise KeyError("some examples of the batch carry teacher top-k columns and some do not")
            row = {c: (f[c].tolist() if torch.is_tensor(f[c]) else list(f[c])) for c in cols}
            n = len(row["input_ids"])
            for c in ("labels", "behavior_logprobs") + tuple(c for c in _TEACHER_COLUMNS if c in row):
                if len(row[c]) != n:
                    raise ValueError(
                        f"example {i} of the batch: {c} has {len(row[c])} entries but input_ids has {n}; "
                        "they must be aligned token for token"
                    )
            if n == 0:
                raise ValueError(f"example {i} of the batch is empty")
            rows.append(row)
        return rows

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        rows = self._check(features)
        if self.padding_free:
            ids = [t for r in rows for t in r["input_ids"]]
            labels = []
            for r in rows:
                # the first token of each example has no prediction inside its own sequence
                labels += [self.ignore_index] + r["labels"][1:]
            behavior = [v for r in rows for v in r["behavior_logprobs"]]
            positions = [p for r in rows for p in range(len(r["input_ids"]))]
            batch = {
                "input_ids": torch.tensor([ids], dtype=torch.long),
                "labels": torch.tensor([labels], dtype=torch.long),
                "behavior_logprobs": torch.tensor([behavior], dtype=torch.float32),
                "position_ids": torch.tensor([positions], dtype=torch.long),
            }
            if "teacher_ids" in rows[0]:
                batch["teacher_ids"] = torch.tensor([[t for r in rows for t in r["teacher_ids"]]], dtype=torch.long)
                batch["teacher_logprobs"] = torch.tensor([[t for r in rows for t in r["teacher_logprobs"]]],
                                                         dtype=torch.float32)
            if self.return_flash_attn_kwargs:
                lengths = [len(r["input_ids"]) for r in rows]
                cu = [0]
                for n in lengths:
                    cu.append(cu[-1] + n)
                batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor(cu, dtype=torch.int32)
                batch["max_length_q"] = batch["max_length_k"] = max(lengths)
            return batch
        if self.return_flash_attn_kwargs:
            raise ValueError("return_flash_attn_kwargs=True needs padding_free=True (a packed row)")
        length = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        batch = {
            "input_ids": torch.full((len(rows), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), length), dtype=torch.long),
            "labels": torch.full((len(rows), length), self.ignore_index, dtype=torch.long),
            "behavior_logprobs": torch.zeros((len(rows), length), dtype=torch.float32),
        }
        if "teacher_ids" in rows[0]:
            K = len(rows[0]["teacher_ids"][0])
            # padding rows: K distinct ids and zero log-probs (never supervised: labels are -100)
            batch["teacher_ids"] = torch.arange(K).repeat(len(rows), length, 1)
            batch["teacher_logprobs"] = torch.zeros((len(rows), length, K), dtype=torch.float32)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            span = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            if "teacher_ids" in r:
                batch["teacher_ids"][b, span] = torch.tensor(r["teacher_ids"], dtype=torch.long)
                batch["teacher_logprobs"][b, span] = torch.tensor(r["teacher_logprobs"], dtype=torch.float32)
            batch["input_ids"][b, span] = torch.tensor(r["input_ids"], dtype=torch.long)
            batch["attention_mask"][b, span] = 1
            batch["labels"][b, span] = torch.tensor(r["labels"], dtype=torch.long)
            batch["behavior_logprobs"][b, span] = torch.tensor(r["behavior_logprobs"], dtype=torch.float32)
        return batch
