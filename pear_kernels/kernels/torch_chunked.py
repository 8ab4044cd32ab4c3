"""Chunked PyTorch PEAR kernels: the CPU path (and a portable fallback on any device).

The passes are ``chunk_driver``'s; this module brings their PyTorch row math
(``TorchKernels``): the logits of a chunk in one reused fp32 buffer, the softmax statistics
and the weighted softmax-minus-one-hot in place on it, the PEAR scan of ``importance``.

Gradient (per supervised token t, logits z = (h W^T + b) / temperature, p = softmax(z)):

    loss        = sum_t c_t * -log p_t[y_t]           c_t = w_t * grad_scale (w detached)
    dloss/dz_t  = c_t * (p_t - onehot(y_t))
    dloss/dlogit_raw = dloss/dz / temperature
    dh_t = dlogits_t @ W,   dW = sum_t dlogits_t^T h_t,   db = sum_t dlogits_t

Row work per chunk, in place on one buffer L (float32, float64 for float64 inputs):
    tgt = L[y];  m = max L;  L = exp(L - m);  s = sum L;  logp = tgt - m - log s
    L *= coef / s;  L[y] -= coef                   -> L is now dlogits

The row primitives are a small strategy object (``_row_math``): ``LocalRows`` below for one
process, ``OptionRows`` with the loss options, the C++ passes of ``native_cpu``, or
``vocab_parallel.VocabParallel`` when the vocabulary is split across ranks (it combines m, s
and tgt across the group and sums the partial dh).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..importance import clip_log_weights, scan_chunk
from . import chunk_driver
from .backend import ForwardResult, Grads, LossOptions, PEARProblem, work_dtype
from .chunk_driver import ChunkStats, GradSink

__all__ = ["forward", "backward", "token_logprobs", "backward_with_entropy", "TorchKernels", "LogitsBuffer"]


class LogitsBuffer:
    """One (rows, V) working buffer reused by every chunk of a pass.

    Allocating per chunk would keep two buffers alive at the hand-over (the old chunk's array
    is freed only after the new one exists), doubling the peak; reuse also spares the
    allocator a large malloc/free per chunk.

    16-bit inputs: the logits must reach the softmax in fp32, not rounded to the input dtype
    (a bf16 logit of magnitude 20 is off by up to 0.06, which moves every log-prob). CPU BLAS
    has no 16-bit-in / fp32-out matmul, so the weight is upcast once per pass (``weight``,
    also used for dh) and the chunk's hidden rows once per chunk; the matmuls then run in fp32
    straight into the fp32 buffer. The fp32 weight copy costs 2 bytes per parameter (4 for
    fp16/bf16 -> fp32 minus the 2 of the original) for the duration of the call.
    """

    def __init__(self, problem: PEARProblem):
        self.problem = problem
        self.work = work_dtype(problem.hidden.dtype)
        w = problem.weight
        self.weight = w if w.dtype == self.work else w.to(self.work)
        b = problem.bias
        self.bias = b if b is None or b.dtype == self.work else b.to(self.work)
        self.buf: Optional[torch.Tensor] = None

    def logits(self, h_c: torch.Tensor) -> torch.Tensor:
        """(rows, V) logits of a chunk in the working dtype, divided by the temperature."""
        w, b = self.weight, self.bias
        c = h_c.shape[0]
        if self.buf is None or self.buf.shape[0] < c:
            self.buf = torch.empty(c, w.shape[0], dtype=self.work, device=w.device)
        out = self.buf[:c]
        h_work = h_c if h_c.dtype == self.work else h_c.to(self.work)
        if b is not None:
            torch.addmm(b, h_work, w.t(), out=out)
        else:
            torch.mm(h_work, w.t(), out=out)
        if self.problem.temperature != 1.0:
            out.mul_(1.0 / self.problem.temperature)
        return out


def _softmax_stats_(logits: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """In place: logits <- exp(logits - rowmax). Returns (logp of y, row sum of exp)."""
    tgt = logits.gather(1, y[:, None]).squeeze(1)
    m = logits.amax(dim=1, keepdim=True)
    logits.sub_(m).exp_()
    s = logits.sum(dim=1)
    logp = tgt - m.squeeze(1) - torch.log(s)
    return logp, s


def _dlogits_(expz: torch.Tensor, s: torch.Tensor, y: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """In place: exp(z - m) -> coef * (softmax - onehot). coef already holds 1/temperature."""
    expz.mul_((coef / s)[:, None])
    expz.scatter_add_(1, y[:, None], -coef[:, None].to(expz.dtype))
    return expz


def _logp_entropy_(z: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logp of y, entropy) per row; z is overwritten.

    The shifted logits z - m are kept for the entropy: H = log s - sum_v p_v (z_v - m).
    """
    m_row = z.amax(dim=1, keepdim=True)
    tgt = z.gather(1, y[:, None]).squeeze(1) - m_row.squeeze(1)
    z.sub_(m_row)
    # -inf logits (a -inf bias masking padded vocabulary): p = 0 there, and 0 * -inf would be
    # NaN in sum p z; the most negative finite value gives the same exp (0) and a 0 product.
    # NaN stays NaN (clamp propagates it), so a poisoned row is not hidden.
    z.clamp_(min=torch.finfo(z.dtype).min)
    p = torch.exp(z)
    s = p.sum(dim=1)
    log_s = torch.log(s)
    p_dot_z = p.mul_(z).sum(dim=1)  # in place: no third (rows x V) array
    return tgt - log_s, log_s - p_dot_z / s


