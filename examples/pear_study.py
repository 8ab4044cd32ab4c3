"""Issue-12 study: does PEAR-weighted SFT end better than plain SFT after identical GRPO?

Per seed: a base checkpoint "pretrained" on natural-order traces (the student's own style);
from it, SFT arms on teacher traces (p_natural 0.2, exact log-probs; control teacher 1.0):
plain, PEAR token, PEAR block (B=4), PEAR sequence, plain with lr x PEAR token's mean weight;
at two budgets; then the same GRPO for every arm. Every (seed, teacher, arm, budget) piece is
saved as JSON in --data as it finishes; a rerun skips finished pieces; `report` builds the
table, gates and plots from whatever is saved.

    python examples/pear_study.py run --data examples/study_results          # full, resumable
    python examples/pear_study.py styles --data examples/study_results       # the style probes only
    python examples/pear_study.py report --data examples/study_results --docs docs/rl
    python examples/pear_study.py run --tiny --data /tmp/s                   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import torch

from pear_kernels import PEARConfig, fused_pear_loss
from pear_kernels.rl import (
    ChainSolverPolicy,
    CharTokenizer,
    GRPOConfig,
    GRPOTrainer,
    SFTConfig,
    SumChainTask,
    collect_sft_data,
    generate,
    pass_at_k,
    sft_train,
    tiny_qwen2,
)
from pear_kernels.rl.batching import encode_batch
from pear_kernels.rl.model import final_hidden_states, lm_head_params
from pear_kernels.rl.study_stats import (
    Gate,
    bootstrap_mean_ci,
    is_natural_order,
    paired_differences,
    seeds_above,
)

ARMS = {"plain": "plain SFT", "token": "PEAR token", "block": "PEAR block (B=4)",
        "sequence": "PEAR sequence", "plain_lr": "plain, lr x mean w"}
PEAR = {"plain": PEARConfig(variant="none"), "plain_lr": PEARConfig(variant="none"),
        "token": PEARConfig(variant="token"), "block": PEARConfig(variant="block", block_size=4),
        "sequence": PEARConfig(variant="sequence")}


@dataclass
class StudyConfig:
    seeds: int = 8
    n_min: int = 5
    n_max: int = 6
    hidden: int = 64
    layers: int = 2
    # the base is pretrained until a quick own-style check on training problems reaches
    # pretrain_target (checked every pretrain_check steps), at most pretrain_steps: a fixed 500
    # steps gave held-out pass@1 from 0.29 to 0.84 across seeds and machines; target 0.3-0.4
    pretrain_steps: int = 1000
    pretrain_target: float = 0.30
    pretrain_check: int = 25
    pretrain_lr: float = 3e-3
    data_size: int = 4000
    batch: int = 64
    sft_lr: float = 1e-3
    budgets: Tuple[int, ...] = (300, 1000)
    rl_steps: int = 100
    prompts_per_step: int = 16
    group_size: int = 8
    rl_lr: float = 2e-4
    eval_problems: int = 300
    n_samples: int = 16
    k: int = 8
    probe_traces: int = 256
    teachers: Tuple[float, ...] = (0.2, 1.0)
    # a follow-up after the main run: a teacher that writes the student's style more often
    # (a natural-order trace has probability ~0.5^4 instead of ~0.2^4), short budget, every arm
    extra_teachers: Tuple[float, ...] = (0.5,)


def tiny_config() -> StudyConfig:
    return StudyConfig(seeds=2, n_min=5, n_max=5, hidden=16, layers=1, pretrain_steps=3, data_size=64,
                       batch=8, budgets=(2, 4), rl_steps=2, prompts_per_step=2, group_size=2,
                       eval_problems=4, n_samples=4, k=2, probe_traces=8)


def piece_order(cfg: StudyConfig) -> List[Tuple[int, float, str, int]]:
    """Most informative pieces first: short budget plain/token/sequence on the p=0.2 teacher,
    then the control teacher, then block and the step-size control, then the long budget, then
    the follow-up teachers (short budget)."""
    short, *longer = cfg.budgets
    main_t, ctrl = cfg.teachers[0], cfg.teachers[-1]
    order = []
    waves = [(short, main_t, ("plain", "token", "sequence")), (short, ctrl, ("plain", "token")),
             (short, main_t, ("block", "plain_lr"))]
    for b in longer:
        waves += [(b, main_t, ("plain", "token", "sequence")), (b, ctrl, ("plain", "token")),
                  (b, main_t, ("block", "plain_lr"))]
    for t in cfg.extra_teachers:
        waves += [(short, t, ("plain", "token", "sequence")), (short, t, ("block", "plain_lr"))]
    for budget, teacher, arms in waves:
        for s in range(cfg.seeds):
            for a in arms:
                order.append((s, teacher, a, budget))
    return order


def piece_name(seed, teacher, arm, budget) -> str:
    return f"seed{seed}_p{teacher:g}_{arm}_{budget}.json"


class Study:
    def __init__(self, cfg: StudyConfig, data_dir: str, cache_dir: str, log=print):
        self.cfg, self.data_dir, self.cache_dir, self.log = cfg, data_dir, cache_dir, log
        os.makedirs(data_dir, exist_ok=True)
        os.makedirs(cache_dir, exist_ok=True)
        self.task = SumChainTask(cfg.n_min, cfg.n_max)
        self.held = self.task.held_out(cfg.eval_problems, seed=0)  # excluded from all training
        self.tok = CharTokenizer(self.task.alphabet, self.task.eos)

    # ---- evaluation -------------------------------------------------------------------------
    def evaluate(self, model, seed: int, problems=None, n=None) -> Dict[str, float]:
        cfg, task = self.cfg, self.task
        problems = self.held if problems is None else problems
        gen = torch.Generator().manual_seed(10_000 + seed)
        n = cfg.n_samples if n is None else n
        prompts = [p.prompt for p in problems for _ in range(n)]
        model.eval()
        texts = generate(model, self.tok, prompts, task.max_completion_length() + 2, temperature=1.0, generator=gen)
        correct = [0] * len(problems)
        natural = 0
        for j, text in enumerate(texts):
            p = problems[j // n]
            correct[j // n] += int(task.reward(p, text) > 0)
            natural += int(is_natural_order(p.data, text))
        return {"pass@1": statistics.fmean(pass_at_k(n, c, 1) for c in correct),
                f"pass@{cfg.k}": statistics.fmean(pass_at_k(n, c, cfg.k) for c in correct),
                "natural_fraction": natural / len(texts)}

    def _token_weights(self, model, ex):
        """PEAR token weights (and the teacher-trace NLL) of (problem, completion, behavior
        log-probs) examples: (nll, weights (B, T), mask (B, T)). The NLL per supervised token
        is read from the same pass's log-probs (summed in float64, as the loss sums them)."""
        batch = encode_batch(self.tok, [p.prompt for p, _, _ in ex], [c for _, c, _ in ex], [lp for _, _, lp in ex])
        with torch.no_grad():
            hidden = final_hidden_states(model, batch.input_ids)[:, :-1]
            w, b = lm_head_params(model)
            _, st = fused_pear_loss(hidden, w, batch.labels, batch.behavior_logprobs, bias=b,
                                    config=PEARConfig(variant="token"), return_stats=True)
        nll = -st.token_logprobs[st.mask].double().sum() / max(int(st.mask.sum()), 1)
        return float(nll), st.weights, st.mask

    @staticmethod
    def _style_means(weights, mask, sel, name):
        """Mean token weight and mean first-token weight over the traces ``sel`` (None if none)."""
        m = mask[sel]
        mean = float(weights[sel][m].mean()) if bool(m.any()) else None
        first = (float(torch.stack([r[mm][0] for r, mm in zip(weights[sel], m)]).mean())
                 if bool(sel.any()) else None)
        return {f"w_{name}": mean, f"first_w_{name}": first}

    def probe(self, model, teacher: float, seed: int) -> Dict[str, float]:
        """Teacher-trace NLL per token and PEAR token weights by trace style, on held-out traces
        sampled from the teacher (at p 0.2 few or none are fully natural: see style_probe)."""
        rng = random.Random(f"probe-{seed}-{teacher}")
        pol = ChainSolverPolicy(teacher)
        probs = [self.held[i % len(self.held)] for i in range(self.cfg.probe_traces)]
        ex = [(p, *pol.sample(p, rng)) for p in probs]
        nll, weights, mask = self._token_weights(model, ex)
        nat = torch.tensor([is_natural_order(p.data, c) for p, c, _ in ex])
        out = {"teacher_nll": nll}
        for name, sel in (("natural", nat), ("shuffled", ~nat)):
            out.update(self._style_means(weights, mask, sel, name))
        return out

    def style_probe(self, model, teacher: float, seed: int) -> Dict[str, float]:
        """PEAR token weights on the two styles of trace for the same held-out problems, both
        with the teacher's exact log-probs (as the SFT data carry them): each problem's
        natural-order trace (the student's own style; the teacher writes it with probability
        0.2^(distinct values - 1), so sampled teacher traces hold almost none) and one trace
        sampled from the teacher that is not in natural order."""
        rng = random.Random(f"style-probe-{seed}-{teacher}")
        pol, own = ChainSolverPolicy(teacher), ChainSolverPolicy(1.0)
        probs = [self.held[i % len(self.held)] for i in range(self.cfg.probe_traces)]
        natural, shuffled = [], []
        for p in probs:
            text = own.sample(p, rng)[0]
            natural.append((p, text, pol.trace_logprobs(p, text)))
            for _ in range(64):  # a problem whose operands are all equal has no shuffled trace
                text, lp = pol.sample(p, rng)
                if not is_natural_order(p.data, text):
                    shuffled.append((p, text, lp))
                    break
        out = {"traces_natural": len(natural), "traces_shuffled": len(shuffled)}
        for name, ex in (("natural", natural), ("shuffled", shuffled)):
            if ex:
                _, weights, mask = self._token_weights(model, ex)
                out.update(self._style_means(weights, mask, torch.ones(len(ex), dtype=torch.bool), name))
            else:
                out.update({f"w_{name}": None, f"first_w_{name}": None})
        return out

    # ---- pieces -----------------------------------------------------------------------------
    def new_model(self, seed):
        c = self.cfg
        return tiny_qwen2(self.tok.vocab_size, hidden_size=c.hidden, num_layers=c.layers,
                          intermediate_size=2 * c.hidden, seed=seed)

    def base(self, seed: int):
        """The seed's shared base checkpoint (cached; its evaluation saved as base_seedN.json)."""
        ckpt = os.path.join(self.cache_dir, f"base_seed{seed}.pt")
        model = self.new_model(seed)
        if os.path.exists(ckpt):
            model.load_state_dict(torch.load(ckpt))
            return model
        t0 = time.time()
        data = collect_sft_data(self.task, ChainSolverPolicy(1.0), self.cfg.data_size, 1000 + seed)
        rng = random.Random(f"pretrain-check-{seed}")
        check = [self.task.sample(rng) for _ in range(64)]  # training problems, never held-out ones
        checks = []

        def reached(steps_done):
            if steps_done % self.cfg.pretrain_check:
                return False
            checks.append((steps_done, self.evaluate(model, seed, problems=check, n=8)["pass@1"]))
            return checks[-1][1] >= self.cfg.pretrain_target

        hist = sft_train(model, self.tok, data, PEARConfig(variant="none"),
                         SFTConfig(steps=self.cfg.pretrain_steps, batch_size=self.cfg.batch,
                                   lr=self.cfg.pretrain_lr, seed=1000 + seed), until=reached)
        res = {"seed": seed, "pretrain_steps": len(hist["loss"]), "pretrain_checks": checks,
               "eval": self.evaluate(model, seed), "probe": self.probe(model, 0.2, seed),
               "seconds": time.time() - t0}
        torch.save(model.state_dict(), ckpt)
        self._write(f"base_seed{seed}.json", res)
        self.log(f"base seed {seed}: own-style pass@1 {res['eval']['pass@1']:.3f} ({res['seconds']:.0f} s)")
        return model

    def _write(self, name, obj):
        tmp = os.path.join(self.data_dir, name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, os.path.join(self.data_dir, name))

    def _read(self, name):
        path = os.path.join(self.data_dir, name)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def sft_arm(self, seed, teacher, arm, budget, lr):
        """One SFT arm from the seed's base: (base, SFT model, SFT history)."""
        base = self.base(seed)
        model = copy.deepcopy(base)
        data = collect_sft_data(self.task, ChainSolverPolicy(teacher), self.cfg.data_size, seed)
        hist = sft_train(model, self.tok, data, PEAR[arm],
                         SFTConfig(steps=budget, batch_size=self.cfg.batch, lr=lr, seed=seed))
        return base, model, hist

    def styles(self, seed):
        """The weight gate's measurement: style_probe on the base and after the short PEAR-token
        SFT (retrained: the pieces keep no checkpoints; its mean weight and last losses must
        equal the saved piece's, a check that the rerun reproduces it). Saved as styles_seedN.json."""
        name = f"styles_seed{seed}.json"
        if self._read(name) is not None:
            return "skipped"
        teacher, budget = self.cfg.teachers[0], self.cfg.budgets[0]
        piece = self._read(piece_name(seed, teacher, "token", budget))
        if piece is None:
            return "waiting for the token piece"
        t0 = time.time()
        base, model, hist = self.sft_arm(seed, teacher, "token", budget, self.cfg.sft_lr)
        mean_w, loss_last = statistics.fmean(hist["mean_weight"]), statistics.fmean(hist["loss"][-20:])
        res = {"seed": seed, "teacher": teacher, "budget": budget,
               "base": self.style_probe(base, teacher, seed), "token_sft": self.style_probe(model, teacher, seed),
               "reproduced": {"sft_mean_weight": [mean_w, piece["sft_mean_weight"]],
                              "sft_loss_last": [loss_last, piece["sft_loss_last"]]},
               "seconds": time.time() - t0}
        self._write(name, res)
        b, a = res["base"], res["token_sft"]
        self.log(f"{name}: token weight shuffled/natural at the base {_ratio(b)}, after token SFT {_ratio(a)}; "
                 f"reproduced mean weight {mean_w:.6f} vs piece {piece['sft_mean_weight']:.6f}")
        return "done"

    def run_piece(self, seed, teacher, arm, budget):
        name = piece_name(seed, teacher, arm, budget)
        if self._read(name) is not None:
            return "skipped"
        lr = self.cfg.sft_lr
        if arm == "plain_lr":
            tok_piece = self._read(piece_name(seed, teacher, "token", budget))
            if tok_piece is None:
                return "waiting for the token piece"
            lr *= tok_piece["sft_mean_weight"]
        t0 = time.time()
        base, model, hist = self.sft_arm(seed, teacher, arm, budget, lr)
        sft_ckpt = copy.deepcopy(model)
        pre, pre_probe = self.evaluate(model, seed), self.probe(model, teacher, seed)
        t_sft = time.time() - t0
        cfg = GRPOConfig(steps=self.cfg.rl_steps, prompts_per_step=self.cfg.prompts_per_step,
                         group_size=self.cfg.group_size, lr=self.cfg.rl_lr, seed=seed)
        rl = GRPOTrainer(model, self.tok, self.task, cfg).train()
        post, post_probe = self.evaluate(model, seed), self.probe(model, teacher, seed)
        res = {"seed": seed, "teacher": teacher, "arm": arm, "budget": budget, "sft_lr": lr,
               "sft_mean_weight": statistics.fmean(hist["mean_weight"]),
               "sft_loss_last": statistics.fmean(hist["loss"][-20:]),
               "sft": pre, "sft_probe": pre_probe, "rl": post, "rl_probe": post_probe,
               "dist_sft_from_base": _dist(sft_ckpt, base), "dist_rl_from_sft": _dist(model, sft_ckpt),
               "rl_reward": [m["reward"] for m in rl], "seconds_sft": t_sft, "seconds": time.time() - t0,
               "config": asdict(self.cfg)}
        self._write(name, res)
        self.log(f"{name}: SFT pass@1 {pre['pass@1']:.3f} -> RL {post['pass@1']:.3f} "
                 f"(nat {pre['natural_fraction']:.2f}->{post['natural_fraction']:.2f}, {res['seconds']:.0f} s)")
        return "done"

    def run(self, shard: Tuple[int, int] = (0, 1)):
        """Run the pieces of this shard's seeds (seed % n == k), so n workers share no piece
        and no base checkpoint."""
        k, n = shard
        pending = [p for p in piece_order(self.cfg) if p[0] % n == k]
        for _ in range(2):  # plain_lr pieces wait for their token piece; a second pass picks them up
            pending = [p for p in pending if self.run_piece(*p) not in ("done", "skipped")]
        return pending + self.run_styles(shard)

    def run_styles(self, shard: Tuple[int, int] = (0, 1)):
        """The style probes of this shard's seeds; returns those still waiting for their piece."""
        k, n = shard
        return [(seed, "styles") for seed in range(k, self.cfg.seeds, n)
                if self.styles(seed) not in ("done", "skipped")]


