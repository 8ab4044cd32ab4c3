"""Measuring a loss on CPU or GPU: peak extra memory and time, one case per child process.

CPU tensors come from one allocator that keeps no statistics, so peak memory is read from the
kernel: the resident-set high-water mark (VmHWM) is reset through /proc/self/clear_refs once
the inputs exist, and the extra memory is that mark after the loss ran, minus the resident set
before it, minus the bytes of the gradients the loss must return. A fresh process per case
keeps memory that glibc cached from an earlier case from hiding this one's allocations (and
ru_maxrss is no use there: it survives fork and exec from a large parent). On CUDA, torch's
allocator statistics are used directly.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional

import torch

__all__ = ["Case", "CaseResult", "make_inputs", "run_case", "measure_in_child", "LOSSES"]


@dataclass
class Case:
    n: int
    h: int
    v: int
    dtype: str = "float32"
    variant: str = "token"
    loss: str = "fused"  # key of LOSSES
    seq_len: int = 1024
    prompt_frac: float = 0.0
    repeats: int = 1
    device: str = "cpu"
    seed: int = 0
    threads: Optional[int] = None


@dataclass
class CaseResult:
    case: Case
    seconds: float  # best of `repeats`, forward + backward
    extra_bytes: int  # peak memory beyond inputs and the returned gradients
    input_bytes: int
    grad_bytes: int
    loss: float

    def to_dict(self) -> Dict:
        d = asdict(self)
        d.update(d.pop("case"))
        d["loss_value"] = self.loss
        d["loss"] = self.case.loss
        return d


def make_inputs(case: Case):
    g = torch.Generator().manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)
    hidden = (torch.randn(case.n, case.h, generator=g) / case.h**0.5).to(dtype)
    weight = (torch.randn(case.v, case.h, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, case.v, (case.n,), generator=g)
    seq = max(1, min(case.seq_len, case.n))
    if case.prompt_frac > 0:
        pos = torch.arange(case.n) % seq
        labels[pos < int(case.prompt_frac * seq)] = -100
    behavior = -torch.rand(case.n, generator=g, dtype=torch.float32) * 4
    cu = torch.arange(0, case.n + 1, seq)
    if cu[-1] != case.n:
        cu = torch.cat([cu, torch.tensor([case.n])])
    dev = torch.device(case.device)
    hidden = hidden.to(dev).requires_grad_(True)
    weight = weight.to(dev).requires_grad_(True)
    return hidden, weight, labels.to(dev), behavior.to(dev), cu.to(dev)


def _fused(hidden, weight, labels, behavior, cu, variant):
    from . import fused_pear_loss

    return fused_pear_loss(hidden, weight, labels, behavior, cu_seqlens=cu, variant=variant)


def _naive(hidden, weight, labels, behavior, cu, variant):
    from . import reference_pear_loss

    return reference_pear_loss(hidden, weight, labels, behavior, cu_seqlens=cu, variant=variant)


LOSSES: Dict[str, Callable] = {"fused": _fused, "naive": _naive}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the resident-set high-water mark; return the current resident set in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def run_case(case: Case, fn: Optional[Callable] = None) -> CaseResult:
    """Run one case in this process (call it in a fresh process for a clean memory figure)."""
    if case.threads:
        torch.set_num_threads(case.threads)
    fn = fn or LOSSES[case.loss]
    hidden, weight, labels, behavior, cu = make_inputs(case)
    input_bytes = sum(t.numel() * t.element_size() for t in (hidden, weight, labels, behavior, cu))
    grad_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    cuda = hidden.is_cuda
    best = float("inf")
    loss_val = float("nan")
    extra = 0
    for _ in range(max(1, case.repeats)):
        hidden.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _reset_peak_rss()
        t0 = time.perf_counter()
        loss = fn(hidden, weight, labels, behavior, cu, case.variant)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        loss_val = float(loss.detach())
        del loss
        peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss()
        extra = max(extra, peak - base - grad_bytes)
    return CaseResult(case, best, max(extra, 0), input_bytes, grad_bytes, loss_val)


def _child(case_dict, queue):
    try:
        queue.put(("ok", run_case(Case(**case_dict)).to_dict()))
    except Exception as e:  # reported to the parent, which raises
        queue.put(("error", f"{type(e).__name__}: {e}"))


def measure_in_child(case: Case, timeout: float = 1800.0) -> Dict:
    """run_case in a fresh spawned process; returns CaseResult.to_dict()."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(asdict(case), queue))
    proc.start()
    try:
        status, payload = queue.get(timeout=timeout)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    if status != "ok":
        raise RuntimeError(f"case {case} failed in the child process: {payload}")
    return payload


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    print(json.dumps(run_case(Case(**json.loads(sys.argv[1]))).to_dict()))