class LocalRows:
    """Row math of one process holding the whole vocabulary (the default strategy)."""

    scan = staticmethod(scan_chunk)
    softmax_stats_ = staticmethod(_softmax_stats_)
    dlogits_ = staticmethod(_dlogits_)
    logp_entropy_ = staticmethod(_logp_entropy_)

    @staticmethod
    def reduce_grad_hidden(dh: torch.Tensor) -> torch.Tensor:
        return dh


class OptionRows(LocalRows):
    """Row math with the loss options (softcap, z-loss, label smoothing) and the per-token
    logsumexp. One instance per pass: it keeps the chunk's lse, mean logit and softcap
    derivative between softmax_stats_ and dlogits_ext_.

    Gradients, per token with upstream factors coef (= w * dL/dloss_t, the PEAR-weighted part)
    and ucoef (= dL/dloss_t, unweighted: the z-loss), z the capped and tempered logits:

        token_ce = (1 - eps) (-log p_y) + eps (lse - mean_v z_v)
            d/dz = p - (1 - eps) onehot(y) - eps / V
        z_loss   = s_z lse^2                     d/dz = 2 s_z lse p
        softcap  z = c tanh(r / c) / T,  r = h W^T + b:   dz/dr = (1 - tanh^2(r / c)) / T
    """

    def __init__(self, options: LossOptions, temperature: float):
        self.o = options
        self.temperature = temperature
        self._dcap_buf: Optional[torch.Tensor] = None
        self.dcap: Optional[torch.Tensor] = None
        self.lse: Optional[torch.Tensor] = None
        self.zmean: Optional[torch.Tensor] = None

    def _cap_(self, z: torch.Tensor) -> torch.Tensor:
        """In place: z (= r / T) -> c tanh(r / c) / T; keeps 1 - tanh^2 for the gradient."""
        c = self.o.softcap
        if c is None:
            self.dcap = None
            return z
        x = z.mul_(self.temperature / c)
        if self._dcap_buf is None or self._dcap_buf.shape[0] < z.shape[0] or self._dcap_buf.shape[1] != z.shape[1]:
            self._dcap_buf = torch.empty_like(z)
        d = self._dcap_buf[: z.shape[0]]
        # 1 - tanh^2 = 1 / cosh^2: relatively accurate where tanh saturates (1 - t^2 of a
        # rounded float t is 0 from |x| ~ 9 on); cosh^2 overflowing to inf gives 0 (< 1e-38)
        torch.cosh(x, out=d)
        d.square_().reciprocal_()
        self.dcap = d
        return x.tanh_().mul_(c / self.temperature)

    def softmax_stats_(self, z: torch.Tensor, y: torch.Tensor):
        z = self._cap_(z)
        self.zmean = z.mean(dim=1) if self.o.label_smoothing else None
        tgt = z.gather(1, y[:, None]).squeeze(1)
        m = z.amax(dim=1, keepdim=True)
        z.sub_(m).exp_()
        s = z.sum(dim=1)
        self.lse = m.squeeze(1) + torch.log(s)
        return tgt - self.lse, s

    def logp_entropy_(self, z: torch.Tensor, y: torch.Tensor):
        return _logp_entropy_(self._cap_(z), y)

    def dlogits_ext_(self, expz, s, y, coef, ucoef):
        """In place: exp(z - m) -> dloss/dr for weighted factors coef and unweighted ucoef
        (both already divided by the temperature)."""
        eps = self.o.label_smoothing
        factor = coef
        if self.o.lse_square_scale:
            factor = coef + ucoef * (2.0 * self.o.lse_square_scale) * self.lse.to(coef.dtype)
        expz.mul_((factor / s)[:, None])
        expz.scatter_add_(1, y[:, None], -(coef * (1.0 - eps))[:, None].to(expz.dtype))
        if eps:
            expz.sub_((coef * (eps / expz.shape[1]))[:, None])
        if self.dcap is not None:
            expz.mul_(self.dcap)
        return expz


