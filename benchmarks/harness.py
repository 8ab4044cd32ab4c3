"""Measuring a loss on CPU or GPU: peak extra memory and time, one case per child process.

CPU tensors come from one allocator that keeps no statistics, so peak memory is read from the
kernel: the resident-set high-water mark (VmHWM) is reset through /proc/self/clear_refs once
the inputs exist, and the extra memory is that mark after the loss ran, minus the resident set
before it, minus the bytes of the gradients the loss must return. A fresh process per case
keeps memory that glibc cached from an earlier case from hiding this one's allocations (and
ru_maxrss is no use there: it survives fork and exec from a large parent). The child also gets
a fixed glibc mmap threshold, so a buffer freed by one repeat goes back to the kernel instead of
staying resident and hiding the next repeat's peak. On CUDA, torch's allocator statistics are
used directly.

LOSSES maps a name to one forward + backward of a PEAR loss on the same inputs:

    fused       pear_kernels.fused_pear_loss (chunked, never N x V)
    naive       reference_pear_loss: logits materialised, log_softmax, gather, plain autograd
    floor       the bare matmuls the loss must do, each ONE unchunked GEMM at full size
                (3 for token/block: logits, dh, dW; 4 for sequence: one more logits pre-pass):
                the floor every ratio is taken against
    floor_chunked  the same matmuls chunk by chunk at the fused chunk size (what chunking costs)
    fused_fwd   fused_pear_loss under torch.no_grad (eval, the collection's log-prob pass)
    floor_fwd   its floor: one unchunked logits GEMM
    torch_lce   torch.nn.functional.linear_cross_entropy, chunked (LinearCrossEntropyOptions()
                defaults: on CPU fp32, chunks of ~(N x H / 2) logits, a few rows at 152k vocab)
    torch_lce_matched  the same with batch_chunk_size = the fused loss's chunk rows
    liger       Liger-Kernel's fused linear cross-entropy (Triton; the interpreter on CPU)
    cce_compile cut-cross-entropy's torch_compile implementation
    flash_attn_ce flash-attn's Triton cross-entropy on materialised logits (GPU; the interpreter on CPU)

The peers compute per-token cross-entropy (reduction="none", so their backward folds a
per-token factor into dlogits before dW is summed); the PEAR weights are then computed from
their detached log-probs with pear_kernels.pear_weights and the weighted mean is
back-propagated. That is a complete PEAR loss built on each peer, so all entries return the
same value and gradients (checked by crosscheck). A peer that cannot run here raises
PeerUnavailable with the reason; measure_in_child reports it instead of failing.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

__all__ = [
    "Case",
    "CaseResult",
    "PeerUnavailable",
    "make_inputs",
    "run_case",
    "measure_in_child",
    "measure_interleaved",
    "crosscheck",
    "crosscheck_in_child",
    "LOSSES",
    "MATMULS",
]

IGNORE_INDEX = -100
# glibc returns blocks above this size to the kernel on free (and keeps the threshold fixed,
# instead of raising it after the first large free), so RSS falls back between repeats.
_MMAP_THRESHOLD = str(128 * 1024)


class PeerUnavailable(RuntimeError):
    """A loss that cannot run on this machine; the message says why."""


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
    warmup: int = 0  # untimed full-size calls before the timed ones
    prime: bool = True  # one call at a tiny shape first: imports, thread pools, torch.compile
    device: str = "cpu"
    seed: int = 0
    threads: Optional[int] = None
    chunk_size: Optional[int] = None  # fused and floor: rows per logits chunk (None: default)


@dataclass
class CaseResult:
    case: Case
    seconds: float  # best of `repeats`, forward + backward
    extra_bytes: int  # peak memory beyond inputs and the returned gradients
    input_bytes: int
    grad_bytes: int
    loss: float
    times: List[float] = field(default_factory=list)  # every timed repeat
    prime_seconds: Optional[float] = None  # the tiny priming call (mostly compile/import time)

    def to_dict(self) -> Dict:
        d = asdict(self)
        d.update(d.pop("case"))
        d["loss_value"] = self.loss
        d["loss"] = self.case.loss
        d["status"] = "ok"
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
        labels[pos < int(case.prompt_frac * seq)] = IGNORE_INDEX
    behavior = -torch.rand(case.n, generator=g, dtype=torch.float32) * 4
    cu = torch.arange(0, case.n + 1, seq)
    if cu[-1] != case.n:
        cu = torch.cat([cu, torch.tensor([case.n])])
    dev = torch.device(case.device)
    hidden = hidden.to(dev).requires_grad_(True)
    weight = weight.to(dev).requires_grad_(True)
    return hidden, weight, labels.to(dev), behavior.to(dev), cu.to(dev)


# ---------------------------------------------------------------------------------------------
# The losses. Each takes (hidden, weight, labels, behavior, cu, variant, chunk_size) and returns
# a scalar loss to back-propagate (or, for the floor, a plain tensor with the grads already set).


def _fused(hidden, weight, labels, behavior, cu, variant, chunk_size=None):
    from pear_kernels import fused_pear_loss

    return fused_pear_loss(
        hidden, weight, labels, behavior, cu_seqlens=cu, variant=variant, chunk_size=chunk_size
    )


def _fused_on(backend):
    """The fused loss pinned to one backend (e.g. the native row pass against the torch one)."""

    def run(hidden, weight, labels, behavior, cu, variant, chunk_size=None):
        from pear_kernels import fused_pear_loss
        from pear_kernels.kernels import native_cpu

        if backend == "native" and not native_cpu.available():
            raise PeerUnavailable(str(native_cpu.unavailable_reason()))
        return fused_pear_loss(
            hidden, weight, labels, behavior, cu_seqlens=cu, variant=variant,
            chunk_size=chunk_size, backend=backend,
        )

    return run


def _naive(hidden, weight, labels, behavior, cu, variant, chunk_size=None):
    from pear_kernels import reference_pear_loss

    return reference_pear_loss(hidden, weight, labels, behavior, cu_seqlens=cu, variant=variant)


def _pear_from_token_ce(token_ce, labels, behavior, cu, variant):
    """Weighted mean of a peer's per-token CE (0 at ignored tokens) with PEAR weights.

    The log-ratio is logp_theta - logp_beta = -ce - logp_beta, detached (the weight carries no
    gradient); the normalizer is the number of supervised tokens, as in fused_pear_loss.
    """
    from pear_kernels.importance import pear_weights

    mask = labels != IGNORE_INDEX
    log_ratio = -token_ce.detach().to(torch.float64) - behavior.to(torch.float64)
    w = pear_weights(log_ratio, mask, cu_seqlens=cu, variant=variant)
    return (w.to(token_ce.dtype) * token_ce).sum() / mask.sum().clamp(min=1)


def _torch_lce(hidden, weight, labels, behavior, cu, variant, chunk_size=None, matched=False):
    import torch.nn.functional as F

    if not hasattr(F, "linear_cross_entropy"):
        raise PeerUnavailable(f"torch {torch.__version__} has no nn.functional.linear_cross_entropy")
    from torch.nn import LinearCrossEntropyOptions

    if matched:
        from pear_kernels.kernels.backend import default_chunk_size

        rows = chunk_size or default_chunk_size(weight.shape[0], hidden.element_size())
        options = LinearCrossEntropyOptions(batch_chunk_size=rows)
    else:
        # torch's default chunking: (chunk x V) logits about the size of (N x H) / 2
        options = LinearCrossEntropyOptions()
    ce = F.linear_cross_entropy(
        hidden, weight, labels, reduction="none", ignore_index=IGNORE_INDEX, options=options
    )
    return _pear_from_token_ce(ce, labels, behavior, cu, variant)


def _torch_lce_matched(hidden, weight, labels, behavior, cu, variant, chunk_size=None):
    """torch's chunked loss with the fused loss's chunk rows (same logits memory)."""
    return _torch_lce(hidden, weight, labels, behavior, cu, variant, chunk_size, matched=True)


def _liger(hidden, weight, labels, behavior, cu, variant, chunk_size=None):
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        raise PeerUnavailable("liger-kernel is not installed; pip install pear_kernels[bench]")
    if hidden.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise PeerUnavailable("Liger's kernels are Triton: on CPU they run only with TRITON_INTERPRET=1")
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except ImportError as e:
        raise PeerUnavailable(f"liger-kernel not importable ({e}); pip install pear_kernels[bench]") from e
    ce = LigerFusedLinearCrossEntropyFunction.apply(
        hidden, weight, labels, None, None, IGNORE_INDEX, 0.0, 0.0, "none"
    )[0]
    return _pear_from_token_ce(ce.to(hidden.dtype), labels, behavior, cu, variant)


def _cce_compile(hidden, weight, labels, behavior, cu, variant, chunk_size=None):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise PeerUnavailable(
            f"cut-cross-entropy not importable ({type(e).__name__}: {e}); pip install cut-cross-entropy"
        ) from e
    ce = linear_cross_entropy(
        hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="none", impl="torch_compile"
    )
    return _pear_from_token_ce(ce.to(hidden.dtype), labels, behavior, cu, variant)


FLASH_ATTN_INSTALL = (
    "FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE "
    "pip install --no-build-isolation --no-deps flash-attn"
)


def load_flash_attn_cross_entropy():
    """flash-attn's Triton cross-entropy module, loaded by file path: ``import flash_attn``
    loads its CUDA extension, which a Python-files-only install (no GPU build) lacks, while
    flash_attn/ops/triton/cross_entropy.py needs only torch and triton."""
    import importlib.util

    spec = importlib.util.find_spec("flash_attn")
    if spec is None or not spec.submodule_search_locations:
        raise PeerUnavailable(f"flash-attn is not installed (Python files only: {FLASH_ATTN_INSTALL})")
    path = os.path.join(spec.submodule_search_locations[0], "ops", "triton", "cross_entropy.py")
    if not os.path.isfile(path):
        raise PeerUnavailable(f"this flash-attn has no {path}")
    mod_spec = importlib.util.spec_from_file_location("flash_attn_triton_cross_entropy", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


class _NoopCudaDevice:
    _pear_noop = True

    def __init__(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@contextmanager
def _cuda_device_noop_for_cpu(tensor):
    """flash-attn enters torch.cuda.device(logits.device.index) in forward and in backward,
    which fails for a CPU tensor (index None) under the interpreter: make it a no-op there.
    On a machine without CUDA the no-op stays for the process (the backward runs after this
    call returns, and nothing can need a CUDA device there); with CUDA, for the call only."""
    if tensor.device.type != "cpu":
        yield
        return
    if not torch.cuda.is_available():
        if not getattr(torch.cuda.device, "_pear_noop", False):
            torch.cuda.device = _NoopCudaDevice
        yield
        return
    real = torch.cuda.device
    torch.cuda.device = _NoopCudaDevice
    try:
        yield
    finally:
        torch.cuda.device = real


def flash_attn_cross_entropy(logits, labels, **kwargs):
    """flash_attn.ops.triton.cross_entropy.cross_entropy_loss, runnable on CPU tensors under
    TRITON_INTERPRET=1; returns (losses, z_losses) per token."""
    module = load_flash_attn_cross_entropy()
    with _cuda_device_noop_for_cpu(logits):
        return module.cross_entropy_loss(logits, labels, **kwargs)


def _flash_attn_ce(hidden, weight, labels, behavior, cu, variant, chunk_size=None):
    """flash-attn's Triton cross-entropy (materialised logits; its tensor-parallel
    process_group splits the vocabulary like our vocab_parallel_group) + PEAR weights."""
    if hidden.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise PeerUnavailable("flash-attn's kernels are Triton: on CPU they run only with TRITON_INTERPRET=1")
    logits = (hidden @ weight.t()).float()
    ce, _ = flash_attn_cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    return _pear_from_token_ce(ce.to(hidden.dtype), labels, behavior, cu, variant)


DISTILL_TOP_K = 8
_TEACHER_CACHE: Dict = {}


def _teacher_topk(labels, vocab: int):
    """Deterministic stand-in teacher top-k (ids, log-probs) for the distillation cases, cached
    per shape. Built from arithmetic (no randperm of the vocabulary per row), so the first call,
    which is the timed one when each child runs one repeat, pays microseconds for it."""
    key = (labels.numel(), vocab)
    if key not in _TEACHER_CACHE:
        g = torch.Generator().manual_seed(7)
        n = labels.numel()
        step = max(1, vocab // DISTILL_TOP_K - 1)  # K distinct ids per row: k * step < vocab
        offset = (torch.arange(n) * 7919) % vocab
        ids = (offset[:, None] + torch.arange(DISTILL_TOP_K)[None, :] * step) % vocab
        lq = torch.log_softmax(torch.randn(n, DISTILL_TOP_K + 1, generator=g), -1)[:, :DISTILL_TOP_K]
        _TEACHER_CACHE[key] = (ids.to(labels.device), lq.to(labels.device))
    return _TEACHER_CACHE[key]


def _distill_fused(hidden, weight, labels, behavior, cu, variant, chunk_size=None):
    from pear_kernels import fused_pear_distill_loss

    ids, lq = _teacher_topk(labels, weight.shape[0])
    return fused_pear_distill_loss(hidden, weight, labels, behavior, ids, lq, cu_seqlens=cu, variant=variant,
                                   chunk_size=chunk_size, tail="bucket")


def _distill_fused_on(backend):
    def run(hidden, weight, labels, behavior, cu, variant, chunk_size=None):
        from pear_kernels import fused_pear_distill_loss

        ids, lq = _teacher_topk(labels, weight.shape[0])
        return fused_pear_distill_loss(hidden, weight, labels, behavior, ids, lq, cu_seqlens=cu, variant=variant,
                                       chunk_size=chunk_size, tail="bucket", backend=backend)

    run.__doc__ = f"fused_pear_distill_loss pinned to backend={backend!r}"
    return run


def _distill_liger_jsd(hidden, weight, labels, behavior, cu, variant, chunk_size=None):
    """Liger-Kernel's chunked LigerFusedLinearJSDLoss (PyTorch; eager, compiled=False: on CPU a
    torch.compile of its chunk function would recompile at the timed shape) with beta = 0, the
    forward KL, over the full vocabulary of an *online* teacher, no hard loss, no PEAR weight.
    The teacher here has the student's head and hidden size (teacher hidden = 1.25 x student's,
    weight shared, so no extra input memory is counted): a real, larger teacher costs more."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError as exc:
        raise PeerUnavailable(f"liger-kernel is not installed ({exc})") from None
    teacher_h = hidden.detach() * 1.25
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=False)
    return loss_fn(hidden, weight, teacher_h, weight.detach(), labels)


