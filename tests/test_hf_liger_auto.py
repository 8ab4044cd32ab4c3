"""Liger-Kernel alongside the PEAR patch (either order), and AutoPEARKernelForCausalLM."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from pear_kernels import PEARConfig  # noqa: E402
from pear_kernels.transformers import (  # noqa: E402
    AutoPEARKernelForCausalLM,
    PEARDataCollator,
    apply_pear_kernel,
    load_pear_dataset,
    pear_state,
    require_pear_forward,
)

from . import hf_utils  # noqa: E402


def _batch():
    tok = hf_utils.tokenizer()
    ds = load_pear_dataset(hf_utils.text_records(3), tok)
    return PEARDataCollator(pad_token_id=tok.pad_token_id)([ds[i] for i in range(3)])


def _liger_flce(model):
    liger = pytest.importorskip("liger_kernel.transformers")
    # only the forward swap (the fused linear cross-entropy): Liger's module kernels are Triton
    liger.apply_liger_kernel_to_qwen2(rope=False, rms_norm=False, swiglu=False,
                                      fused_linear_cross_entropy=True, model=model)


def test_liger_after_pear_is_detected_never_silent():
    m = hf_utils.model(seed=2).train()
    apply_pear_kernel(m, PEARConfig(variant="token"))
    assert pear_state(m) is not None
    _liger_flce(m)
    # the forward is Liger's now: the model is not PEAR-patched any more, and says so
    assert pear_state(m) is None
    with pytest.raises(RuntimeError, match="PEAR forward was replaced"):
        require_pear_forward(m)
    # applying the PEAR patch again puts it back on top
    apply_pear_kernel(m, PEARConfig(variant="token"))
    assert pear_state(m) is not None
    require_pear_forward(m)


def test_pear_after_liger_gives_the_pear_loss():
    batch = _batch()
    m = hf_utils.model(seed=2).train()
    ref = hf_utils.model(seed=2).train()
    _liger_flce(m)
    apply_pear_kernel(m, PEARConfig(variant="token"))
    apply_pear_kernel(ref, PEARConfig(variant="token"))
    a = m(**batch).loss
    b = ref(**batch).loss
    torch.testing.assert_close(a, b)
    assert hasattr(m(**batch), "pear_metrics")


def test_pear_trainer_refuses_a_replaced_forward(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from pear_kernels.transformers import PEARTrainer

    tok = hf_utils.tokenizer()
    ds = load_pear_dataset(hf_utils.text_records(4), tok)
    m = hf_utils.model(seed=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no")
    trainer = PEARTrainer(model=m, args=args, train_dataset=ds, processing_class=tok, pear_config=PEARConfig())
    _liger_flce(m)  # a patch after the trainer was built
    with pytest.raises(RuntimeError, match="PEAR forward was replaced"):
        trainer.train()


def test_auto_pear_kernel_loads_and_patches(tmp_path):
    path = hf_utils.save_model_dir(tmp_path / "m", seed=4)
    m = AutoPEARKernelForCausalLM.from_pretrained(path, pear_config={"variant": "block", "block_size": 2})
    state = pear_state(m)
    assert state is not None and state.config.variant.value == "block" and state.config.block_size == 2
    m.train()
    ref = hf_utils.model(seed=4).train()
    apply_pear_kernel(ref, PEARConfig(variant="block", block_size=2))
    batch = _batch()
    torch.testing.assert_close(m(**batch).loss, ref(**batch).loss)
