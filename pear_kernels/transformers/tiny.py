"""Tiny offline models and tokenizers, for tests, examples and smoke runs (no downloads).

``tiny_tokenizer()`` builds a word-level PreTrainedTokenizerFast with the `tokenizers`
library (BOS prepended, EOS/pad set, a chat template); ``tiny_causal_lm()`` a randomly
initialised Qwen2/Qwen3/Llama with a few thousand parameters per layer.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["TINY_WORDS", "tiny_tokenizer", "tiny_causal_lm", "tiny_corpus"]

TINY_WORDS = (
    "the a cat dog sat ran on under mat tree is was red blue big small one two three four five "
    "what where who why how and or not yes no add plus equals answer question think so then it "
    "six seven eight nine ten zero . , ? !"
).split()

_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer(words: Optional[Sequence[str]] = None):
    """A word-level tokenizer over ``words`` (default TINY_WORDS) plus special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIAL)}
    for w in words or TINY_WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=_SPECIAL[4:],
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def tiny_causal_lm(
    tokenizer=None,
    arch: str = "qwen2",
    *,
    hidden_size: int = 32,
    layers: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    vocab_size: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = 512,
    special_tokens: bool = True,
    attn_implementation: Optional[str] = "eager",
    **config_kwargs,
):
    """A randomly initialised tiny causal LM (``arch``: qwen2, qwen3, llama, gemma2 or gemma3),
    float32, eager attention. The Gemma ones soft-cap their logits (final_logit_softcapping).

    The one offline model builder of the package (examples, tests, the RL loop's
    ``rl.tiny_qwen2``). ``special_tokens=False`` leaves pad/bos/eos unset in the config (a
    pad id also zeroes that embedding row at init); ``attn_implementation=None`` keeps
    transformers' default; further keywords go to the config (``use_cache=False``, ...)."""
    import transformers

    if vocab_size is None:
        vocab_size = len(tokenizer) if tokenizer is not None else 64
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size,
        intermediate_size=2 * hidden_size if intermediate_size is None else intermediate_size,
        num_hidden_layers=layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=tie_word_embeddings,
        **config_kwargs,
    )
    if special_tokens:
        common.update(pad_token_id=getattr(tokenizer, "pad_token_id", 0),
                      bos_token_id=getattr(tokenizer, "bos_token_id", None),
                      eos_token_id=getattr(tokenizer, "eos_token_id", None))
    classes = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3": (getattr(transformers, "Gemma3TextConfig", None), getattr(transformers, "Gemma3ForCausalLM", None)),
    }
    if arch not in classes:
        raise ValueError(f"arch must be one of {sorted(classes)}, got {arch!r}")
    config_cls, model_cls = classes[arch]
    extra = {"head_dim": hidden_size // 4} if arch in ("qwen3", "gemma2", "gemma3") else {}
    if arch.startswith("gemma"):
        # a small cap, so the soft-capping visibly changes the logits of a tiny model
        extra.update(final_logit_softcapping=2.0, query_pre_attn_scalar=hidden_size // 4, sliding_window=64)
    config = config_cls(**common, **extra)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config)
    return model


def tiny_corpus(n: int, seed: int = 0):
    """``n`` (prompt, response) text pairs over TINY_WORDS with a learnable pattern."""
    g = torch.Generator().manual_seed(seed)
    nums = "zero one two three four five six seven eight nine".split()
    pairs = []
    for _ in range(n):
        a, b = (int(x) for x in torch.randint(0, 5, (2,), generator=g))
        subject = ["the cat", "the dog", "a big cat", "a small dog"][int(torch.randint(0, 4, (1,), generator=g))]
        prompt = f"what is {nums[a]} plus {nums[b]} ?"
        response = f"think . {nums[a]} plus {nums[b]} equals {nums[a + b]} . so {subject} sat on {nums[a + b]} mat ."
        pairs.append((prompt, response))
    return pairs