def _row_math(problem: PEARProblem):
    if problem.vocab_parallel is not None:
        return problem.vocab_parallel
    if problem.options.active or problem.want_lse:
        # a backend may bring its own OptionRows subclass (native_cpu: the C++ row passes)
        rm = problem.row_math
        cls = rm if isinstance(rm, type) and issubclass(rm, OptionRows) else OptionRows
        return cls(problem.options, problem.temperature)
    return problem.row_math if problem.row_math is not None else LocalRows


class TorchKernels:
    """``chunk_driver.ChunkKernels`` with PyTorch (or native, or vocabulary-parallel) row math."""

    def __init__(self, problem: PEARProblem):
        self.problem = problem
        self.buffer = LogitsBuffer(problem)
        self.rows_math = _row_math(problem)
        self.extras = isinstance(self.rows_math, OptionRows)
        self.work_dtype = self.buffer.work

    def logits(self, h_c: torch.Tensor) -> torch.Tensor:
        return self.buffer.logits(h_c)

    def stats(self, z: torch.Tensor, y: torch.Tensor) -> ChunkStats:
        logp, s = self.rows_math.softmax_stats_(z, y)
        if self.extras:
            return ChunkStats(logp, self.rows_math.lse, self.rows_math.zmean, s)
        return ChunkStats(logp, None, None, s)

    def logp_entropy(self, z: torch.Tensor, y: torch.Tensor):
        return self.rows_math.logp_entropy_(z, y)

    def weights(self, logp, behavior, d, incl, log_w_raw, start, end, coef_scale):
        p = self.problem
        log_ratio = logp.to(torch.float64) - behavior[start:end]
        log_w_raw[start:end] = self.rows_math.scan(log_ratio, d, incl, p.layout, p.config, start, end)
        if coef_scale is None:
            return None
        return clip_log_weights(log_w_raw[start:end], p.config).exp() * coef_scale

    def dlogits_(self, z, y, st: ChunkStats, coef, ucoef):
        t = self.problem.temperature
        c = (coef / t).to(z.dtype)
        if self.extras:
            u = (ucoef / t).to(z.dtype) if ucoef is not None else torch.zeros_like(c)
            return self.rows_math.dlogits_ext_(z, st.state, y, c, u)
        return self.rows_math.dlogits_(z, st.state, y, c)

    def sink(self, need, post_scale: float) -> GradSink:
        return GradSink(self.problem, need, self.buffer.weight, post_scale=post_scale,
                        reduce_dh=self.rows_math.reduce_grad_hidden)

    @staticmethod
    def post_scale(grad_scale: float) -> float:
        return 1.0


