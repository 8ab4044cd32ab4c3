"""SFT (plain vs PEAR token / block / sequence) then identical GRPO, on a verifiable task.

From one randomly initialised tiny Qwen2 per seed, each SFT variant trains on the same
behavior-policy traces (exact per-token log-probs, see pear_kernels/rl/behavior.py); then the
same GRPO run (same prompts, same sampling seed, same hyper-parameters) continues from each;
then pass@1 / pass@k on held-out problems. Prints a markdown table and writes plots and a
results.json to --out. CPU only, no downloads.

    python examples/sft_then_rl.py --quick          # what `make demo` runs (a few minutes)
    python examples/sft_then_rl.py --seeds 5        # the longer run reported in the README
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

from pear_kernels import PEARConfig
from pear_kernels.rl import (
    ChainSolverPolicy,
    CharTokenizer,
    GRPOConfig,
    GRPOTrainer,
    SFTConfig,
    SumChainTask,
    collect_sft_data,
    evaluate,
    sft_train,
    tiny_qwen2,
)

LABELS = {"none": "plain SFT", "token": "PEAR token", "block": "PEAR block", "sequence": "PEAR sequence"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings for a CPU run of a few minutes")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--variants", default="none,token,block,sequence")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--n-min", type=int, default=3)
    p.add_argument("--n-max", type=int, default=4)
    p.add_argument("--p-natural", type=float, default=0.5, help="behavior policy: P(leftmost operand next)")
    p.add_argument("--sft-data", type=int, default=4000)
    p.add_argument("--sft-steps", type=int, default=400)
    p.add_argument("--sft-batch", type=int, default=64)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--rl-steps", type=int, default=60)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--rl-lr", type=float, default=2e-4)
    p.add_argument("--kl-coef", type=float, default=0.0)
    p.add_argument("--aggregation", default="token-mean")
    p.add_argument("--dr-grpo", action="store_true", help="no std scaling of advantages")
    p.add_argument("--eval-problems", type=int, default=200)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="sft_then_rl_out")
    args = p.parse_args()
    if args.quick:
        # sized for <= ~4 minutes on 2 shared CPU cores: a smoke run of the whole pipeline,
        # too short and too few seeds to rank the variants (see the README for a longer run)
        args.seeds, args.sft_steps, args.rl_steps, args.eval_problems = 2, 250, 25, 64
    return args


def mean_std(xs):
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs):
    m, s = mean_std(xs)
    return f"{m:.3f} ± {s:.3f}"


def run_seed(args, seed, variants, task, held, tok, policy, log):
    init = tiny_qwen2(tok.vocab_size, hidden_size=args.hidden, num_layers=args.layers,
                      intermediate_size=2 * args.hidden, seed=seed)
    data = collect_sft_data(task, policy, args.sft_data, seed)
    out = {}
    for variant in variants:
        t0 = time.time()
        model = copy.deepcopy(init)
        sft_hist = sft_train(model, tok, data, PEARConfig(variant=variant),
                             SFTConfig(steps=args.sft_steps, batch_size=args.sft_batch, lr=args.sft_lr, seed=seed))
        eval_kw = dict(n_samples=args.k, k=args.k, seed=10_000 + seed)
        pre = evaluate(model, tok, task, held, **eval_kw)
        ref = copy.deepcopy(model) if args.kl_coef > 0 else None
        cfg = GRPOConfig(steps=args.rl_steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                         lr=args.rl_lr, kl_coef=args.kl_coef, aggregation=args.aggregation,
                         scale_rewards_by_std=not args.dr_grpo, seed=seed)
        rl_hist = GRPOTrainer(model, tok, task, cfg, ref_model=ref).train()
        post = evaluate(model, tok, task, held, **eval_kw)
        out[variant] = {"pre": pre, "post": post, "sft": {k: v for k, v in sft_hist.items()},
                        "rl": rl_hist, "seconds": time.time() - t0}
        log(f"seed {seed} {LABELS[variant]:<14} SFT pass@1 {pre['pass@1']:.3f} -> RL pass@1 {post['pass@1']:.3f} "
            f"pass@{args.k} {post[f'pass@{args.k}']:.3f}  (mean w {statistics.fmean(sft_hist['mean_weight'][-20:]):.2f}, "
            f"RL reward {statistics.fmean(m['reward'] for m in rl_hist[-5:]):.3f}, {time.time() - t0:.0f} s)")
    return out


def table(results, variants, k):
    seeds = sorted(results)
    kk = f"pass@{k}"
    lines = [
        f"| SFT variant | SFT pass@1 | after RL pass@1 | after RL {kk} | after RL greedy | Δ pass@1 vs plain (paired) | seeds above plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        pre1 = [results[s][v]["pre"]["pass@1"] for s in seeds]
        post1 = [results[s][v]["post"]["pass@1"] for s in seeds]
        postk = [results[s][v]["post"][kk] for s in seeds]
        greedy = [results[s][v]["post"]["greedy"] for s in seeds]
        if v != "none" and "none" in variants:
            diffs = [results[s][v]["post"]["pass@1"] - results[s]["none"]["post"]["pass@1"] for s in seeds]
            delta, wins = f"{fmt(diffs)}".replace("±", "±"), f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
        else:
            delta, wins = "—", "—"
        lines.append(f"| {LABELS[v]} | {fmt(pre1)} | {fmt(post1)} | {fmt(postk)} | {fmt(greedy)} | {delta} | {wins} |")
    return "\n".join(lines)


def _save(fig, ax, path, xlabel, ylabel, title):
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plots(results, variants, k, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: plots skipped (pip install pear_kernels[bench])")
        return []
    seeds = sorted(results)
    colors = dict(zip(["none", "token", "block", "sequence"], ["tab:gray", "tab:blue", "tab:orange", "tab:green"]))
    files = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for v in variants:
        curves = torch.tensor([[m["reward"] for m in results[s][v]["rl"]] for s in seeds])
        mean = curves.mean(0)
        w = max(1, len(mean) // 10)  # moving average over a tenth of the run
        smooth = torch.nn.functional.avg_pool1d(mean.view(1, 1, -1), w, stride=1).view(-1)
        ax.plot(range(w - 1, len(mean)), smooth, label=LABELS[v], color=colors[v])
    files.append(_save(fig, ax, os.path.join(out_dir, "reward_curves.png"), "GRPO step",
                       "mean reward (train prompts)", f"GRPO reward, mean of {len(seeds)} seeds"))

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for i, v in enumerate(variants):
        for j, (stage, key) in enumerate([("pre", "pass@1"), ("post", "pass@1")]):
            vals = [results[s][v][stage][key] for s in seeds]
            x = i + (j - 0.5) * width
            ax.bar(x, statistics.fmean(vals), width, color=colors[v], alpha=0.45 if stage == "pre" else 0.9,
                   label=("after SFT" if stage == "pre" else "after SFT+RL") if i == 0 else None)
            ax.scatter([x] * len(vals), vals, color="black", s=10, zorder=3)
    ax.set_xticks(range(len(variants)), [LABELS[v] for v in variants])
    files.append(_save(fig, ax, os.path.join(out_dir, "accuracy.png"), None, "held-out pass@1",
                       "held-out pass@1 (bars: mean, dots: seeds)"))

    fig, ax = plt.subplots(figsize=(6, 4))
    all_w = {v: [max(w, 1e-5) for s in seeds for w in results[s][v]["sft"]["weights"]] for v in variants}
    lo = min(min(ws) for ws in all_w.values()) * 0.9
    hi = max(max(ws) for ws in all_w.values()) * 1.1
    bins = torch.logspace(torch.log10(torch.tensor(lo)), torch.log10(torch.tensor(hi)), 50).tolist()
    for v in variants:
        ax.hist(all_w[v], bins=bins, histtype="step", label=LABELS[v], color=colors[v], density=True)
    ax.set_xscale("log")
    files.append(_save(fig, ax, os.path.join(out_dir, "weight_distributions.png"),
                       "PEAR weight w_t (last fifth of SFT)", "density", "token weight distributions"))
    plt.close("all")
    return files


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in LABELS:
            raise SystemExit(f"--variants: unknown variant {v!r}; choose from {', '.join(LABELS)}")
    os.makedirs(args.out, exist_ok=True)
    start = time.time()

    def log(msg):
        print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)

    task = SumChainTask(args.n_min, args.n_max)
    held = task.held_out(args.eval_problems, seed=0)  # excluded from all training problems
    tok = CharTokenizer(task.alphabet, task.eos)
    policy = ChainSolverPolicy(args.p_natural)
    log(f"task: sums of {args.n_min}-{args.n_max} digits, e.g. {held[0].prompt!r} -> "
        f"{policy.sample(held[0], __import__('random').Random(0))[0]!r}; {len(held)} held-out problems")
    results = {seed: run_seed(args, seed, variants, task, held, tok, policy, log) for seed in range(args.seeds)}
    wall = time.time() - start

    md = table(results, variants, args.k)
    settings = (f"seeds 0..{args.seeds - 1}, model Qwen2 hidden {args.hidden} x {args.layers} layers, "
                f"SFT {args.sft_steps} steps x {args.sft_batch} (lr {args.sft_lr}), "
                f"GRPO {args.rl_steps} steps x {args.prompts_per_step} prompts x G={args.group_size} (lr {args.rl_lr}, "
                f"{args.aggregation}{', Dr.GRPO' if args.dr_grpo else ''}, kl {args.kl_coef}), "
                f"{args.eval_problems} held-out problems x {args.k} samples, wall {wall:.0f} s")
    print(f"\n{md}\n\n{settings}")
    files = plots(results, variants, args.k, args.out)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "wall_seconds": wall, "table": md, "results": {
            s: {v: {k: r[k] for k in ("pre", "post", "rl", "seconds")} | {
                "sft_loss": r["sft"]["loss"], "sft_mean_weight": r["sft"]["mean_weight"]}
                for v, r in res.items()} for s, res in results.items()}}, f, indent=1)
    print(f"wrote {', '.join(files + [os.path.join(args.out, 'results.json')])}")


if __name__ == "__main__":
    main()
