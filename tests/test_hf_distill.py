"""Distillation through the Hugging Face path: stored teacher top-k rides along input_ids like
the behavior log-probs, shifted inside the patched model, padded or packed by the collator."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from pear_kernels import PEARConfig, fused_pear_distill_loss  # noqa: E402
from pear_kernels.transformers import (  # noqa: E402
    PEARDataCollator,
    apply_pear_kernel,
    collect_behavior_logprobs,
    load_pear_dataset,
)

from . import hf_utils  # noqa: E402


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model_dir = hf_utils.save_model_dir(root / "teacher", seed=3)
    recs = hf_utils.text_records(4)
    for r in recs:
        r.pop("behavior_logprobs")
    data = hf_utils.write_jsonl(root / "d.jsonl", recs)
    collect_behavior_logprobs(model_dir, data, str(root / "out"), tokenizer=hf_utils.tokenizer(), progress=False,
                              top_k_store=5)
    return load_pear_dataset(str(root / "out"), hf_utils.tokenizer())


@pytest.mark.parametrize("padding_free", [False, True])
def test_patched_model_distils_like_the_direct_call(collected, padding_free):
    feats = [collected[i] for i in range(len(collected))]
    assert "teacher_ids" in feats[0] and len(feats[0]["teacher_ids"]) == len(feats[0]["input_ids"])
    batch = PEARDataCollator(pad_token_id=hf_utils.tokenizer().pad_token_id, padding_free=padding_free)(feats)
    m = hf_utils.model(seed=5).train()
    apply_pear_kernel(m, PEARConfig(variant="token"), distill={"tail": "bucket", "hard_weight": 0.25})
    loss = m(**batch).loss
    # the same loss computed by hand: shift by one, per example
    ref_model = hf_utils.model(seed=5)
    total, count = 0.0, 0
    for f in feats:
        ids = torch.tensor([f["input_ids"]])
        with torch.no_grad():
            h = ref_model.model(input_ids=ids).last_hidden_state[0, :-1]
        y = torch.tensor(f["labels"][1:])
        per = fused_pear_distill_loss(
            h, ref_model.lm_head.weight.detach(), y, torch.tensor(f["behavior_logprobs"][1:]),
            torch.tensor(f["teacher_ids"][1:]), torch.tensor(f["teacher_logprobs"][1:]),
            config=PEARConfig(variant="token"), tail="bucket", hard_weight=0.25, reduction="sum",
        )
        total += float(per)
        count += int((y != -100).sum())
    assert float(loss) == pytest.approx(total / count, rel=1e-5)
    loss.backward()
    assert m.lm_head.weight.grad is not None


def test_pear_trainer_takes_a_distill_config(collected, tmp_path):
    from transformers import TrainingArguments

    from pear_kernels.transformers import PEARTrainer, pear_state

    m = hf_utils.model(seed=5)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-2, logging_steps=1)
    trainer = PEARTrainer(model=m, args=args, train_dataset=collected, processing_class=hf_utils.tokenizer(),
                          distill_config={"tail": "renormalize", "hard_weight": 0.5})
    assert pear_state(m).distill == {"tail": "renormalize", "hard_weight": 0.5}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)
