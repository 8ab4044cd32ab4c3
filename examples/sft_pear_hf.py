"""End to end with Hugging Face: collect behavior log-probs with a teacher, then PEAR SFT a student.

1. A teacher (the behavior policy) is "trained" briefly with plain SFT so that it is confident
   on the data, and saved as a local model directory.
2. ``collect_behavior_logprobs`` (the Python API of ``pear-kernels collect``) scores every
   response token with it: fused log-prob forward, length-sorted batches, atomic shards.
3. The student is trained with PEARTrainer (the PEAR-patched model, PEARDataCollator) and,
   with ``--trl``, TRL's SFTTrainer via PEARSFTTrainer; the log shows the PEAR weight
   statistics (mean weight, ESS fraction, clip fractions).

Tiny random models and a word-level tokenizer built on the spot: runs offline on CPU in well
under a minute.  python examples/sft_pear_hf.py [--trl] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

import torch
from transformers import Trainer, TrainingArguments

from pear_kernels import PEARConfig
from pear_kernels.transformers import (
    PEARDataCollator,
    PEARTrainer,
    collect_behavior_logprobs,
    load_pear_dataset,
)
from pear_kernels.transformers.tiny import tiny_causal_lm, tiny_corpus, tiny_tokenizer


def sft_examples(tokenizer, pairs):
    """Plain SFT examples (no behavior log-probs) to warm up the teacher."""
    out = []
    for prompt, response in pairs:
        p = tokenizer(prompt)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append({"input_ids": p + r, "labels": [-100] * len(p) + r, "behavior_logprobs": [0.0] * (len(p) + len(r))})
    return out


class _PlainCollator(PEARDataCollator):
    def __call__(self, features):
        batch = super().__call__(features)
        batch.pop("behavior_logprobs")
        return batch


def train_args(out, steps, lr, **kw):
    return TrainingArguments(
        output_dir=out, per_device_train_batch_size=8, max_steps=steps, learning_rate=lr, logging_steps=max(steps // 4, 1),
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, lr_scheduler_type="constant", **kw,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="student training steps")
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--trl", action="store_true", help="also train with TRL's SFTTrainer (PEARSFTTrainer)")
    parser.add_argument("--workdir", default=None, help="keep files here (default: a temporary directory)")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.time()
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="pear_hf_")
    workdir = args.workdir or tmp.name
    tok = tiny_tokenizer()
    pairs = tiny_corpus(args.examples, seed=0)

    # 1. the teacher: a tiny model fitted to the data with ordinary SFT, saved as a model directory
    teacher = tiny_causal_lm(tok, "llama", hidden_size=32, seed=1)
    Trainer(model=teacher, args=train_args(os.path.join(workdir, "teacher_run"), 16, 1e-2, remove_unused_columns=False),
            train_dataset=sft_examples(tok, pairs), data_collator=_PlainCollator(pad_token_id=tok.pad_token_id)).train()
    teacher_dir = os.path.join(workdir, "teacher")
    teacher.save_pretrained(teacher_dir)

    # 2. behavior log-probs of the data under the teacher
    data_path = os.path.join(workdir, "data.jsonl")
    with open(data_path, "w") as f:
        for prompt, response in pairs:
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    result = collect_behavior_logprobs(teacher_dir, data_path, os.path.join(workdir, "collected"), tokenizer=tok,
                                       shard_size=16, append_eos=True, progress=False)
    print(f"collected {result.num_examples} examples in {result.shards_total} shards -> {result.output_dir}")
    dataset = load_pear_dataset(result.output_dir, tok)
    lp = torch.tensor([v for ex in dataset for v, y in zip(ex["behavior_logprobs"], ex["labels"]) if y != -100])
    print(f"teacher: mean log-prob per response token {lp.mean():.3f} over {lp.numel()} tokens")

    # 3. PEAR SFT of a fresh student (token variant, paper defaults)
    student = tiny_causal_lm(tok, "qwen2", hidden_size=32, seed=2)
    trainer = PEARTrainer(model=student, args=train_args(os.path.join(workdir, "student"), args.steps, 1e-2),
                          train_dataset=dataset, processing_class=tok, pear_config=PEARConfig())
    trainer.train()
    print("\nPEARTrainer log:")
    print(f"{'step':>5}{'loss':>9}{'mean w':>9}{'ESS frac':>10}{'ratio clip':>12}{'w clip':>8}")
    for h in trainer.state.log_history:
        if "loss" in h:
            print(f"{h['step']:>5}{h['loss']:>9.4f}{h['pear/mean_weight']:>9.4f}{h['pear/ess_fraction']:>10.3f}"
                  f"{h['pear/ratio_clip_fraction']:>12.3f}{h['pear/weight_clip_fraction']:>8.3f}")

    if args.trl:
        from pear_kernels.transformers import PEARSFTTrainer, pear_sft_config

        student2 = tiny_causal_lm(tok, "qwen2", hidden_size=32, seed=2)
        cfg = pear_sft_config(os.path.join(workdir, "student_trl"), per_device_train_batch_size=8,
                              max_steps=args.steps, learning_rate=1e-2, logging_steps=max(args.steps // 4, 1),
                              save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True, seed=0,
                              lr_scheduler_type="constant")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trl_trainer = PEARSFTTrainer(model=student2, args=cfg, train_dataset=dataset.to_hf_dataset(),
                                         processing_class=tok)
            trl_trainer.train()
        losses = [round(h["loss"], 4) for h in trl_trainer.state.log_history if "loss" in h]
        print(f"\nPEARSFTTrainer (TRL) losses: {losses}")
    print(f"\ndone in {time.time() - start:.1f} s" + (f" (files in {workdir})" if tmp is None else ""))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