def _distill_naive(hidden, weight, labels, behavior, cu, variant, chunk_size=None):
    """Materialised logits: log_softmax, gather the teacher's top-k, bucket KL, PEAR weights."""
    from pear_kernels.importance import pear_weights

    ids, lq = _teacher_topk(labels, weight.shape[0])
    s = torch.log_softmax((hidden @ weight.t()).float(), -1)
    mask = labels != IGNORE_INDEX
    s_top = s.gather(1, ids)
    q = lq.exp()
    r = (1 - q.sum(1)).clamp(min=0)
    rest = (1 - s_top.exp().sum(1)).clamp(min=1e-12)
    kl = (q * (lq - s_top)).sum(1) + r * (torch.log(r.clamp(min=1e-30)) - torch.log(rest))
    log_ratio = s.gather(1, labels.clamp(min=0)[:, None]).squeeze(1).detach().double() - behavior.double()
    w = pear_weights(log_ratio, mask, cu_seqlens=cu, variant=variant)
    return (w.to(kl.dtype) * kl * mask).sum() / mask.sum().clamp(min=1)


def _floor(hidden, weight, labels, behavior, cu, variant, chunk_size=None):
    """The matmuls of the loss alone, each one unchunked GEMM over every supervised token:
    logits = h_s W^T (M x V, the buffer stands in for dlogits), dh_s = logits W, dW = logits^T
    h_s; the sequence variant does the logits GEMM twice (its pre-pass). The lower bound of any
    implementation that computes the logits (cut-cross-entropy's included)."""
    mask = labels != IGNORE_INDEX
    idx = mask.nonzero().squeeze(1)
    work = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h, w = hidden.detach(), weight.detach()
    h_s = h[idx]
    z = torch.mm(h_s, w.t())
    if variant == "sequence":
        torch.mm(h_s, w.t(), out=z)
    dh = torch.zeros_like(h)
    dh[idx] = torch.mm(z, w)
    dw = torch.mm(z.t(), h_s if h_s.dtype == work else h_s.to(work))
    hidden.grad = dh
    weight.grad = dw.to(w.dtype)
    return torch.zeros(())


