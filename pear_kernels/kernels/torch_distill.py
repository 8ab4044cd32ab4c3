"""Chunked kernels of PEAR-weighted distillation from stored teacher top-k log-probs.

Per supervised token t: the teacher stored its K most likely ids v_1..v_K with log-probs
log q_k (of the distribution it sampled from); the student has tempered logits z and
p = softmax(z), s = log p. The token loss is

    L_t = (1 - lam) KL_t + lam (-s_y)                      lam = hard_weight, y the sampled token

with the forward KL from the teacher's top-k distribution to the student. The teacher mass
outside the top-k is treated one of two ways (``tail``):

    "renormalize":  q~_k = q_k / Q, Q = sum_j q_j
        KL = sum_k q~_k (log q~_k - s_{v_k})
        dKL/dz_u = p_u - scatter(q~)_u                                   (sum q~ = 1)
    "bucket":  the rest of the mass is one outcome: r = 1 - Q against the student's
        rest 1 - P, P = sum_k p_{v_k}
        KL = sum_k q_k (log q_k - s_{v_k}) + r (log r - log(1 - P))
        dKL/dz_u = Q p_u - scatter(q)_u + r p_u ([u in top-k] - P) / (1 - P)

(ds_k/dz_u = [u = v_k] - p_u and dP/dz_u = p_u ([u in top-k] - P) give both lines.) The hard
term adds lam (p_u - [u = y]). Every token's gradient therefore has the same shape,

    dL_t/dz_u = a_t p_u + sum_k b_tk [u = v_k] - c_t [u = y]                              (*)

a dense softmax times a per-row factor a_t plus K + 1 sparse corrections:

    renormalize: a = (1 - lam) + lam,              b_k = -(1 - lam) q~_k
    bucket:      a = (1 - lam)(Q - rr P) + lam,   b_k = (1 - lam)(-q_k + rr p_{v_k}),  rr = r / (1 - P)
    both:        c = lam

Each token is weighted by its PEAR weight w_t (from the sampled token's log-ratio, exactly as
the SFT loss: ``weights.scan_chunk``, detached): loss = sum_t w_t L_t / normaliser, and the
per-token factor w_t * grad_scale / temperature multiplies a, b and c before dlogits is
reduced into dW. So the token and block variants keep the SFT loss's single walk from each
sequence's end with 3 matmuls per chunk (logits, dh, dW); the sequence variant first takes
the log-prob pre-pass (4 matmuls). Teacher entries with log q = -inf carry no mass
(0 log 0 = 0).

The row work per chunk goes through a strategy object with two methods (``stats_`` and
``dlogits_``): ``TorchDistillRows`` here, ``NativeDistillRows`` (the C++ softmax passes of
csrc/, fewer memory passes) and ``triton_distill.TritonDistillRows`` (GPU, or CPU under the
Triton interpreter). The chunk loop, the K-sized per-token math (KL, a, b, c, in float64) and
the weight scan are shared by all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..config import Variant
from ..importance import clip_log_weights, scan_chunk
from .backend import ForwardResult, Grads, PEARProblem, chunks_from_end
from .backend import work_dtype as _work_dtype
from .chunk_driver import GradSink
from .chunk_driver import token_rows as _token_rows
from .torch_chunked import LogitsBuffer as _LogitsBuffer

__all__ = [
    "DistillTargets",
    "TorchDistillRows",
    "NativeDistillRows",
    "token_terms",
    "forward",
    "backward",
    "token_logprobs",
]

# 1 - P (the student's mass outside the teacher's top-k) is floored here in the "bucket" tail,
# so that log(1 - P) and r / (1 - P) stay finite when the student puts (almost) all its mass
# on the top-k. In float32 logits 1 - P is only known to ~1e-7 anyway (P is a sum of
# probabilities each rounded at 2^-24 relative); below the floor the loss is a lower bound.
MIN_REST = 1e-12


@dataclass
class DistillTargets:
    ids: torch.Tensor  # (M, K) int64, compact (supervised tokens only)
    logq: torch.Tensor  # (M, K) float64 teacher log-probs, -inf allowed
    tail: str  # "renormalize" or "bucket"
    hard_weight: float


def _floor_logprob(s: torch.Tensor) -> torch.Tensor:
    # a student logit of -inf (a -inf bias masking a column) gives s = -inf: keep it at the
    # dtype's lowest finite value, so that q * s is finite (and 0 where q = 0, not NaN)
    return s.clamp(min=torch.finfo(s.dtype).min)


class TorchDistillRows:
    """Row math in PyTorch ops: gather, then max, exp, sum (one buffer, in place).

    A row-math class also says how a chunk's logits are made (``buffer``), where its dlogits
    go (``sink``) and how many tokens a chunk holds (``rows``): the chunked path's one reused
    fp32 buffer and gradient accumulators here; the Triton rows on CUDA take the SFT Triton
    path's 16-bit tensor-core GEMMs with fp32 results instead."""

    name = "torch"

    @staticmethod
    def buffer(problem: PEARProblem) -> _LogitsBuffer:
        return _LogitsBuffer(problem)

    @staticmethod
    def sink(problem: PEARProblem, need, buffer: _LogitsBuffer, post_scale: float = 1.0):
        return GradSink(problem, need, buffer.weight, post_scale=post_scale)

    @staticmethod
    def post_scale(problem: PEARProblem, grad_scale: float) -> float:
        """The part of ``grad_scale`` applied after the gradient GEMMs instead of inside the
        dlogits (see chunk_driver.ChunkKernels.post_scale): none here, the dlogits stay fp32."""
        return 1.0

    @staticmethod
    def rows(problem: PEARProblem) -> int:
        return problem.rows()

    @staticmethod
    def stats_(z: torch.Tensor, y: torch.Tensor, ids: torch.Tensor):
        """z (rows, V) tempered logits, overwritten with exp(z - rowmax).

        Returns (s_y (rows,), s_top (rows, K), aux): the student's log-probs of the sampled
        token and of the teacher's ids, and what ``dlogits_`` needs (here the row sums).
        """
        z_top = z.gather(1, ids)
        z_y = z.gather(1, y[:, None]).squeeze(1)
        m = z.amax(dim=1)
        z.sub_(m[:, None]).exp_()
        tot = z.sum(dim=1)
        lse = m + torch.log(tot)
        return _floor_logprob(z_y - lse), _floor_logprob(z_top - lse[:, None]), tot

    @staticmethod
    def dlogits_(z, aux, y, ids, a, b, c):
        """In place, (*) of the module docstring: z <- a p + scatter(ids, b) - c onehot(y)."""
        z.mul_((a / aux)[:, None])
        z.scatter_add_(1, ids, b)
        if c is not None:
            z.scatter_add_(1, y[:, None], -c[:, None])
        return z


