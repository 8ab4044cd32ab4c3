"""The padding-free collator's output is what transformers' flash-attention path expects
(checked on CPU without importing flash-attn): the same keys, dtypes and values as
DataCollatorWithFlattening(return_flash_attn_kwargs=True) and as transformers' own
derivation from position_ids; and the patched model reads the boundaries from either."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers.data.data_collator import DataCollatorWithFlattening  # noqa: E402

from pear_kernels.transformers import PEARDataCollator, load_pear_dataset  # noqa: E402

from . import hf_utils  # noqa: E402


def _features(n=3):
    ds = load_pear_dataset(hf_utils.text_records(n), hf_utils.tokenizer())
    return [ds[i] for i in range(n)]


def test_flash_attn_kwargs_match_transformers_collator():
    feats = _features()
    ours = PEARDataCollator(padding_free=True, return_flash_attn_kwargs=True)(feats)
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in feats]
    )
    for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids", "input_ids"):
        a, b = ours[key], theirs[key]
        if torch.is_tensor(b):
            assert a.dtype == b.dtype and torch.equal(a, b), key
        else:
            assert type(a) is type(b) and a == b, key
    # labels: both mark the first token of every packed example as unsupervised
    assert torch.equal(ours["labels"], theirs["labels"])
    assert ours["behavior_logprobs"].shape == ours["input_ids"].shape


def test_flash_attn_kwargs_match_transformers_derivation_from_positions():
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    ours = PEARDataCollator(padding_free=True, return_flash_attn_kwargs=True)(_features())
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(ours["position_ids"])
    assert torch.equal(cu_q, ours["cu_seq_lens_q"]) and cu_q.dtype == ours["cu_seq_lens_q"].dtype
    assert int(max_q) == ours["max_length_q"]


def test_flash_attn_kwargs_need_padding_free():
    with pytest.raises(ValueError, match="padding_free"):
        PEARDataCollator(return_flash_attn_kwargs=True)(_features())


def test_patched_model_reads_boundaries_from_flash_kwargs():
    """The same packed batch with position_ids or with cu_seq_lens only gives the same loss."""
    from pear_kernels import PEARConfig
    from pear_kernels.transformers import apply_pear_kernel

    m = hf_utils.model(seed=1).train()
    apply_pear_kernel(m, PEARConfig(variant="token"))
    batch = PEARDataCollator(padding_free=True, return_flash_attn_kwargs=True)(_features())
    a = m(input_ids=batch["input_ids"], labels=batch["labels"], behavior_logprobs=batch["behavior_logprobs"],
          position_ids=batch["position_ids"]).loss
    b = m(input_ids=batch["input_ids"], labels=batch["labels"], behavior_logprobs=batch["behavior_logprobs"],
          position_ids=batch["position_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"]).loss
    torch.testing.assert_close(a, b)