def _floor_fwd(hidden, weight, labels, behavior, cu, variant, chunk_size=None):
    """Forward-only floor: the one logits GEMM of the supervised tokens."""
    idx = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    with torch.no_grad():
        torch.mm(hidden[idx], weight.t())
    return torch.zeros(())


def _fused_fwd(hidden, weight, labels, behavior, cu, variant, chunk_size=None):
    """fused_pear_loss under no_grad: no gradient work at all (eval, log-prob collection)."""
    from pear_kernels import fused_pear_loss

    with torch.no_grad():
        return fused_pear_loss(hidden, weight, labels, behavior, cu_seqlens=cu, variant=variant,
                               chunk_size=chunk_size)


def _floor_chunked(hidden, weight, labels, behavior, cu, variant, chunk_size=None):
    """The matmuls of the fused loss alone, on the same chunks, into the same gradient buffers.

    Token/block: logits = h_c W^T, dh_c = logits W, dW += logits^T h_c (the buffer stands in for
    dlogits). Sequence: one more logits matmul per chunk (the log-prob pre-pass) when the
    supervised tokens do not fit one chunk, as in the fused path.
    """
    from pear_kernels.kernels.backend import default_chunk_size

    mask = labels != IGNORE_INDEX
    idx = mask.nonzero().squeeze(1)
    m = idx.numel()
    rows = chunk_size or default_chunk_size(weight.shape[0], hidden.element_size())
    work = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h, w = hidden.detach(), weight.detach()
    dh = torch.zeros_like(h)
    dw = torch.empty(w.shape, dtype=work)  # written by the first chunk, as in the fused path
    prepass = variant == "sequence" and m > rows
    buf = torch.empty(min(rows, max(m, 1)), w.shape[0], dtype=h.dtype, device=h.device)
    end = m
    while end > 0:
        start = max(0, end - rows)
        rows_c = idx[start:end]
        h_c = h[rows_c]
        z = buf[: end - start]
        if prepass:
            torch.mm(h_c, w.t(), out=z)
        torch.mm(h_c, w.t(), out=z)
        dh.index_copy_(0, rows_c, torch.mm(z, w))
        h_w = h_c if h_c.dtype == work else h_c.to(work)
        if end == m:
            torch.mm(z.t(), h_w, out=dw)
        else:
            dw.addmm_(z.t(), h_w)
        end = start
    if m == 0:
        dw.zero_()
    hidden.grad = dh
    weight.grad = dw.to(w.dtype)
    return torch.zeros(())


