"""Real PEFT heads (skipped when peft is not installed): LoRA on lm_head and modules_to_save."""

from __future__ import annotations

import copy

import pytest
import torch

from pear_kernels import PEARConfig
from pear_kernels.transformers import PEARDataCollator, apply_pear_kernel, load_pear_dataset

from . import hf_utils

peft = pytest.importorskip("peft")


def _batch(n=3):
    tok = hf_utils.tokenizer()
    ds = load_pear_dataset(hf_utils.text_records(n), tok)
    return PEARDataCollator(pad_token_id=tok.pad_token_id)(list(ds))


@pytest.mark.parametrize("how", ["lora_on_head", "lora_bias_on_head", "modules_to_save"])
def test_peft_head_variant_none_equals_unpatched(how):
    base = hf_utils.model().double()
    if how.startswith("lora"):
        cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "lm_head"],
                              lora_bias=how == "lora_bias_on_head")
    else:
        cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"],
                              modules_to_save=["lm_head"])
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():  # lora_B starts at 0; make the adapters change the head
        for name, p in model.named_parameters():
            if "lora_B" in name:  # weights and, with lora_bias, biases
                p.normal_(std=0.1)
    model.train()
    batch = _batch()
    ref_model = copy.deepcopy(model)
    ref = ref_model(**{k: v for k, v in batch.items() if k != "behavior_logprobs"}).loss
    ref.backward()
    apply_pear_kernel(model.get_base_model(), PEARConfig(variant="none"))
    out = model(**batch)
    out.loss.backward()
    assert out.logits is None
    torch.testing.assert_close(out.loss.float(), ref.float(), rtol=1e-6, atol=1e-6)
    ref_params = dict(ref_model.named_parameters())
    head_params = [n for n, p in model.named_parameters() if p.requires_grad and "lm_head" in n]
    assert head_params
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_peft_model_in_pear_trainer(tmp_path):
    from transformers import TrainingArguments

    from pear_kernels.transformers import PEARTrainer

    model = peft.get_peft_model(hf_utils.model(seed=1), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ds = load_pear_dataset(hf_utils.text_records(8), hf_utils.tokenizer()).to_hf_dataset()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=5e-2,
                             logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = PEARTrainer(model=model, args=args, train_dataset=ds, processing_class=hf_utils.tokenizer())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and "pear/mean_weight" in logged[0]


def test_dora_head_is_refused():
    model = peft.get_peft_model(hf_utils.model(), peft.LoraConfig(r=4, target_modules=["lm_head"], use_dora=True))
    with pytest.raises(NotImplementedError, match="DoRA"):
        apply_pear_kernel(model.get_base_model())
