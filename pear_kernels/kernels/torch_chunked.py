"""Chunked PyTorch PEAR kernels: the CPU path (and a portable fallback on any device).

Never a (tokens x vocab) tensor: the supervised tokens are cut into chunks of ``rows`` tokens
and only one (rows x V) logits buffer lives at a time.

Gradient (per supervised token t, logits z = (h W^T + b) / temperature, p = softmax(z)):

    loss        = sum_t c_t * -log p_t[y_t]           c_t = w_t * grad_scale (w detached)
    dloss/dz_t  = c_t * (p_t - onehot(y_t))
    dloss/dlogit_raw = dloss/dz / temperature
    dh_t = dlogits_t @ W,   dW = sum_t dlogits_t^T h_t,   db = sum_t dlogits_t

The weight w_t must be known before dlogits_t is reduced into dW. For the token and block
variants it depends only on later tokens, so chunks are visited from the end of the batch
(every sequence from its end) and the suffix sums carry across chunk boundaries: one pass,
3 matmuls per chunk (logits, dh, dW). The sequence variant needs all log-probs of a sequence
first: a log-prob pre-pass (1 matmul), then the same gradient pass, unless one chunk holds
everything.

Row work per chunk, in place on one buffer L (float32, float64 for float64 inputs):
    tgt = L[y];  m = max L;  L = exp(L - m);  s = sum L;  logp = tgt - m - log s
    L *= coef / s;  L[y] -= coef                   -> L is now dlogits

The row work goes through a small strategy object (``_row_math``): ``LocalRows`` below for one
process, or ``vocab_parallel.VocabParallel`` when the vocabulary is split across ranks (it
combines m, s and tgt across the group and sums the partial dh). The chunk loops are shared.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..config import Variant
from ..weights import clip_log_weights, scan_chunk
from .problem import ForwardResult, Grads, LossOptions, PEARProblem, chunks_from_end

__all__ = ["forward", "backward", "token_logprobs", "backward_with_entropy"]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _token_rows(problem: PEARProblem, start: int, end: int):
    """Flat positions of compact tokens [start, end): a slice when contiguous, else an index."""
    idx = problem.layout.sup_index[start:end]
    first, last = int(idx[0]), int(idx[-1])
    if last - first == end - start - 1:
        return slice(first, last + 1)
    return idx


class _LogitsBuffer:
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
        self.work = _work_dtype(problem.hidden.dtype)
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

    def token_terms(self, logp: torch.Tensor):
        """(token_ce, z_loss) of the chunk just passed through softmax_stats_, float64."""
        eps = self.o.label_smoothing
        nll = -logp.to(torch.float64)
        lse = self.lse.to(torch.float64)
        ce = nll if not eps else (1.0 - eps) * nll + eps * (lse - self.zmean.to(torch.float64))
        zl = self.o.lse_square_scale * lse * lse if self.o.lse_square_scale else torch.zeros_like(lse)
        return ce, zl

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


class _GradSink:
    """Accumulates dh (scattered into token rows), dW and db from per-chunk dlogits."""

    def __init__(self, problem: PEARProblem, need: Tuple[bool, bool, bool], work_weight: torch.Tensor):
        h, w = problem.hidden, problem.weight
        self.work_weight = work_weight  # the weight in the working dtype (fp32 for 16-bit)
        work = _work_dtype(h.dtype)
        self.need = need
        self.problem = problem
        # 16-bit inputs: dh stays fp32 and is rounded once, after the upstream gradient (a
        # GradScaler's scale included) is applied; rounding w * grad_scale * dlogits @ W to
        # fp16 here would flush small gradients to zero before the scaler could lift them
        self.dh = torch.zeros(h.shape, dtype=work, device=h.device) if need[0] else None
        # dW is written, not zero-filled: the first chunk's matmul overwrites it (beta = 0) and
        # later chunks accumulate. Zero-filling a (V, H) buffer is a full pass over a
        # parameter-sized tensor: ~3% of the loss at H=896, V=151936 (profiled).
        self.dw = torch.empty(w.shape, dtype=work, device=w.device) if need[1] else None
        self._dw_written = False
        self.db = (
            torch.zeros(w.shape[0], dtype=work, device=w.device)
            if need[2] and problem.bias is not None
            else None
        )

    def add(self, dlogits: torch.Tensor, h_c: torch.Tensor, rows) -> None:
        w = self.work_weight
        if self.dh is not None:
            # fp32 dlogits @ fp32 weight, for 16-bit inputs too
            if isinstance(rows, slice):
                torch.mm(dlogits, w, out=self.dh[rows])
            else:
                self.dh.index_copy_(0, rows, torch.mm(dlogits, w))
        if self.dw is not None:
            h_work = h_c if h_c.dtype == self.dw.dtype else h_c.to(self.dw.dtype)
            if self._dw_written:
                self.dw.addmm_(dlogits.t(), h_work)
            else:
                torch.mm(dlogits.t(), h_work, out=self.dw)
                self._dw_written = True
        if self.db is not None:
            self.db += dlogits.sum(dim=0)

    def result(self) -> Grads:
        if self.dw is not None and not self._dw_written:  # no supervised token at all
            self.dw.zero_()
        dh = _row_math(self.problem).reduce_grad_hidden(self.dh) if self.dh is not None else None
        return Grads(dh, self.dw, self.db)


def token_logprobs(problem: PEARProblem, with_entropy: bool = False, buffer: Optional["_LogitsBuffer"] = None):
    """(M,) log pi_theta of every supervised label, one chunk of logits at a time.

    With ``with_entropy`` also returns the (M,) entropy of each token's distribution,
    H = logsumexp(z) - sum_v p_v z_v (of the temperature-scaled logits z).
    """
    layout = problem.layout
    m = layout.num_supervised
    work = _work_dtype(problem.hidden.dtype)
    out = torch.empty(m, dtype=work, device=problem.hidden.device)
    ent = torch.empty(m, dtype=work, device=problem.hidden.device) if with_entropy else None
    buffer = buffer if buffer is not None else _LogitsBuffer(problem)
    rows_math = _row_math(problem)
    for start, end in chunks_from_end(m, problem.rows()):
        h_c = problem.hidden[_token_rows(problem, start, end)]
        y = problem.labels[layout.sup_index[start:end]]
        z = buffer.logits(h_c)
        if ent is None:
            out[start:end], _ = rows_math.softmax_stats_(z, y)
        else:
            out[start:end], ent[start:end] = rows_math.logp_entropy_(z, y)
    return (out, ent) if with_entropy else out


def forward(
    problem: PEARProblem,
    grad_scale: Optional[float] = None,
    need: Tuple[bool, bool, bool] = (False, False, False),
) -> ForwardResult:
    """Log-probs, weights and the weighted loss sum; with grad_scale, the gradients too."""
    layout, config = problem.layout, problem.config
    m = layout.num_supervised
    device = problem.hidden.device
    rows = problem.rows()
    behavior = problem.behavior_logprobs[layout.sup_index].to(torch.float64)
    want_grads = grad_scale is not None and any(need)
    buffer = _LogitsBuffer(problem)
    sink = _GradSink(problem, need, buffer.weight) if want_grads else None

    logp_all = torch.empty(m, dtype=_work_dtype(problem.hidden.dtype), device=device)
    d = torch.empty(m, dtype=torch.float64, device=device)
    incl = torch.empty(m, dtype=torch.float64, device=device)
    log_w_raw = torch.empty(m, dtype=torch.float64, device=device)

    rows_math = _row_math(problem)
    extras = isinstance(rows_math, OptionRows)
    token_ce = torch.empty(m, dtype=torch.float64, device=device) if extras else None
    z_loss = torch.empty(m, dtype=torch.float64, device=device) if extras else None
    lse_all = torch.empty(m, dtype=torch.float64, device=device) if extras else None

    # The sequence weight needs every log-prob of a sequence before any of its gradients.
    prepass = config.variant is Variant.SEQUENCE and m > rows
    if prepass:
        logp_all = token_logprobs(problem, buffer=buffer)
        log_w_raw = scan_chunk(logp_all.to(torch.float64) - behavior, d, incl, layout, config, 0, m)
        if sink is None and not extras:
            return _finish(problem, logp_all, behavior, log_w_raw, None)

    weights_known = prepass
    for start, end in chunks_from_end(m, rows):
        token_rows = _token_rows(problem, start, end)
        h_c = problem.hidden[token_rows]
        y = problem.labels[layout.sup_index[start:end]]
        expz = buffer.logits(h_c)
        logp, sumexp = rows_math.softmax_stats_(expz, y)
        if extras:
            token_ce[start:end], z_loss[start:end] = rows_math.token_terms(logp)
            lse_all[start:end] = rows_math.lse
        if not weights_known:
            logp_all[start:end] = logp
            # (sequence variant without pre-pass: this one chunk holds every token)
            log_ratio = logp.to(torch.float64) - behavior[start:end]
            log_w_raw[start:end] = rows_math.scan(log_ratio, d, incl, layout, config, start, end)
        if sink is not None:
            w = clip_log_weights(log_w_raw[start:end], config).exp()
            unit = grad_scale / problem.temperature
            coef = (w * unit).to(expz.dtype)
            if extras:
                ucoef = torch.full_like(coef, unit)
                dl = rows_math.dlogits_ext_(expz, sumexp, y, coef, ucoef)
            else:
                dl = rows_math.dlogits_(expz, sumexp, y, coef)
            sink.add(dl, h_c, token_rows)
    return _finish(problem, logp_all, behavior, log_w_raw, sink.result() if sink else None,
                   token_ce, z_loss, lse_all)


def _finish(problem, logp, behavior, log_w_raw, grads, token_ce=None, z_loss=None, lse=None) -> ForwardResult:
    log_w = clip_log_weights(log_w_raw, problem.config)
    ce = -logp.to(torch.float64) if token_ce is None else token_ce
    loss_sum = (log_w.exp() * ce).sum()
    if z_loss is not None:
        loss_sum = loss_sum + z_loss.sum()
    return ForwardResult(
        logp=logp,
        log_ratio=logp.to(torch.float64) - behavior,
        log_w_raw=log_w_raw,
        log_w=log_w,
        loss_sum=loss_sum,
        grads=grads,
        token_ce=token_ce,
        z_loss=z_loss,
        lse=lse,
    )


def backward(problem: PEARProblem, coef: torch.Tensor, need: Tuple[bool, bool, bool],
             ucoef: Optional[torch.Tensor] = None) -> Grads:
    """Recompute pass: gradients for per-token factors ``coef`` (M,) of w * grad_output
    (and, with loss options, ``ucoef`` (M,) = grad_output for the unweighted z-loss)."""
    layout = problem.layout
    buffer = _LogitsBuffer(problem)
    sink = _GradSink(problem, need, buffer.weight)
    rows_math = _row_math(problem)
    extras = isinstance(rows_math, OptionRows)
    for start, end in chunks_from_end(layout.num_supervised, problem.rows()):
        token_rows = _token_rows(problem, start, end)
        h_c = problem.hidden[token_rows]
        y = problem.labels[layout.sup_index[start:end]]
        expz = buffer.logits(h_c)
        _, sumexp = rows_math.softmax_stats_(expz, y)
        c = (coef[start:end] / problem.temperature).to(expz.dtype)
        if extras:
            u = ucoef[start:end] if ucoef is not None else torch.zeros_like(coef[start:end])
            dl = rows_math.dlogits_ext_(expz, sumexp, y, c, (u / problem.temperature).to(expz.dtype))
        else:
            dl = rows_math.dlogits_(expz, sumexp, y, c)
        sink.add(dl, h_c, token_rows)
    return sink.result()


def backward_with_entropy(problem: PEARProblem, coef: torch.Tensor, ent_coef: torch.Tensor,
                          need: Tuple[bool, bool, bool]) -> Grads:
    """Recompute pass for upstream gradients of both the log-probs and the entropies.

    With z the (capped) tempered logits, p = softmax(z), H = lse(z) - sum_v p_v z_v:

        d logp_y / dz_v = onehot_v(y) - p_v
        d H / dz_v      = -p_v (z_v - E_p[z])        (shift invariant: z - m serves)

    ``coef`` = -dL/dlogp (the factor of p - onehot, as in ``backward``), ``ent_coef`` = dL/dH.
    """
    if problem.vocab_parallel is not None:
        raise ValueError("the entropy gradient is not implemented with vocab_parallel_group")
    layout = problem.layout
    buffer = _LogitsBuffer(problem)
    sink = _GradSink(problem, need, buffer.weight)
    cap = OptionRows(problem.options, problem.temperature) if problem.options.softcap is not None else None
    for start, end in chunks_from_end(layout.num_supervised, problem.rows()):
        token_rows = _token_rows(problem, start, end)
        h_c = problem.hidden[token_rows]
        y = problem.labels[layout.sup_index[start:end]]
        z = buffer.logits(h_c)
        if cap is not None:
            z = cap._cap_(z)
        z.sub_(z.amax(dim=1, keepdim=True))
        z.clamp_(min=torch.finfo(z.dtype).min)  # -inf logits: p = 0, and 0 * finite = 0
        e = torch.exp(z)
        s = e.sum(dim=1)
        ez = (e * z).sum(dim=1) / s
        c = (coef[start:end] / problem.temperature).to(z.dtype)
        hc = (ent_coef[start:end] / problem.temperature).to(z.dtype)
        # z <- c p - hc p (z - E z) - c onehot. e multiplies (z - E z) first: where e = 0 (a
        # -inf logit clamped to the most negative float) the product is 0 before any scaling
        # could overflow it to inf (inf * 0 would be NaN)
        z.sub_(ez[:, None]).mul_(e).mul_(-hc[:, None]).add_(e.mul_(c[:, None])).div_(s[:, None])
        z.scatter_add_(1, y[:, None], -c[:, None])
        if cap is not None:
            z.mul_(cap.dcap)
        sink.add(z, h_c, token_rows)
    return sink.result()