LOSSES: Dict[str, Callable] = {
    "fused": _fused,
    "fused_torch": _fused_on("torch"),
    "fused_native": _fused_on("native"),
    "naive": _naive,
    "floor": _floor,
    "floor_chunked": _floor_chunked,
    "floor_fwd": _floor_fwd,
    "fused_fwd": _fused_fwd,
    "torch_lce": _torch_lce,
    "torch_lce_matched": _torch_lce_matched,
    "liger": _liger,
    "cce_compile": _cce_compile,
    "flash_attn_ce": _flash_attn_ce,
    "distill_fused": _distill_fused,
    "distill_naive": _distill_naive,
    "distill_fused_torch": _distill_fused_on("torch"),
    "distill_fused_native": _distill_fused_on("native"),
    "distill_liger_jsd": _distill_liger_jsd,
}

# Matmuls of the size (tokens x H x V) that each variant's fused path does.
MATMULS = {"token": 3, "block": 3, "none": 3, "sequence": 4}


# ---------------------------------------------------------------------------------------------
# Measuring


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


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
    prime_seconds = None
    if case.prime:
        # One-time costs (lazy imports, thread pools, torch.compile, Triton's interpreter) would
        # otherwise land in the first repeat's time and peak memory.
        tiny = Case(**{**asdict(case), "n": 16, "h": min(case.h, 16), "v": min(case.v, 64),
                       "seq_len": 8, "prime": False, "chunk_size": None})
        t0 = time.perf_counter()
        loss = fn(*make_inputs(tiny), tiny.variant, None)
        if loss.requires_grad:
            loss.backward()
        prime_seconds = time.perf_counter() - t0
        del loss
    hidden, weight, labels, behavior, cu = make_inputs(case)
    input_bytes = sum(t.numel() * t.element_size() for t in (hidden, weight, labels, behavior, cu))
    grad_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    cuda = hidden.is_cuda
    best = float("inf")
    loss_val = float("nan")
    extra = 0
    times: List[float] = []
    for i in range(max(0, case.warmup) + max(1, case.repeats)):
        timed = i >= case.warmup
        hidden.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _reset_peak_rss()
        t0 = time.perf_counter()
        loss = fn(hidden, weight, labels, behavior, cu, case.variant, case.chunk_size)
        if loss.requires_grad:
            loss.backward()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        loss_val = float(loss.detach())
        del loss
        if timed:
            times.append(dt)
            best = min(best, dt)
            peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss()
            extra = max(extra, peak - base - grad_bytes)
    return CaseResult(
        case, best, max(extra, 0), input_bytes, grad_bytes, loss_val, times, prime_seconds
    )


