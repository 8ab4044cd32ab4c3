"""Distil a tiny teacher into a smaller student from stored top-k log-probs, on CPU.

The sum-chain task of pear_kernels.rl ('3+5+2:' -> '3+5=8+2=10.'). A teacher (hidden 64) is
trained by plain SFT on the exact solver's traces, then run once, offline, over a distillation
set of *its own* samples: for every completion position it stores the sampled token's
log-prob and its top-k ids and log-probs (what `pear-kernels collect --top-k K` stores for a
real model). A smaller student (hidden 32) is then trained three ways on the same data, same
steps and learning rate:

    plain SFT                       fused_pear_loss(variant="none") on the sampled tokens
    distillation, unweighted        fused_pear_distill_loss(variant="none")
    distillation, PEAR-weighted     fused_pear_distill_loss(variant="token")

and evaluated on held-out problems (pass@1 at temperature 1, greedy accuracy).

    python examples/distill_topk.py                 # one seed, about 40 s on 2 CPU cores
    python examples/distill_topk.py --seeds 5       # the table in docs/distillation.md
    python examples/distill_topk.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from pear_kernels import PEARConfig, fused_pear_distill_loss, fused_pear_loss
from pear_kernels.rl.batching import encode_batch
from pear_kernels.rl.behavior import ChainSolverPolicy
from pear_kernels.rl.evaluate import evaluate
from pear_kernels.rl.model import final_hidden_states, lm_head_params, tiny_qwen2
from pear_kernels.rl.rollout import generate
from pear_kernels.rl.sft import SFTConfig, collect_sft_data, sft_train
from pear_kernels.rl.tasks import SumChainTask
from pear_kernels.rl.tokenizer import CharTokenizer


@torch.no_grad()
def teacher_records(teacher, tok, task, n: int, k: int, seed: int):
    """The teacher's own samples with, per completion token, its log-prob and the top-k."""
    rng = random.Random(seed)
    problems = [task.sample(rng) for _ in range(n)]
    gen = torch.Generator().manual_seed(seed)
    texts = generate(teacher, tok, [p.prompt for p in problems], task.max_completion_length() + 2,
                     temperature=1.0, generator=gen)
    batch = encode_batch(tok, [p.prompt for p in problems], texts)
    logits = teacher(input_ids=batch.input_ids).logits[:, :-1].double()
    logp = torch.log_softmax(logits, -1)
    top = torch.topk(logp, k, dim=-1)
    sampled = logp.gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0]
    return problems, texts, batch, sampled.float(), top.indices, top.values.float()


def train_student(tok, batch, sampled_lp, top_ids, top_lp, arm: str, steps: int, lr: float, seed: int,
                  tail: str = "bucket"):
    student = tiny_qwen2(tok.vocab_size, hidden_size=32, num_layers=2, intermediate_size=64, seed=seed)
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = batch.input_ids.shape[0]
    student.train()
    weights = []  # PEAR arm: mean weight and log-ratio clip fraction per step
    for _ in range(steps):
        idx = torch.randint(0, n, (64,), generator=g)
        h = final_hidden_states(student, batch.input_ids[idx])[:, :-1]
        w, b = lm_head_params(student)
        y = batch.labels[idx]
        if arm == "sft":
            loss = fused_pear_loss(h, w, y, sampled_lp[idx], bias=b, variant="none")
        else:
            variant = "none" if arm == "distill" else "token"
            loss, stats = fused_pear_distill_loss(h, w, y, sampled_lp[idx], top_ids[idx], top_lp[idx], bias=b,
                                                  config=PEARConfig(variant=variant), tail=tail, return_stats=True)
            weights.append((float(stats.mean_weight), float(stats.ratio_clip_fraction)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if arm == "distill_pear":
        first, last = weights[: max(1, steps // 10)], weights[-max(1, steps // 10):]
        mean = lambda xs, i: sum(x[i] for x in xs) / len(xs)  # noqa: E731
        print(f"    PEAR weights: mean {mean(first, 0):.3f} -> {mean(last, 0):.3f} (first / last tenth of the steps), "
              f"log-ratio clip fraction {mean(first, 1):.2f} -> {mean(last, 1):.2f}")
    return student.eval()


def run_seed(args, seed: int, t0: float):
    task = SumChainTask()
    tok = CharTokenizer(task.alphabet, task.eos)
    teacher = tiny_qwen2(tok.vocab_size, hidden_size=64, seed=seed)
    data = collect_sft_data(task, ChainSolverPolicy(p_natural=1.0), 4096, seed)
    sft_train(teacher, tok, data, PEARConfig(variant="none"),
              SFTConfig(steps=args.teacher_steps, batch_size=64, lr=3e-3, seed=seed))
    teacher.eval()
    held_out = task.held_out(args.problems, seed=10_000 + seed)
    results = {"teacher": evaluate(teacher, tok, task, held_out, n_samples=4, k=4)}
    print(f"[{time.time() - t0:5.0f} s] seed {seed} teacher: {results['teacher']}")
    _, _, batch, sampled, top_ids, top_lp = teacher_records(teacher, tok, task, 2048, args.top_k, seed + 1)
    for arm in ARMS:
        student = train_student(tok, batch, sampled, top_ids, top_lp, arm, args.student_steps, 3e-3, seed,
                                tail=args.tail)
        results[arm] = evaluate(student, tok, task, held_out, n_samples=4, k=4)
        print(f"[{time.time() - t0:5.0f} s] seed {seed} student ({arm:>12}): {results[arm]}")
    return results


def summary(per_seed) -> str:
    """Markdown table: pass@1 per seed, mean and std, greedy mean, per arm."""
    seeds = sorted(per_seed)
    lines = ["| student trained by | pass@1 per seed (" + ", ".join(map(str, seeds)) + ") | pass@1 mean +- std | "
             "greedy mean | seeds above unweighted |", "|---|---|---:|---:|---:|"]
    for arm in ARMS:
        p1 = [per_seed[s][arm]["pass@1"] for s in seeds]
        gr = [per_seed[s][arm]["greedy"] for s in seeds]
        above = "-" if arm != "distill_pear" else (
            f"{sum(per_seed[s][arm]['pass@1'] > per_seed[s]['distill']['pass@1'] for s in seeds)}/{len(seeds)}")
        lines.append(f"| {LABELS[arm]} | {' / '.join(f'{x:.3f}' for x in p1)} | {statistics.mean(p1):.3f} +- "
                     f"{statistics.pstdev(p1):.3f} | {statistics.mean(gr):.3f} | {above} |")
    return "\n".join(lines)


ARMS = ("sft", "distill", "distill_pear")
LABELS = {"sft": "plain SFT on the teacher's samples", "distill": "top-k distillation, unweighted",
          "distill_pear": "top-k distillation, PEAR token weights"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--student-steps", type=int, default=400)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--tail", choices=("renormalize", "bucket"), default="bucket")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--seeds", type=int, default=1, help="number of seeds (seed, seed + 1, ...)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.quick:
        args.teacher_steps, args.student_steps, args.problems = 40, 20, 16
    torch.set_num_threads(args.threads)
    t0 = time.time()
    per_seed = {s: run_seed(args, s, t0) for s in range(args.seed, args.seed + args.seeds)}
    print(summary(per_seed))
    print(f"wall {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
