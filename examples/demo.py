"""Demo: the PEAR loss on a generated batch, its weight statistics, and fused-vs-naive memory.

Runs on CPU in well under a minute, no downloads. `make demo` runs it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from pear_kernels import PEARConfig, Variant, fused_pear_loss, fused_token_logprobs, reference_pear_loss

# The memory comparison uses the benchmark harness, which lives beside the package (benchmarks/),
# not inside it: this example runs from a clone of the repository.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import Case, make_inputs, measure_in_child  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    torch.manual_seed(0)
    n, h, v, t = args.tokens, args.hidden, args.vocab, args.seq_len
    case = Case(n=n, h=h, v=v, seq_len=t, prompt_frac=0.25)
    print(f"PEAR demo: {n} tokens in sequences of {t} (first quarter of each is prompt), H={h}, V={v}\n")

    hidden, weight, labels, _, cu = make_inputs(case)
    # A behavior policy close to the model: its log-probs are the model's own plus noise, so
    # log-ratios spread around 0 (a teacher far from the student clips every ratio).
    with torch.no_grad():
        own = fused_token_logprobs(hidden, weight, labels)
    behavior = (own + 0.02 + 0.1 * torch.randn(own.shape)).clamp(max=0.0)
    print(f"{'variant':<10}{'loss':>10}{'oracle':>10}{'mean w':>9}{'ESS frac':>10}{'ratio clip':>12}{'w clip':>9}")
    for variant in Variant:
        cfg = PEARConfig(variant=variant)
        loss, stats = fused_pear_loss(hidden, weight, labels, behavior, cu_seqlens=cu, config=cfg, return_stats=True)
        ref = reference_pear_loss(hidden, weight, labels, behavior, cu_seqlens=cu, config=cfg)
        print(
            f"{variant.value:<10}{loss.item():>10.4f}{ref.item():>10.4f}{stats.mean_weight.item():>9.4f}"
            f"{stats.ess_fraction.item():>10.3f}{stats.ratio_clip_fraction.item():>12.3f}"
            f"{stats.weight_clip_fraction.item():>9.3f}"
        )

    print("\nforward + backward, token variant, each in a fresh process:")
    rows = {}
    for name in ("naive", "fused"):
        r = measure_in_child(Case(n=n, h=h, v=v, seq_len=t, prompt_frac=0.25, loss=name))
        rows[name] = r
        print(f"  {name:<6} time {r['seconds']:.3f} s   extra peak memory {r['extra_bytes'] / 2**20:8.1f} MiB")
    ratio = rows["fused"]["extra_bytes"] / max(rows["naive"]["extra_bytes"], 1)
    print(f"  fused/naive extra memory: {ratio:.3f}   logits alone would be {n * v * 4 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