@contextmanager
def _child_env(case: Case):
    """Environment the spawned child starts with (glibc reads its malloc settings at exec)."""
    env = {"MALLOC_MMAP_THRESHOLD_": _MMAP_THRESHOLD, "MALLOC_TRIM_THRESHOLD_": _MMAP_THRESHOLD}
    if case.loss == "liger" and case.device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _spawn(target, args, case: Case, timeout: float):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    with _child_env(case):
        proc.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                status, payload = queue.get(timeout=2.0)
                break
            except Exception:  # queue.Empty: still running, or dead without a word
                if not proc.is_alive() or time.monotonic() > deadline:
                    proc.join(timeout=5)
                    if proc.is_alive():
                        proc.kill()
                    raise RuntimeError(
                        f"case {case} gave no result (exit code {proc.exitcode}; -9 is usually the "
                        f"kernel's out-of-memory killer; a timeout after {timeout:.0f} s also lands here)"
                    ) from None
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    return status, payload


def _child(case_dict, queue):
    try:
        queue.put(("ok", run_case(Case(**case_dict)).to_dict()))
    except PeerUnavailable as e:
        queue.put(("unavailable", str(e)))
    except Exception as e:  # reported to the parent, which raises
        queue.put(("error", f"{type(e).__name__}: {e}"))


