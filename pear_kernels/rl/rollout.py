"""Sampling completions from a causal LM, a few lines of plain PyTorch.

Prompts of equal token length are generated together, so the batch has no padding at all:
every step re-runs the model on the whole (short) sequence and samples the next token from
the last position's logits. No KV cache: for the tiny tasks here (< 40 tokens) recomputation
is cheap and keeps the loop obviously correct. Tokens after a row's EOS are discarded.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch

from .tokenizer import CharTokenizer

__all__ = ["generate"]


@torch.no_grad()
def _generate_same_length(model, prompt_ids: torch.Tensor, eos_id: int, max_new_tokens: int,
                          temperature: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    ids = prompt_ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        if temperature == 0.0:
            nxt = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        ids = torch.cat([ids, nxt.unsqueeze(1)], dim=1)
        done |= nxt == eos_id
        if bool(done.all()):
            break
    return ids[:, prompt_ids.shape[1]:]


def generate(
    model,
    tokenizer: CharTokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    generator: Optional[torch.Generator] = None,
    batch_size: int = 512,
) -> List[str]:
    """One completion per prompt (repeat a prompt to get several), cut after the first EOS.

    ``temperature`` 0 is greedy decoding. A completion that never emits EOS is returned as is
    (the checker then rejects it).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    was_training = model.training
    model.eval()
    by_length: Dict[int, List[int]] = defaultdict(list)
    encoded = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    out: List[str] = [""] * len(prompts)
    for length in sorted(by_length):
        rows = by_length[length]
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            prompt_ids = torch.tensor([encoded[i] for i in chunk], dtype=torch.long)
            new = _generate_same_length(model, prompt_ids, tokenizer.eos_id, max_new_tokens, temperature, generator)
            for i, row in zip(chunk, new.tolist()):
                out[i] = tokenizer.decode(row, stop_at_eos=True)
    model.train(was_training)
    return out