def token_logprobs(problem: PEARProblem, with_entropy: bool = False):
    """(M,) log pi_theta of every supervised label, one chunk of logits at a time.

    With ``with_entropy`` also returns the (M,) entropy of each token's distribution,
    H = logsumexp(z) - sum_v p_v z_v (of the temperature-scaled logits z).
    """
    return chunk_driver.token_logprobs(problem, TorchKernels(problem), with_entropy)


def forward(problem: PEARProblem, grad_scale: Optional[float] = None,
            need: Tuple[bool, bool, bool] = (False, False, False)) -> ForwardResult:
    """Log-probs, weights and the weighted loss sum; with grad_scale, the gradients too."""
    return chunk_driver.forward(problem, TorchKernels(problem), grad_scale, need)


def backward(problem: PEARProblem, coef: torch.Tensor, need: Tuple[bool, bool, bool],
             ucoef: Optional[torch.Tensor] = None) -> Grads:
    """Recompute pass: gradients for per-token factors ``coef`` (M,) of w * grad_output
    (and, with loss options, ``ucoef`` (M,) = grad_output for the unweighted z-loss)."""
    return chunk_driver.backward(problem, TorchKernels(problem), coef, need, ucoef)


class _EntropyGradKernels(TorchKernels):
    """Row math of the gradient through both the log-probs and the entropies.

    With z the (capped) tempered logits, p = softmax(z), H = lse(z) - sum_v p_v z_v:

        d logp_y / dz_v = onehot_v(y) - p_v
        d H / dz_v      = -p_v (z_v - E_p[z])        (shift invariant: z - m serves)

    ``coef`` = -dL/dlogp (the factor of p - onehot, as in ``backward``), the second factor
    ``ucoef`` = dL/dH.
    """

    def __init__(self, problem: PEARProblem):
        super().__init__(problem)
        self.cap = OptionRows(problem.options, problem.temperature) if problem.options.softcap is not None else None

    def stats(self, z, y) -> ChunkStats:
        if self.cap is not None:
            z = self.cap._cap_(z)
        z.sub_(z.amax(dim=1, keepdim=True))
        z.clamp_(min=torch.finfo(z.dtype).min)  # -inf logits: p = 0, and 0 * finite = 0
        e = torch.exp(z)
        s = e.sum(dim=1)
        ez = (e * z).sum(dim=1) / s
        return ChunkStats(None, None, None, (e, s, ez))

    def dlogits_(self, z, y, st: ChunkStats, coef, ucoef):
        e, s, ez = st.state
        t = self.problem.temperature
        c = (coef / t).to(z.dtype)
        hc = (ucoef / t).to(z.dtype)
        # z <- c p - hc p (z - E z) - c onehot. e multiplies (z - E z) first: where e = 0 (a
        # -inf logit clamped to the most negative float) the product is 0 before any scaling
        # could overflow it to inf (inf * 0 would be NaN)
        z.sub_(ez[:, None]).mul_(e).mul_(-hc[:, None]).add_(e.mul_(c[:, None])).div_(s[:, None])
        z.scatter_add_(1, y[:, None], -c[:, None])
        if self.cap is not None:
            z.mul_(self.cap.dcap)
        return z


def backward_with_entropy(problem: PEARProblem, coef: torch.Tensor, ent_coef: torch.Tensor,
                          need: Tuple[bool, bool, bool]) -> Grads:
    """Recompute pass for upstream gradients of both the log-probs (``coef`` = -dL/dlogp) and
    the entropies (``ent_coef`` = dL/dH); see ``_EntropyGradKernels``."""
    if problem.vocab_parallel is not None:
        raise ValueError("the entropy gradient is not implemented with vocab_parallel_group")
    return chunk_driver.backward(problem, _EntropyGradKernels(problem), coef, need, ent_coef)
