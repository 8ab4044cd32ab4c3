"""Tiny causal LMs built from a config (no downloads), and their final hidden states.

transformers is imported here, lazily: the rest of pear_kernels never needs it.
"""

from __future__ import annotations

import torch

__all__ = ["tiny_qwen2", "final_hidden_states", "lm_head_params"]


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise ImportError("pear_kernels.rl models need transformers: pip install pear_kernels[hf]") from err
    return transformers


def tiny_qwen2(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 128,
    seed: int = 0,
):
    """A randomly initialised Qwen2ForCausalLM in float32 (untied head, so SFT moves W freely):
    the package's one tiny-model builder (``transformers.tiny.tiny_causal_lm``) with the RL
    loop's defaults (no special tokens in the config, transformers' default attention)."""
    _transformers()  # the error that names the extra
    from ..transformers.tiny import tiny_causal_lm

    model = tiny_causal_lm(
        arch="qwen2", vocab_size=vocab_size, hidden_size=hidden_size, layers=num_layers,
        intermediate_size=intermediate_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
        max_positions=max_positions, seed=seed, special_tokens=False, attn_implementation=None,
        use_cache=False, attention_dropout=0.0,
    )
    return model.float()


def final_hidden_states(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L, H) hidden states after the final norm: what the LM head multiplies.

    Sequences are right-padded, so causal attention alone keeps padding from reaching any
    real position and no attention mask is needed.
    """
    return model.model(input_ids=input_ids, use_cache=False).last_hidden_state


def lm_head_params(model):
    """(weight, bias) of the output projection; bias is None for Qwen2."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)