def _style_ratio(probe):
    """Mean token weight on shuffled traces over that on natural ones (None if either is missing)."""
    if probe.get("w_natural") and probe.get("w_shuffled") is not None:
        return probe["w_shuffled"] / probe["w_natural"]
    return None


def _ratio(probe) -> str:
    r = _style_ratio(probe)
    return "n/a" if r is None else f"{r:.3f}"


def _dist(a, b) -> float:
    with torch.no_grad():
        return math.sqrt(sum(float((x - y).pow(2).sum()) for x, y in zip(a.parameters(), b.parameters())))


# ---- report ---------------------------------------------------------------------------------
def load(data_dir):
    """(pieces by (seed, teacher, arm, budget), base records by seed, style probes by seed)."""
    pieces, bases, styles = {}, {}, {}
    for f in sorted(os.listdir(data_dir)):
        if not f.endswith(".json"):
            continue
        with open(os.path.join(data_dir, f)) as fh:
            r = json.load(fh)
        if f.startswith("base_"):
            bases[r["seed"]] = r
        elif f.startswith("styles_"):
            styles[r["seed"]] = r
        else:
            pieces[(r["seed"], r["teacher"], r["arm"], r["budget"])] = r
    return pieces, bases, styles


def _ci(vals):
    m, lo, hi = bootstrap_mean_ci(vals)
    return f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def report(data_dir, n_seeds=8):
    pieces, bases, styles = load(data_dir)
    if not pieces:
        return "no finished pieces yet", {}
    teachers = sorted({k[1] for k in pieces})
    budgets = sorted({k[3] for k in pieces})
    k = next(iter(pieces.values()))["config"]["k"]
    lines = []
    gates = {}
    for teacher in teachers:
        for budget in budgets:
            if not any((t, b) == (teacher, budget) for (_, t, _, b) in pieces):
                continue  # the follow-up teachers run the short budget only
            lines += [f"\n**teacher p_natural {teacher:g}, SFT {budget} steps**\n",
                      f"| arm | seeds | SFT pass@1 | RL pass@1 | RL pass@{k} | natural frac SFT->RL | dist SFT->RL | "
                      f"Δ RL pass@1 vs plain [95% CI] | seeds above plain |", "|---|---|---|---|---|---|---|---|---|"]
            plain = {s: r["rl"]["pass@1"] for (s, t, a, b), r in pieces.items() if (t, a, b) == (teacher, "plain", budget)}
            for arm in ARMS:
                rs = {s: r for (s, t, a, b), r in pieces.items() if (t, a, b) == (teacher, arm, budget)}
                if not rs:
                    continue
                mark = "" if len(rs) >= n_seeds else " (incomplete)"
                def f(key, sub):
                    return statistics.fmean(r[key][sub] for r in rs.values())
                if arm != "plain" and plain:
                    d = paired_differences({s: r["rl"]["pass@1"] for s, r in rs.items()}, plain)
                    delta = _ci(list(d.values())) if d else "—"
                    above = "{}/{}".format(*seeds_above(d)) if d else "—"
                    if arm == "token":
                        gates[(teacher, budget)] = d
                else:
                    delta = above = "—"
                lines.append(f"| {ARMS[arm]} | {len(rs)}{mark} | {f('sft', 'pass@1'):.3f} | {f('rl', 'pass@1'):.3f} | "
                             f"{f('rl', f'pass@{k}'):.3f} | {f('sft', 'natural_fraction'):.2f}->{f('rl', 'natural_fraction'):.2f} | "
                             f"{statistics.fmean(r['dist_rl_from_sft'] for r in rs.values()):.2f} | {delta} | {above} |")
    # PEAR against the step-size control (plain SFT at PEAR token's mean weight x lr), paired
    for teacher in teachers:
        for budget in budgets:
            ctl = {s: r["rl"]["pass@1"] for (s, t, a, b), r in pieces.items() if (t, a, b) == (teacher, "plain_lr", budget)}
            if not ctl:
                continue
            parts = []
            for arm in ("token", "block", "sequence"):
                d = paired_differences({s: r["rl"]["pass@1"] for (s, t, a, b), r in pieces.items()
                                        if (t, a, b) == (teacher, arm, budget)}, ctl)
                if d:
                    parts.append(f"{ARMS[arm]} {_ci(list(d.values()))} ({'{}/{}'.format(*seeds_above(d))} above)")
            if parts:
                lines.append(f"\nvs the step-size control (teacher {teacher:g}, {budget} steps), Δ RL pass@1: " + "; ".join(parts))
    # gates, stated in advance (issue 12)
    main_t, short = teachers[0], budgets[0]
    plain_sft = [r["sft"]["pass@1"] for (s, t, a, b), r in pieces.items() if (t, a, b) == (main_t, "plain", short)]
    # the weights PEAR starts SFT with: base checkpoint, the same held-out problems written in
    # both styles with the p 0.2 teacher's log-probs (style_probe); after PEAR-token SFT the
    # student imitates the teacher and the ratio moves toward 1 (printed for information)
    ratios = [r for r in (_style_ratio(x["base"]) for x in styles.values()) if r is not None]
    after = [r for r in (_style_ratio(x["token_sft"]) for x in styles.values()) if r is not None]
    ctrl = gates.get((1.0, short))
    g = [Gate("plain SFT pass@1 after SFT (teacher 0.2, short budget), mean", statistics.fmean(plain_sft) if plain_sft else None, 0.1, 0.6),
         Gate(f"PEAR token weight at the base checkpoint, shuffled / natural traces, mean over {len(ratios)} seeds",
              statistics.fmean(ratios) if ratios else None, None, 0.85),
         Gate("control teacher (p 1.0): |Δ token vs plain| RL pass@1", abs(statistics.fmean(ctrl.values())) if ctrl else None, None, 0.02)]
    lines.append("\n**Gates (stated in advance; a failed gate makes the run inconclusive, not a refutation)**\n")
    lines += [x.line() for x in g]
    if after:
        lines.append(f"- (information) the same ratio after PEAR-token SFT ({short} steps): {statistics.fmean(after):.3f}")
    if bases:
        lines.append("\nbase checkpoints own-style pass@1: " + ", ".join(
            f"seed {s} {b['eval']['pass@1']:.3f}" for s, b in sorted(bases.items())))
    if styles:
        lines.append("PEAR token weight, shuffled / natural traces (mean weight natural; shuffled), base -> after token SFT: "
                     + ", ".join(f"seed {s} {_ratio(x['base'])} ({x['base']['w_natural']:.2f}; {x['base']['w_shuffled']:.2f})"
                                 f" -> {_ratio(x['token_sft'])}" for s, x in sorted(styles.items())))
        bad = [s for s, x in sorted(styles.items())
               if any(abs(a - b) > 1e-9 * max(1.0, abs(b)) for a, b in x["reproduced"].values())]
        lines.append("the retrained token SFT for the style probe reproduces the saved pieces: "
                     + ("yes, every seed" if not bad else f"NO for seeds {bad}"))
    # premise: longer plain SFT -> lower teacher-trace loss but worse post-RL pass@1?
    if len(budgets) > 1:
        lo, hi = budgets[0], budgets[-1]
        pl = {(s, b): r for (s, t, a, b), r in pieces.items() if t == main_t and a == "plain"}
        seeds = [s for s in range(n_seeds) if (s, lo) in pl and (s, hi) in pl]
        if seeds:
            dl = [pl[(s, hi)]["sft_probe"]["teacher_nll"] - pl[(s, lo)]["sft_probe"]["teacher_nll"] for s in seeds]
            dr = [pl[(s, hi)]["rl"]["pass@1"] - pl[(s, lo)]["rl"]["pass@1"] for s in seeds]
            lines.append(f"\npremise (plain SFT {hi} vs {lo} steps, {len(seeds)} seeds): teacher-trace NLL "
                         f"{_ci(dl)}, post-RL pass@1 {_ci(dr)}")
    return "\n".join(lines), {"gates": g, "pieces": pieces}


