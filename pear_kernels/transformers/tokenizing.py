"""Tokenizing one PEAR record (text, chat or token ids) into (prompt_ids, response_ids).

Shared by data.py (building training examples) and collect.py (scoring them); the record
forms are described in data.py.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from .formats import DataFormatError

__all__ = ["tokenize_record"]


def _token_ids(out) -> List[int]:
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    if torch.is_tensor(out):
        out = out.tolist()
    if out and isinstance(out[0], list):  # batched output of one conversation
        out = out[0]
    return [int(x) for x in out]


def _chat_ids(tokenizer, messages, add_generation_prompt: bool) -> List[int]:
    return _token_ids(tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False,
    ))


def tokenize_record(
    rec: Dict[str, Any],
    tokenizer=None,
    *,
    where: str = "record",
    add_special_tokens: bool = True,
    append_eos: bool = False,
) -> Tuple[List[int], List[int]]:
    """(prompt_ids, response_ids) of one record."""
    if rec.get("prompt_ids") is not None or rec.get("response_ids") is not None:
        if rec.get("prompt_ids") is None or rec.get("response_ids") is None:
            raise DataFormatError(f"{where}: token-id records need both 'prompt_ids' and 'response_ids'")
        return list(rec["prompt_ids"]), list(rec["response_ids"])
    if tokenizer is None:
        raise DataFormatError(f"{where}: a text record needs a tokenizer (pass tokenizer=...)")
    if rec.get("messages") is not None:
        messages = rec["messages"]
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise DataFormatError(f"{where}: 'messages' must end with an assistant message after the prompt")
        prompt_ids = _chat_ids(tokenizer, messages[:-1], True)
        full = _chat_ids(tokenizer, messages, False)
        if full[: len(prompt_ids)] != prompt_ids:
            raise DataFormatError(
                f"{where}: the chat template of the conversation does not start with the template of its "
                "prompt (with add_generation_prompt=True); the response cannot be located"
            )
        return prompt_ids, full[len(prompt_ids):]
    if rec.get("prompt") is None or rec.get("response") is None:
        raise DataFormatError(
            f"{where}: a record needs 'prompt' and 'response', 'messages', or 'prompt_ids' and 'response_ids'"
        )
    prompt_ids = _token_ids(tokenizer(rec["prompt"], add_special_tokens=add_special_tokens))
    response_ids = _token_ids(tokenizer(rec["response"], add_special_tokens=False))
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True but the tokenizer has no eos_token_id")
        response_ids.append(int(tokenizer.eos_token_id))
    return prompt_ids, response_ids
