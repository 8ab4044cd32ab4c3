"""Turning measured cases into the results the suite writes: JSON, a markdown table, a plot.

Rows are the dicts of benchmarks.harness.measure_in_child (status "ok" or "unavailable"),
plus a "group" naming the comparison they belong to. Ratios are taken within one shape
(N, H, V, dtype, variant), between cases measured in the same run on the same inputs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Dict, Iterable, List, Optional

MiB = 2**20

# Loss names as the table shows them; the order is the table's order within a shape.
LABELS = OrderedDict(
    [
        ("fused", "pear_kernels fused (auto: native row pass where built, else chunked torch)"),
        ("fused_torch", "pear_kernels fused, chunked torch backend"),
        ("fused_native", "pear_kernels fused, native C++ row pass"),
        ("floor", "matmul floor (unchunked GEMMs, full size)"),
        ("floor_chunked", "matmul floor, chunked like fused"),
        ("fused_fwd", "pear_kernels fused, forward only (no_grad)"),
        ("floor_fwd", "forward floor (one unchunked logits GEMM)"),
        ("naive", "naive (materialised logits)"),
        ("torch_lce", "torch linear_cross_entropy (default chunks) + PEAR weights"),
        ("torch_lce_matched", "torch linear_cross_entropy (our chunk rows) + PEAR weights"),
        ("liger", "Liger FLCE + PEAR weights"),
        ("cce_compile", "cut-cross-entropy torch_compile + PEAR weights"),
        ("flash_attn_ce", "flash-attn Triton cross-entropy (materialised logits) + PEAR weights"),
        ("distill_fused", "pear_kernels fused top-k distillation (K=8, bucket)"),
        ("distill_naive", "naive top-k distillation (materialised logits)"),
        ("distill_fused_torch", "pear_kernels fused top-k distillation, chunked torch rows"),
        ("distill_fused_native", "pear_kernels fused top-k distillation, native C++ softmax passes"),
        ("distill_liger_jsd", "Liger LigerFusedLinearJSDLoss (chunked torch, eager; online teacher, full-V forward KL)"),
    ]
)

# Notes that belong next to a figure whatever the machine.
NOTES = {
    ("liger", "cpu"): "Triton interpreter: a correctness check, not a speed figure",
}


def shape_key(row: Dict):
    return (row["n"], row["h"], row["v"], row["dtype"], row["variant"])


def environment() -> Dict[str, str]:
    """Date, machine and versions, for the table's header."""
    import torch

    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}",
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for mod in ("liger_kernel", "triton", "cut_cross_entropy"):
        env[mod] = _version(mod)
    try:
        env["load average at write (1/5/15 min)"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        pass
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module.replace("_", "-"))
    except Exception:
        return "not installed"


def annotate(rows: Iterable[Dict]) -> List[Dict]:
    """Add time / floor, time / naive and extra / naive to every ok row (same shape)."""
    rows = [dict(r) for r in rows]
    by_shape: Dict = {}
    for r in rows:
        if r.get("status") == "ok":
            by_shape.setdefault(shape_key(r), {})[r["loss"]] = r
    for r in rows:
        if r.get("status") != "ok":
            continue
        peers = by_shape[shape_key(r)]
        for base in ("floor", "naive"):
            # a forward-only row is measured against the forward floor
            b = peers.get("floor_fwd" if base == "floor" and r["loss"] in ("fused_fwd", "floor_fwd") else base)
            r[f"time_vs_{base}"] = r["seconds"] / b["seconds"] if b and b["seconds"] > 0 else None
        nv = peers.get("naive")
        r["extra_vs_naive"] = r["extra_bytes"] / nv["extra_bytes"] if nv and nv["extra_bytes"] > 0 else None
        times = r.get("times") or [r["seconds"]]
        r["spread"] = max(times) / min(times) if min(times) > 0 else None
        r["median_seconds"] = statistics.median(times)
    return rows


def _fmt(x: Optional[float], spec: str, suffix: str = "") -> str:
    return "-" if x is None else format(x, spec) + suffix