def measure_in_child(case: Case, timeout: float = 1800.0) -> Dict:
    """run_case in a fresh spawned process; returns CaseResult.to_dict().

    A loss that cannot run here (PeerUnavailable) gives {"status": "unavailable", "reason": ...}
    with the case's fields; any other failure raises.
    """
    status, payload = _spawn(_child, (asdict(case),), case, timeout)
    if status == "unavailable":
        d = asdict(case)
        d.update(status="unavailable", reason=payload)
        return d
    if status != "ok":
        raise RuntimeError(f"case {case} failed in the child process: {payload}")
    return payload


def measure_interleaved(cases, rounds: int = 2, timeout: float = 3000.0) -> List[Dict]:
    """Each case ``rounds`` times, round-robin (one repeat per child), best time per case.

    On a machine shared with other jobs the load drifts over minutes; cases measured one after
    the other then see different loads, and their ratio says more about the load than about the
    code. Alternating them spreads the drift over all cases; the minimum over rounds is kept.
    Memory is the largest extra seen; "times" lists every round's time.
    """
    results: List[Optional[Dict]] = [None] * len(cases)
    for _ in range(max(1, rounds)):
        for i, case in enumerate(cases):
            one = Case(**{**asdict(case), "repeats": 1})
            r = measure_in_child(one, timeout=timeout)
            if r.get("status") != "ok":
                results[i] = r
                continue
            prev = results[i]
            if prev is None or prev.get("status") != "ok":
                results[i] = r
                continue
            prev["times"] = prev["times"] + r["times"]
            prev["seconds"] = min(prev["seconds"], r["seconds"])
            prev["extra_bytes"] = max(prev["extra_bytes"], r["extra_bytes"])
    for r, case in zip(results, cases):
        if r is not None and r.get("status") == "ok":
            r["repeats"] = len(r["times"])
            r["interleaved"] = True
    return results