class NativeDistillRows(TorchDistillRows):
    """The C++ softmax passes of csrc/ (the SFT loss's): max and exp-sum in two memory passes
    instead of four, the dense a p_u in one; the K + 1 sparse corrections stay in PyTorch.

    The extension returns log p of one column per row and the row sums of exp(z - max), not
    the max itself; log-sum-exp is recovered as z_j - log p_j from a column j whose logit is
    finite (the sampled token, else a teacher id); rows with none take torch's logsumexp
    before the pass."""

    name = "native"

    @staticmethod
    def stats_(z, y, ids):
        from . import native_cpu

        z_top = z.gather(1, ids)
        z_y = z.gather(1, y[:, None]).squeeze(1)
        cand = torch.cat([z_y[:, None], z_top], dim=1)
        finite = cand > float("-inf")
        pick = finite.to(torch.uint8).argmax(dim=1)  # first finite candidate
        has = finite.any(dim=1)
        lse_fallback = None
        if not bool(has.all()):
            lse_fallback = torch.logsumexp(z[~has], dim=1)
        ref_id = torch.cat([y[:, None], ids], dim=1).gather(1, pick[:, None]).squeeze(1)
        logp_ref, tot = native_cpu._native.softmax_stats_(z, ref_id)
        lse = cand.gather(1, pick[:, None]).squeeze(1) - logp_ref
        if lse_fallback is not None:
            lse[~has] = lse_fallback
        return _floor_logprob(z_y - lse), _floor_logprob(z_top - lse[:, None]), tot

    @staticmethod
    def dlogits_(z, aux, y, ids, a, b, c):
        from . import native_cpu

        # the extension writes a p_u - a [u = ref]; giving it the sampled token as ref and
        # adding back a - c there leaves a p_u - c [u = y]
        native_cpu._native.dlogits_(z, aux.contiguous(), y, a.contiguous())
        corr = a if c is None else a - c
        z.scatter_add_(1, y[:, None], corr[:, None])
        z.scatter_add_(1, ids, b)
        return z


