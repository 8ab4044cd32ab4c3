"""Shared offline builders for the Hugging Face tests: tokenizer, tiny models, data files."""

from __future__ import annotations

import functools
import json
import os

import torch

from pear_kernels.transformers.tiny import tiny_causal_lm, tiny_corpus, tiny_tokenizer


@functools.lru_cache(maxsize=1)
def tokenizer():
    return tiny_tokenizer()


def model(arch: str = "qwen2", seed: int = 0, **kwargs):
    return tiny_causal_lm(tokenizer(), arch, seed=seed, **kwargs)


def text_records(n: int, seed: int = 0, logprob: float = -0.7):
    """Text (prompt, response) records with stored response token ids and synthetic log-probs."""
    tok = tokenizer()
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for prompt, response in tiny_corpus(n, seed):
        ids = tok(response, add_special_tokens=False)["input_ids"]
        lps = (logprob + 0.5 * torch.rand(len(ids), generator=g) * logprob).tolist()
        out.append({"prompt": prompt, "response": response, "behavior_token_ids": ids, "behavior_logprobs": lps})
    return out


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return os.fspath(path)


def write_parquet(path, records) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return os.fspath(path)


def save_model_dir(path, seed: int = 0, arch: str = "qwen2") -> str:
    """A model directory without a tokenizer: transformers 5 would load a tokenizer saved next to a
    Qwen2/Llama config as that architecture's own tokenizer class (a different pre-tokenizer), so
    the tiny word-level tokenizer is saved apart (save_tokenizer_dir) and passed explicitly."""
    model(arch, seed=seed).save_pretrained(path)
    return os.fspath(path)


def save_tokenizer_dir(path) -> str:
    tokenizer().save_pretrained(path)
    return os.fspath(path)


def reference_response_logprobs(m, prompt_ids, response_ids):
    """log pi(response | prompt) per token from the full logits of an unpatched forward."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = m(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    P = len(prompt_ids)
    return [float(logp[P - 1 + j, t]) for j, t in enumerate(response_ids)]