def markdown_table(rows: List[Dict]) -> str:
    """One line per (shape, loss), shapes in the order first measured."""
    rows = annotate(rows)
    order = list(LABELS)
    shapes: "OrderedDict" = OrderedDict()
    for r in rows:
        shapes.setdefault(shape_key(r), []).append(r)
    out = [
        "| N | H | V | variant | loss | time (s), best | spread max/min | x floor | x naive "
        "| extra memory (MiB) | extra / naive | note |",
        "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, group in shapes.items():
        n, h, v, dtype, variant = key
        group.sort(key=lambda r: order.index(r["loss"]) if r["loss"] in order else len(order))
        for r in group:
            label = LABELS.get(r["loss"], r["loss"])
            note = NOTES.get((r["loss"], r.get("device", "cpu")), "")
            if r.get("status") != "ok":
                out.append(
                    f"| {n} | {h} | {v} | {variant} | {label} | not run | | | | | | {r.get('reason', '')} |"
                )
                continue
            if r["loss"] == "cce_compile" and r.get("prime_seconds"):
                note = (note + "; " if note else "") + f"compile {r['prime_seconds']:.0f} s (apart)"
            if r.get("interleaved"):
                note = (note + "; " if note else "") + f"round-robin with its shape's other cases, {len(r.get('times', []))} rounds"
            elif len(r.get("times") or []) == 1:
                note = (note + "; " if note else "") + "1 run"
            if dtype != "float32":
                note = (note + "; " if note else "") + dtype
            out.append(
                f"| {n} | {h} | {v} | {variant} | {label} | {r['seconds']:.3f} | "
                f"{_fmt(r.get('spread'), '.2f')} | {_fmt(r.get('time_vs_floor'), '.2f')} | "
                f"{_fmt(r.get('time_vs_naive'), '.2f')} | {r['extra_bytes'] / MiB:.1f} | "
                f"{_fmt(None if r.get('extra_vs_naive') is None else 100 * r['extra_vs_naive'], '.1f', '%')} | {note} |"
            )
    return "\n".join(out) + "\n"


def targets(rows: List[Dict], n=8192, h=2048, v=151936, variant="token", dtype="float32") -> List[Dict]:
    """The issue's targets at one shape, each with its measured value and met / not met."""
    rows = annotate(rows)
    at = {r["loss"]: r for r in rows if r.get("status") == "ok" and shape_key(r) == (n, h, v, dtype, variant)}
    f = at.get("fused")
    if f is None:
        return []
    peers = [at[p] for p in ("torch_lce", "torch_lce_matched", "cce_compile") if p in at]
    best_peer = min(peers, key=lambda r: r["extra_bytes"]) if peers else None
    limit = 1.10
    out = []

    def add(name, value, limit, met):
        out.append({"target": name, "measured": value, "limit": limit, "met": met})

    if f.get("extra_vs_naive") is not None:
        add("fused extra memory <= 2% of naive", f"{100 * f['extra_vs_naive']:.2f}%", "2%", f["extra_vs_naive"] <= 0.02)
    if best_peer is not None:
        add(
            "fused extra memory <= best peer's",
            f"{f['extra_bytes'] / MiB:.0f} MiB vs {best_peer['extra_bytes'] / MiB:.0f} MiB ({best_peer['loss']})",
            "<=", f["extra_bytes"] <= best_peer["extra_bytes"],
        )
    if f.get("time_vs_floor") is not None:
        add(f"fused time <= {limit:.2f}x the unchunked matmul floor", f"{f['time_vs_floor']:.3f}x", f"{limit:.2f}x",
            f["time_vs_floor"] <= limit)
    for p in peers:
        add(f"fused faster than {p['loss']}", f"{f['seconds']:.2f} s vs {p['seconds']:.2f} s", "<",
            f["seconds"] < p["seconds"])
    fw = at.get("fused_fwd")
    if fw is not None and fw.get("time_vs_floor") is not None:
        add(f"forward only <= {limit:.2f}x one matmul", f"{fw['time_vs_floor']:.3f}x", f"{limit:.2f}x",
            fw["time_vs_floor"] <= limit)
    if f.get("time_vs_naive") is not None:
        add("fused time <= 0.9x naive", f"{f['time_vs_naive']:.3f}x", "0.9x", f["time_vs_naive"] <= 0.9)
    return out


def targets_markdown(rows: List[Dict], **shape) -> str:
    t = targets(rows, **shape)
    if not t:
        return ""
    lines = ["| target | measured | met |", "|---|---|---|"]
    for x in t:
        lines.append(f"| {x['target']} | {x['measured']} | {'yes' if x['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict], path: str, group: str = "scaling") -> Optional[str]:
    """Time and extra memory against N for one group's rows (log-log); returns the path."""
    rows = [r for r in annotate(rows) if r.get("group") == group and r.get("status") == "ok"]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for loss in LABELS:
        pts = sorted((r["n"], r["seconds"], r["extra_bytes"] / MiB) for r in rows if r["loss"] == loss)
        if not pts:
            continue
        ns = [p[0] for p in pts]
        ax_t.plot(ns, [p[1] for p in pts], marker="o", label=LABELS[loss])
        ax_m.plot(ns, [max(p[2], 0.1) for p in pts], marker="o", label=LABELS[loss])
    r0 = rows[0]
    title = f"H={r0['h']}, V={r0['v']}, {r0['dtype']}, {r0['variant']}, forward+backward, CPU"
    for ax, ylabel in ((ax_t, "time (s), best of repeats"), (ax_m, "extra peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(
    rows: List[Dict], out_dir: str, name: str = "cpu", crosscheck: Optional[Dict] = None,
    env: Optional[Dict] = None,
) -> Dict[str, str]:
    """Write <name>.json, <name>.md, <name>_scaling.png and README_table.md into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    env = env or environment()
    rows = annotate(rows)
    paths = {}
    paths["json"] = os.path.join(out_dir, f"{name}.json")
    with open(paths["json"], "w") as f:
        json.dump({"environment": env, "rows": rows, "crosscheck": crosscheck}, f, indent=1, default=str)
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    table = markdown_table(rows)
    tgt = targets_markdown(rows)
    body = [f"# CPU benchmark: PEAR loss, forward + backward\n\n{header}\n"]
    body.append(
        "Best of the repeats; spread = slowest / fastest repeat (other jobs share the CPU, so "
        "compare ratios within one shape, measured in the same run). Extra memory: peak resident "
        "set beyond the inputs and the returned gradients, one child process per case. Peers "
        "compute per-token CE; the PEAR weights come from their detached log-probs.\n"
    )
    if tgt:
        body.append("## Targets (N=8192, H=2048, V=151936, fp32)\n\n" + tgt)
    body.append("## All cases\n\n" + table)
    if crosscheck:
        body.append("## Correctness cross-check (vs float64 reference, max abs err / max abs)\n\n" + _crosscheck_md(crosscheck))
    paths["md"] = os.path.join(out_dir, f"{name}.md")
    with open(paths["md"], "w") as f:
        f.write("\n".join(body))
    png = plot(rows, os.path.join(out_dir, f"{name}_scaling.png"))
    if png:
        paths["png"] = png
    paths["readme"] = os.path.join(out_dir, "README_table.md")
    with open(paths["readme"], "w") as f:
        f.write(readme_snippet(rows, env))
    return paths


def _crosscheck_md(cc: Dict) -> str:
    lines = ["| case | loss | loss err | dh err | dW err |", "|---|---|---:|---:|---:|"]
    for case_name, res in cc.items():
        for loss, r in res.items():
            if r.get("status") != "ok":
                lines.append(f"| {case_name} | {loss} | not run: {r.get('reason', '')} | | |")
            elif "loss_err" in r:
                dh = f"{r['dh_err']:.1e}" if "dh_err" in r else "- (forward only)"
                dw = f"{r['dw_err']:.1e}" if "dw_err" in r else "-"
                lines.append(f"| {case_name} | {loss} | {r['loss_err']:.1e} | {dh} | {dw} |")
    return "\n".join(lines) + "\n"


def target_grid_markdown(rows: List[Dict]) -> str:
    """One line per shape measured with the floor and fused: the issue-14 targets side by side
    (fused <= 1.10x the unchunked floor, faster than every peer, forward only <= 1.10x one GEMM;
    the sequence variant against its 4-GEMM floor), memory beside them."""
    rows = annotate(rows)
    by: "OrderedDict" = OrderedDict()
    for r in rows:
        if r.get("status") == "ok":
            by.setdefault(shape_key(r), {})[r["loss"]] = r
    out = ["| N | H | V | variant | fused / floor | chunked floor / floor | forward / 1 GEMM | fused s | "
           "cut-cross-entropy s | torch lce s (default; our chunks) | extra MiB: fused; cce; torch lce default | met |",
           "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for (n, h, v, dtype, variant), at in by.items():
        f, fl = at.get("fused"), at.get("floor")
        if f is None or fl is None or dtype != "float32":
            continue
        ch, fw, cce = at.get("floor_chunked"), at.get("fused_fwd"), at.get("cce_compile")
        lce, lcm = at.get("torch_lce"), at.get("torch_lce_matched")
        peers = [p for p in (cce, lce, lcm) if p is not None]
        met = f["seconds"] / fl["seconds"] <= 1.10 and all(f["seconds"] < p["seconds"] for p in peers)
        if fw is not None and fw.get("time_vs_floor") is not None:
            met = met and fw["time_vs_floor"] <= 1.10

        def s(r):
            return "-" if r is None else f"{r['seconds']:.2f}"

        def mib(r):
            return "-" if r is None else f"{r['extra_bytes'] / MiB:.0f}"

        out.append(
            f"| {n} | {h} | {v} | {variant} | {f['seconds'] / fl['seconds']:.2f}x | "
            f"{'-' if ch is None else format(ch['seconds'] / fl['seconds'], '.2f') + 'x'} | "
            f"{'-' if fw is None or fw.get('time_vs_floor') is None else format(fw['time_vs_floor'], '.2f') + 'x'} | "
            f"{s(f)} | {s(cce)} | {s(lce)}; {s(lcm)} | {mib(f)}; {mib(cce)}; {mib(lce)} | {'yes' if met else 'no'} |"
        )
    return "\n".join(out) + "\n" if len(out) > 2 else ""


def readme_snippet(rows: List[Dict], env: Optional[Dict] = None) -> str:
    """The table README shows: the largest shape measured with every loss, plus the targets."""
    env = env or environment()
    rows = annotate(rows)
    grid = target_grid_markdown(rows)
    ok = [r for r in rows if r.get("status") == "ok" and r["loss"] == "naive"]
    if not ok:
        if not grid:
            return ""
        return (f"CPU ({env['cpu']}; {env['machine']}); {env['date']}; torch {env['torch']}, "
                f"cut-cross-entropy {env['cut_cross_entropy']}; fp32, forward + backward, each shape's "
                "cases round-robin in one run, best of the rounds:\n\n" + grid)
    big = max(ok, key=lambda r: (r["n"] * r["h"] * r["v"], r["n"]))
    key = shape_key(big)
    sel = [r for r in rows if shape_key(r) == key]
    n, h, v, dtype, variant = key
    lines = [
        f"Forward + backward, N={n} tokens, H={h}, V={v}, {dtype}, {variant} variant, CPU "
        f"({env['cpu']}; {env['machine']}); {env['date']}; torch {env['torch']}, "
        f"liger-kernel {env['liger_kernel']}, cut-cross-entropy {env['cut_cross_entropy']}.",
        "",
        markdown_table(sel),
    ]
    tgt = targets_markdown(rows)
    if tgt:
        lines += ["Targets at N=8192, H=2048, V=151936, fp32:", "", tgt]
    if any(len(r.get("times") or []) == 1 for r in sel) and any(r.get("interleaved") for r in sel):
        lines.append(
            "Rows marked '1 run' were measured once, at another time than the round-robin rows "
            "(on a shared CPU under a different load): compare their memory, not their time.\n"
        )
    lines.append("Full results: benchmarks/results/cpu.md; plot: benchmarks/results/cpu_scaling.png.\n")
    return "\n".join(lines)


def _main(argv=None) -> None:  # pragma: no cover - manual use
    """Rewrite the tables and the plot from DIR/cpu.json: python benchmarks/bench_report.py DIR"""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    out_dir = argv[0] if argv else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(out_dir, "cpu.json")) as f:
        data = json.load(f)
    paths = write_results(data["rows"], out_dir, "cpu", data.get("crosscheck"), env=data.get("environment"))
    print("\n".join(paths.values()))


if __name__ == "__main__":  # pragma: no cover
    _main()