def token_terms(targets: DistillTargets, start: int, end: int, s_y: torch.Tensor, s_top: torch.Tensor):
    """Per-token loss L_t (float64) and the gradient factors (a, b) of (*) before the weight
    and the hard term, for compact tokens [start, end) (K-sized math, float64)."""
    logq = targets.logq[start:end]
    q = torch.exp(logq)  # -inf -> 0
    qlogq = torch.where(q > 0, q * logq, torch.zeros_like(q))
    st = s_top.to(torch.float64)
    Q = q.sum(dim=1)
    if targets.tail == "renormalize":
        qn = q / Q[:, None]
        # sum_k q~ log q~ = (sum_k q log q) / Q - log Q
        kl = qlogq.sum(dim=1) / Q - torch.log(Q) - (qn * st).sum(dim=1)
        a_kl = torch.ones_like(Q)
        b_kl = -qn
    else:
        r = (1.0 - Q).clamp(min=0.0)
        p_top = torch.exp(st)
        P = p_top.sum(dim=1).clamp(max=1.0)
        rest = (1.0 - P).clamp(min=MIN_REST)
        r_log_r = torch.where(r > 0, r * torch.log(r.clamp(min=1e-300)), torch.zeros_like(r))
        kl = qlogq.sum(dim=1) + r_log_r - (q * st).sum(dim=1) - r * torch.log(rest)
        rr = r / rest
        a_kl = Q - rr * P
        b_kl = rr[:, None] * p_top - q
    lam = targets.hard_weight
    loss_t = (1.0 - lam) * kl + lam * (-s_y.to(torch.float64))
    return loss_t, a_kl, b_kl


def _coefficients(targets: DistillTargets, a_kl, b_kl, coef: torch.Tensor, dtype):
    """(a, b, c) of (*) times the per-token factor ``coef`` (w * grad_scale / T), in ``dtype``."""
    lam = targets.hard_weight
    a = coef * ((1.0 - lam) * a_kl + lam)
    b = (coef * (1.0 - lam))[:, None] * b_kl
    c = (coef * lam).to(dtype) if lam else None
    return a.to(dtype), b.to(dtype), c


class _Chunk:
    def __init__(self, problem: PEARProblem, targets: DistillTargets, buffer: _LogitsBuffer, rows_math,
                 start: int, end: int):
        layout = problem.layout
        self.token_rows = _token_rows(problem, start, end)
        self.h = problem.hidden[self.token_rows]
        self.y = problem.labels[layout.sup_index[start:end]]
        self.ids = targets.ids[start:end]
        self.z = buffer.logits(self.h)
        self.s_y, s_top, self.aux = rows_math.stats_(self.z, self.y, self.ids)
        self.loss_t, self.a_kl, self.b_kl = token_terms(targets, start, end, self.s_y, s_top)

    def dlogits(self, rows_math, targets, coef: torch.Tensor) -> torch.Tensor:
        a, b, c = _coefficients(targets, self.a_kl, self.b_kl, coef, self.z.dtype)
        return rows_math.dlogits_(self.z, self.aux, self.y, self.ids, a, b, c)


