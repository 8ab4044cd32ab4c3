"""Token layout shared by SFT and RL: [BOS] prompt completion, right-padded.

Position t of ``hidden[:, :-1]`` predicts ``input_ids[:, t + 1]``; ``labels`` holds that
target where it is a completion token and ``ignore_index`` elsewhere (prompt, padding).
Per-token behavior log-probs are placed on exactly the same positions as their labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..checks import IGNORE_INDEX  # the one definition, re-exported
from .tokenizer import CharTokenizer

__all__ = ["TokenBatch", "encode_batch", "IGNORE_INDEX"]



@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (B, L) int64
    labels: torch.Tensor  # (B, L - 1) int64, IGNORE_INDEX off the completions
    behavior_logprobs: Optional[torch.Tensor]  # (B, L - 1) float32, 0 off the completions

    @property
    def mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX


def encode_batch(
    tokenizer: CharTokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    behavior_logprobs: Optional[Sequence[Sequence[float]]] = None,
) -> TokenBatch:
    """Encode (prompt, completion) pairs; completions may be empty."""
    if len(prompts) != len(completions):
        raise ValueError(f"prompts ({len(prompts)}) and completions ({len(completions)}) differ in length")
    rows: List[List[int]] = []
    starts: List[int] = []
    for prompt, completion in zip(prompts, completions):
        p = [tokenizer.bos_id] + tokenizer.encode(prompt)
        rows.append(p + tokenizer.encode(completion))
        starts.append(len(p))
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length - 1), IGNORE_INDEX, dtype=torch.long)
    blp = torch.zeros((len(rows), length - 1), dtype=torch.float32) if behavior_logprobs is not None else None
    for i, (row, start) in enumerate(zip(rows, starts)):
        ids[i, : len(row)] = torch.tensor(row)
        n = len(row) - start  # completion tokens; label index t predicts token t + 1
        if n:
            labels[i, start - 1 : start - 1 + n] = ids[i, start : start + n]
        if blp is not None:
            lp = behavior_logprobs[i]
            if len(lp) != n:
                raise ValueError(
                    f"behavior_logprobs[{i}] has {len(lp)} entries for a completion of {n} tokens"
                )
            blp[i, start - 1 : start - 1 + n] = torch.tensor(lp, dtype=torch.float32)
    return TokenBatch(ids, labels, blp)
