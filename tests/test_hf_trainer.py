"""PEARTrainer and PEARSFTTrainer: short runs that learn, gradient accumulation, refusals."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import TrainingArguments

from pear_kernels import PEARConfig
from pear_kernels.transformers import PEARTrainer, load_pear_dataset
from pear_kernels.transformers.patch import pear_state

from . import hf_utils


def _dataset(n, seed=0):
    return load_pear_dataset(hf_utils.text_records(n, seed=seed), hf_utils.tokenizer())


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=5, learning_rate=1e-2,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        lr_scheduler_type="constant",
    )
    base.update(kw)
    return TrainingArguments(**base)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


_CFG = PEARConfig(delta_clip=(-1.0, 1.0))


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    """5 PEARTrainer steps; the TRL test compares against the same run."""
    model = hf_utils.model(seed=1)
    # a datasets.Dataset under Trainer's remove_unused_columns=True: behavior_logprobs is a forward
    # argument of the patched model, so the column survives
    trainer = PEARTrainer(model=model, args=_args(tmp_path_factory.mktemp("trainer")),
                          train_dataset=_dataset(8).to_hf_dataset(), processing_class=hf_utils.tokenizer(),
                          pear_config=_CFG)
    assert trainer.args.remove_unused_columns
    assert pear_state(model) is not None
    trainer.train()
    return trainer


def test_trainer_five_steps_lower_the_loss_and_log_pear_stats(trainer_run):
    losses = _losses(trainer_run)
    assert len(losses) == 5 and losses[-1] < losses[0]
    logged = [h for h in trainer_run.state.log_history if "loss" in h][0]
    for key in ("pear/mean_weight", "pear/ess_fraction", "pear/ratio_clip_fraction", "pear/weight_clip_fraction"):
        assert key in logged
    assert 0 < logged["pear/mean_weight"] <= 1 and 0 < logged["pear/ess_fraction"] <= 1
    assert logged["pear/supervised_tokens"] > 0
    # evaluation runs the original forward (logits, cross-entropy), behavior_logprobs ignored
    metrics = trainer_run.evaluate(_dataset(4, seed=5).to_hf_dataset())
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """2 micro-batches of 2 with accumulation == 1 batch of 4: Trainer's num_items_in_batch reaches the loss."""
    ds = _dataset(4)
    params = []
    for bs, ga in ((4, 1), (2, 2)):
        model = hf_utils.model(seed=2)
        args = _args(tmp_path / f"{bs}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                     max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0)
        PEARTrainer(model=model, args=args, train_dataset=ds, processing_class=hf_utils.tokenizer()).train()
        params.append({k: p.detach().clone() for k, p in model.named_parameters()})
    start = dict(hf_utils.model(seed=2).named_parameters())
    for k in params[0]:
        torch.testing.assert_close(params[1][k], params[0][k], rtol=1e-4, atol=1e-6, msg=k)
    assert not torch.allclose(params[0]["lm_head.weight"], start["lm_head.weight"])


def test_trainer_refuses_what_would_replace_the_loss(tmp_path):
    with pytest.raises(ValueError, match="label_smoothing"):
        PEARTrainer(model=hf_utils.model(), args=_args(tmp_path, label_smoothing_factor=0.1),
                    train_dataset=_dataset(2), processing_class=hf_utils.tokenizer())


# --- TRL ----------------------------------------------------------------------------------


def test_trl_sft_trainer_five_steps_lower_the_loss(tmp_path, trainer_run):
    """PEARSFTTrainer, padding-free, follows PEARTrainer's padded run step for step: TRL's own loss
    (fused NLL) is not used, behavior log-probs survive its collation, packing keeps sequences apart."""
    from pear_kernels.transformers import PEARSFTTrainer, pear_sft_config

    model = hf_utils.model(seed=1)
    args = pear_sft_config(
        str(tmp_path), per_device_train_batch_size=4, max_steps=5, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True, seed=0, lr_scheduler_type="constant",
        padding_free=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = PEARSFTTrainer(model=model, args=args, train_dataset=_dataset(8).to_hf_dataset(),
                                 processing_class=hf_utils.tokenizer(), pear_config=_CFG)
        assert trainer.data_collator.padding_free
        trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert losses == pytest.approx(_losses(trainer_run), rel=1e-4)
    logged = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert "pear/mean_weight" in logged and "pear/ess_fraction" in logged and logged["pear/supervised_tokens"] > 0


def test_trl_refuses_settings_that_misalign_or_replace_the_loss(tmp_path):
    from trl import SFTConfig

    from pear_kernels.transformers import PEARSFTTrainer, pear_sft_config

    tok = hf_utils.tokenizer()
    ds = _dataset(2).to_hf_dataset()
    with pytest.raises(ValueError, match="skip_prepare_dataset"):
        PEARSFTTrainer(model=hf_utils.model(), args=SFTConfig(str(tmp_path), report_to="none", use_cpu=True),
                       train_dataset=ds, processing_class=tok)
    with pytest.raises(ValueError, match="dft"):
        PEARSFTTrainer(model=hf_utils.model(), args=pear_sft_config(str(tmp_path), loss_type="dft", use_cpu=True),
                       train_dataset=ds, processing_class=tok)
    with pytest.raises(ValueError, match="completion_only_loss=False"):
        PEARSFTTrainer(model=hf_utils.model(), train_dataset=ds, processing_class=tok,
                       args=pear_sft_config(str(tmp_path), completion_only_loss=False, use_cpu=True))
    with pytest.raises(ValueError, match="packing=True"):
        PEARSFTTrainer(model=hf_utils.model(), train_dataset=ds, processing_class=tok,
                       args=pear_sft_config(str(tmp_path), packing=True, use_cpu=True))
    with pytest.raises(ValueError, match="needs \\['input_ids', 'labels', 'behavior_logprobs'\\]"):
        PEARSFTTrainer(model=hf_utils.model(), args=pear_sft_config(str(tmp_path), use_cpu=True),
                       train_dataset=ds.remove_columns("behavior_logprobs"), processing_class=tok)


def test_trl_accepts_a_pear_dataset_completion_and_assistant_only_and_liger(tmp_path):
    """load_pear_dataset's PEARDataset goes straight into PEARSFTTrainer (TRL wants a
    datasets.Dataset); completion_only_loss and assistant_only_loss hold by construction (only
    the reply carries labels), so the flags change nothing; TRL's use_liger_kernel=True (Liger's
    fused cross-entropy patched in during __init__) still trains with the PEAR loss."""
    from pear_kernels.transformers import PEARSFTTrainer, pear_sft_config
    from pear_kernels.transformers.patch import pear_state

    pytest.importorskip("liger_kernel")
    # Liger's RMSNorm/RoPE/SwiGLU are Triton kernels (no CPU); its fused linear cross-entropy
    # replaces the forward, which is what PEAR has to survive
    liger = dict(use_liger_kernel=True, liger_kernel_config={"rope": False, "rms_norm": False, "swiglu": False})
    runs = {"default": {}, "completion_only": dict(completion_only_loss=True),
            "assistant_only": dict(assistant_only_loss=True), "liger": liger}
    losses = {}
    for name, kw in runs.items():
        model = hf_utils.model(seed=1)
        args = pear_sft_config(str(tmp_path / name), per_device_train_batch_size=4, max_steps=2,
                               learning_rate=1e-2, logging_steps=1, save_strategy="no", use_cpu=True, bf16=False,
                               disable_tqdm=True, seed=0, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = PEARSFTTrainer(model=model, args=args, train_dataset=_dataset(8),
                                     processing_class=hf_utils.tokenizer(), pear_config=_CFG)
            assert pear_state(trainer.model) is not None
            trainer.train()
        losses[name] = _losses(trainer)
        assert args.assistant_only_loss == kw.get("assistant_only_loss", False)  # the user's config is untouched
    for name in runs:
        assert losses[name] == pytest.approx(losses["default"], rel=1e-6), name


def test_trl_default_bf16_mixed_precision_keeps_the_pear_loss(tmp_path):
    """TRL's SFTConfig defaults to bf16=True: accelerate then wraps the model's forward
    (autocast + outputs to fp32). The wrapper declares what it wraps, so the PEAR forward is
    still found (it was refused as "replaced"), and the loss is the PEAR loss (its metrics are
    logged) computed in fp32 whatever the autocast."""
    from pear_kernels.transformers import PEARSFTTrainer, pear_sft_config
    from pear_kernels.transformers.patch import pear_state

    model = hf_utils.model(seed=1)
    args = pear_sft_config(str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                           logging_steps=1, save_strategy="no", use_cpu=True, bf16=True, disable_tqdm=True, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = PEARSFTTrainer(model=model, args=args, train_dataset=_dataset(8),
                                 processing_class=hf_utils.tokenizer(), pear_config=_CFG)
        trainer.train()
    assert hasattr(trainer.model.forward, "__wrapped__")  # accelerate's wrapper is in place
    assert pear_state(trainer.model) is not None
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    assert "pear/mean_weight" in logged[0]