def token_logprobs(problem: PEARProblem, rows_math, targets: DistillTargets, buffer) -> torch.Tensor:
    """(M,) log p_student of the sampled tokens (the sequence variant's pre-pass)."""
    m = problem.layout.num_supervised
    out = torch.empty(m, dtype=_work_dtype(problem.hidden.dtype), device=problem.hidden.device)
    for start, end in chunks_from_end(m, rows_math.rows(problem)):
        h = problem.hidden[_token_rows(problem, start, end)]
        y = problem.labels[problem.layout.sup_index[start:end]]
        out[start:end] = rows_math.stats_(buffer.logits(h), y, targets.ids[start:end])[0]
    return out


def forward(problem: PEARProblem, targets: DistillTargets, rows_math=TorchDistillRows,
            grad_scale: Optional[float] = None,
            need: Tuple[bool, bool, bool] = (False, False, False)) -> ForwardResult:
    """Log-probs of the sampled tokens, PEAR weights, the weighted loss sum (``token_ce`` holds
    the per-token distillation loss L_t) and, with grad_scale, the gradients."""
    layout, config = problem.layout, problem.config
    m = layout.num_supervised
    device = problem.hidden.device
    rows = rows_math.rows(problem)
    behavior = problem.behavior_logprobs[layout.sup_index].to(torch.float64)
    want = grad_scale is not None and any(need)
    buffer = rows_math.buffer(problem)
    post = rows_math.post_scale(problem, grad_scale) if want else 1.0
    sink = rows_math.sink(problem, need, buffer, post) if want else None
    logp_all = torch.empty(m, dtype=_work_dtype(problem.hidden.dtype), device=device)
    loss_tok = torch.empty(m, dtype=torch.float64, device=device)
    d = torch.empty(m, dtype=torch.float64, device=device)
    incl = torch.empty(m, dtype=torch.float64, device=device)
    log_w_raw = torch.empty(m, dtype=torch.float64, device=device)
    # the sequence weight needs every log-prob of the sequence before any of its gradients
    weights_known = config.variant is Variant.SEQUENCE and m > rows
    if weights_known:
        logp_all = token_logprobs(problem, rows_math, targets, buffer)
        log_w_raw = scan_chunk(logp_all.to(torch.float64) - behavior, d, incl, layout, config, 0, m)
    for start, end in chunks_from_end(m, rows):
        ch = _Chunk(problem, targets, buffer, rows_math, start, end)
        loss_tok[start:end] = ch.loss_t
        if not weights_known:
            logp_all[start:end] = ch.s_y
            log_w_raw[start:end] = scan_chunk(
                ch.s_y.to(torch.float64) - behavior[start:end], d, incl, layout, config, start, end
            )
        if sink is not None:
            w = clip_log_weights(log_w_raw[start:end], config).exp()
            sink.add(ch.dlogits(rows_math, targets, w * (grad_scale / post / problem.temperature)), ch.h,
                     ch.token_rows)
    log_w = clip_log_weights(log_w_raw, config)
    return ForwardResult(
        logp=logp_all, log_ratio=logp_all.to(torch.float64) - behavior, log_w_raw=log_w_raw, log_w=log_w,
        loss_sum=(log_w.exp() * loss_tok).sum(), grads=sink.result() if sink else None, token_ce=loss_tok,
    )


def backward(problem: PEARProblem, targets: DistillTargets, coef: torch.Tensor, need,
             rows_math=TorchDistillRows) -> Grads:
    """Recompute pass for per-token factors coef (M,) = w * grad_output (reduction "none")."""
    buffer = rows_math.buffer(problem)
    sink = rows_math.sink(problem, need, buffer)
    for start, end in chunks_from_end(problem.layout.num_supervised, rows_math.rows(problem)):
        ch = _Chunk(problem, targets, buffer, rows_math, start, end)
        sink.add(ch.dlogits(rows_math, targets, coef[start:end] / problem.temperature), ch.h, ch.token_rows)
    return sink.result()