# ---------------------------------------------------------------------------------------------
# Correctness cross-check of every entry against the float64 oracle


def crosscheck(case: Case, names) -> Dict[str, Dict]:
    """Loss and gradients of each named loss against reference_pear_loss in float64.

    Returns name -> {"loss_err", "dh_err", "dw_err"} (max abs error over max abs value) or
    {"status": "unavailable", "reason"}. Run it at small shapes.
    """
    from pear_kernels import reference_pear_loss

    hidden, weight, labels, behavior, cu = make_inputs(case)
    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    ref = reference_pear_loss(h64, w64, labels, behavior, cu_seqlens=cu, variant=case.variant)
    ref.backward()

    def rel(a, b):
        return float((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30))

    out: Dict[str, Dict] = {}
    for name in names:
        hidden.grad = weight.grad = None
        try:
            loss = LOSSES[name](hidden, weight, labels, behavior, cu, case.variant, case.chunk_size)
        except PeerUnavailable as e:
            out[name] = {"status": "unavailable", "reason": str(e)}
            continue
        if loss.requires_grad:
            loss.backward()
        if name.startswith("floor"):
            out[name] = {"status": "ok", "note": "matmuls only, not a loss"}
            continue
        if hidden.grad is None:  # forward only: the loss value is checked
            out[name] = {"status": "ok", "loss_err": rel(loss.detach(), ref.detach())}
            continue
        out[name] = {
            "status": "ok",
            "loss_err": rel(loss.detach(), ref.detach()),
            "dh_err": rel(hidden.grad, h64.grad),
            "dw_err": rel(weight.grad, w64.grad),
        }
    return out


def _crosscheck_child(case_dict, names, queue):
    try:
        queue.put(("ok", crosscheck(Case(**case_dict), names)))
    except Exception as e:
        queue.put(("error", f"{type(e).__name__}: {e}"))


def crosscheck_in_child(case: Case, names, timeout: float = 900.0) -> Dict[str, Dict]:
    """crosscheck in a fresh process with TRITON_INTERPRET=1 (for Liger on CPU)."""
    probe = Case(**{**asdict(case), "loss": "liger"})
    status, payload = _spawn(_crosscheck_child, (asdict(case), list(names)), probe, timeout)
    if status != "ok":
        raise RuntimeError(f"crosscheck of {case} failed in the child process: {payload}")
    return payload


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    print(json.dumps(run_case(Case(**json.loads(sys.argv[1]))).to_dict()))