def plots(data_dir, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    pieces, _, styles = load(data_dir)
    if not pieces:
        return []
    os.makedirs(out_dir, exist_ok=True)
    files = []
    fig, (ax, axd) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    keys = sorted({(t, b) for (_, t, _, b) in pieces})
    x = 0
    ticks = []
    for t, b in keys:
        plain = {s: r["rl"]["pass@1"] for (s, tt, a, bb), r in pieces.items() if (tt, a, bb) == (t, "plain", b)}
        for arm in ARMS:
            rs = {s: r["rl"]["pass@1"] for (s, tt, a, bb), r in pieces.items() if (tt, a, bb) == (t, arm, b)}
            if not rs:
                continue
            vals = list(rs.values())
            m, lo, hi = bootstrap_mean_ci(vals)
            ax.errorbar([x], [m], yerr=[[m - lo], [hi - m]], fmt="o", capsize=3, color=f"C{list(ARMS).index(arm)}")
            ax.scatter([x] * len(vals), vals, s=6, color="gray")
            d = paired_differences(rs, plain) if arm != "plain" else {}
            if d:
                m, lo, hi = bootstrap_mean_ci(list(d.values()))
                axd.errorbar([x], [m], yerr=[[m - lo], [hi - m]], fmt="o", capsize=3, color=f"C{list(ARMS).index(arm)}")
                axd.scatter([x] * len(d), list(d.values()), s=6, color="gray")
            ticks.append((x, f"{arm}\np{t:g} {b}"))
            x += 1
        x += 1
    axd.axhline(0.0, color="black", lw=0.8)
    axd.set_xticks([t for t, _ in ticks], [label for _, label in ticks], fontsize=6)
    ax.set_ylabel("pass@1 after RL\n(mean, 95% bootstrap CI)")
    axd.set_ylabel("paired Δ to plain SFT\n(mean, 95% bootstrap CI)")
    fig.tight_layout()
    files.append(os.path.join(out_dir, "study_post_rl_pass1.png"))
    fig.savefig(files[-1], dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    seeds = sorted(styles)
    for i, (when, label) in enumerate((("base", "base checkpoint"), ("token_sft", "after PEAR-token SFT"))):
        for j, style in enumerate(("natural", "shuffled")):
            ws = [styles[s][when][f"w_{style}"] for s in seeds if styles[s][when][f"w_{style}"] is not None]
            if ws:
                xs = [2.5 * i + j] * len(ws)
                ax.scatter(xs, ws, s=10, color=f"C{j}", label=f"{style}-order traces" if i == 0 else None)
                ax.plot([2.5 * i + j - 0.3, 2.5 * i + j + 0.3], [statistics.fmean(ws)] * 2, color=f"C{j}")
    ax.set_xticks([0.5, 3.0], ["base checkpoint", "after PEAR-token SFT"])
    ax.set_ylabel("mean PEAR token weight (one dot per seed)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    files.append(os.path.join(out_dir, "study_weights_by_style.png"))
    fig.savefig(files[-1], dpi=120)
    plt.close("all")
    return files


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "styles", "report"],
                   help="run: every piece, then the style probes; styles: the style probes only")
    p.add_argument("--data", default="examples/study_results")
    p.add_argument("--cache", default=None, help="base checkpoints (default: <data>/../study_cache, not committed)")
    p.add_argument("--docs", default=None, help="write plots here (report)")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke configuration")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shard", default="0/1", help="K/N: run only seeds with seed %% N == K "
                   "(N workers in parallel, one core each)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = tiny_config() if a.tiny else StudyConfig()
    if a.seeds is not None:
        cfg.seeds = a.seeds
    if a.command in ("run", "styles"):
        start = time.time()
        cache = a.cache or os.path.join(os.path.dirname(os.path.abspath(a.data)), "study_cache")
        st = Study(cfg, a.data, cache, log=lambda m: print(f"[{time.time() - start:7.0f} s] {m}", flush=True))
        k, n = (int(x) for x in a.shard.split("/"))
        if not 0 <= k < n:
            p.error(f"--shard: expected K/N with 0 <= K < N, got {a.shard!r}")
        left = st.run((k, n)) if a.command == "run" else st.run_styles((k, n))
        print(f"finished; {len(left)} pieces left over; wall {time.time() - start:.0f} s")
    text, _ = report(a.data, cfg.seeds)
    if a.tiny:
        print("(--tiny: a seconds-long smoke configuration of the pipeline; its numbers mean nothing "
              "and its gates are expected to fail)")
    print(text)
    if a.docs:
        os.makedirs(a.docs, exist_ok=True)
        md = os.path.join(a.docs, "study_table.md")
        with open(md, "w") as f:
            f.write(f"# SFT-then-RL study (issue 12), built from {a.data}\n{text}\n")
        print("wrote", plots(a.data, a.docs) + [md])


if __name__ == "__main__":
    sys.exit(main())
