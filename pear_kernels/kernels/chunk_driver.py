"""The one chunk driver: the passes every chunked backend runs, with the row math as a strategy.

Never a (tokens x vocab) tensor: the supervised tokens are cut into chunks of
``problem.rows()`` compact tokens (the chunk sizing lives in ``backend.py``) and one
(rows x V) logits buffer lives at a time. Each chunk is

    z  = logits(h_c)                 the backend's matmul (torch: fp32 buffer; Triton: cuBLAS)
    st = stats(z, y)                 log p(y), and what the gradient needs (row sum or lse)
    coef = weights(...)              the PEAR scan over the chunk: log-weights, and
                                     coef = exp(clipped log-weight) * d loss / d token loss
    dz = dlogits_(z, y, st, coef)    in place: z becomes d loss / d logits
    dh[rows] = dz W;  dW += dz^T h_c;  db += sum dz          (GradSink: 2 more matmuls)

The weight of a token must be known before its dlogits are reduced into dW. For the token
and block variants it depends only on later tokens of its sequence, so chunks are visited
from the end of the batch (``chunks_from_end``) and the scan carries its suffix sums across
chunk boundaries: one pass, 3 matmuls per chunk. The sequence variant needs every log-prob of
a sequence first: a log-prob pre-pass (1 matmul per chunk), then the same gradient pass,
unless one chunk holds every token.

A backend brings a ``ChunkKernels`` strategy (the protocol below): ``torch_chunked`` (PyTorch
row ops, or the C++ row passes of ``native_cpu``, or the cross-rank row math of
``vocab_parallel``), ``triton_pear`` (Triton row kernels) and ``triton_options`` (Triton row
kernels with softcap, z-loss and label smoothing). The loops, the gradient sink and the
assembly of the result are here, once.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Protocol, Tuple, Union

import torch

from ..config import Variant
from ..importance import clip_log_weights
from .backend import ForwardResult, Grads, PEARProblem, chunks_from_end, work_dtype

__all__ = ["ChunkKernels", "ChunkStats", "GradSink", "token_rows", "compact_labels", "token_logprobs", "forward", "backward",
           "finish", "mm_fp32_out"]

Rows = Union[slice, torch.Tensor]


class ChunkStats(NamedTuple):
    """What ``stats`` returns for a chunk: log p(y) in the working dtype; the logsumexp and the
    mean logit where the loss options need them (else None); ``state``: whatever the backend's
    ``dlogits_`` needs from the stats pass (the row sum of exp, or the lse)."""

    logp: torch.Tensor
    lse: Optional[torch.Tensor]
    mean: Optional[torch.Tensor]
    state: object


class ChunkKernels(Protocol):
    """The row math of one backend over one chunk of logits (in place on one buffer)."""

    work_dtype: torch.dtype  # dtype of the log-probs it returns

    def logits(self, h_c: torch.Tensor) -> torch.Tensor:
        """(rows, V) logits of the chunk's hidden rows, in a buffer the row passes may overwrite."""

    def stats(self, z: torch.Tensor, y: torch.Tensor) -> ChunkStats:
        """Softmax statistics of the chunk; z is left as ``dlogits_`` expects it."""

    def logp_entropy(self, z: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(log p(y), entropy) per row; z may be overwritten."""

    def weights(self, logp: torch.Tensor, behavior: torch.Tensor, d: torch.Tensor, incl: torch.Tensor,
                log_w_raw: torch.Tensor, start: int, end: int,
                coef_scale: Optional[float]) -> Optional[torch.Tensor]:
        """The PEAR scan over compact tokens [start, end) (``logp`` holds their log-probs,
        ``behavior`` every token's): writes log_w_raw[start:end]; with ``coef_scale`` returns
        exp(clipped log-weight) * coef_scale for the chunk."""

    def dlogits_(self, z: torch.Tensor, y: torch.Tensor, st: ChunkStats, coef: torch.Tensor,
                 ucoef: Optional[torch.Tensor]) -> torch.Tensor:
        """In place: z -> d loss / d (raw) logits for the per-token factors ``coef`` (the
        PEAR-weighted factor of softmax - onehot) and ``ucoef`` (a second, unweighted factor:
        the z-loss's, or the entropy's for the entropy-gradient kernels; None: zero).
        Neither factor includes the temperature."""

    def sink(self, need: Tuple[bool, bool, bool], post_scale: float) -> "GradSink":
        """The gradient accumulator for this backend's matmuls."""

    def post_scale(self, grad_scale: float) -> float:
        """A factor applied to the gradients after the matmuls instead of inside the dlogits
        (fp16 on Triton: 1/normaliser folded into 16-bit dlogits would flush them to zero)."""


def token_rows(problem: PEARProblem, start: int, end: int) -> Rows:
    """Flat positions of compact tokens [start, end): on CPU a slice when they are contiguous
    (a view, and dh written by the matmul in place), else an index. On other devices always
    the index: reading its ends would synchronise the host with the stream once per chunk."""
    idx = problem.layout.sup_index[start:end]
    if idx.device.type != "cpu":
        return idx
    first, last = int(idx[0]), int(idx[-1])
    if last - first == end - start - 1:
        return slice(first, last + 1)
    return idx


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> bool:
    """out (fp32) = / += a @ b for 16-bit a, b on tensor cores with fp32 accumulation and an
    fp32 result (torch's out_dtype GEMM, CUDA only). False where it is not available."""
    if not a.is_cuda:
        return False
    try:
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


class GradSink:
    """Accumulates dh (into the chunk's token rows), dW and db from per-chunk dlogits.

    ``weight``: the weight the dh matmul uses (the PyTorch path passes an fp32 copy for
    16-bit inputs, since CPU BLAS has no 16-bit-in / fp32-out matmul). ``low_precision``:
    16-bit inputs run both matmuls in the input dtype (tensor cores), the dlogits cast once;
    dW then accumulates in fp32 through torch's out_dtype GEMM where CUDA has it.
    dh and the accumulators are fp32 (fp64 for fp64 inputs): dh is rounded to the input dtype
    once, after the upstream gradient (a GradScaler's scale included) is applied, since
    rounding w * grad_scale * dlogits @ W to fp16 here would flush small gradients to zero.
    dW is written, not zero-filled, by the first chunk: zero-filling a (V, H) buffer is a
    full pass over a parameter-sized tensor (~3% of the loss at H=896, V=151936, profiled).
    ``post_scale`` multiplies the gradients once at the end; ``reduce_dh`` combines partial dh
    across vocabulary-parallel ranks.
    """

    def __init__(self, problem: PEARProblem, need: Tuple[bool, bool, bool], weight: torch.Tensor, *,
                 low_precision: bool = False, post_scale: float = 1.0,
                 reduce_dh: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        h, w = problem.hidden, problem.weight
        acc = work_dtype(h.dtype)
        self.w = weight
        self.low_precision = low_precision and weight.dtype in (torch.float16, torch.bfloat16)
        self.post_scale = post_scale
        self.reduce_dh = reduce_dh
        self.dh = torch.zeros(h.shape, dtype=acc, device=h.device) if need[0] else None
        self.dw = torch.empty(w.shape, dtype=acc, device=w.device) if need[1] else None
        self._dw_written = False
        has_b = need[2] and problem.bias is not None
        self.db = torch.zeros(w.shape[0], dtype=acc, device=w.device) if has_b else None

    def add(self, dlogits: torch.Tensor, h_c: torch.Tensor, rows: Rows) -> None:
        d_in = dlogits.to(self.w.dtype) if self.low_precision else dlogits
        if self.dh is not None:
            if isinstance(rows, slice) and not self.low_precision and self.post_scale == 1.0:
                torch.mm(d_in, self.w, out=self.dh[rows])
            else:
                dh_c = torch.mm(d_in, self.w)
                if dh_c.dtype != self.dh.dtype:
                    dh_c = dh_c.to(self.dh.dtype)
                self.dh[rows] = dh_c * self.post_scale if self.post_scale != 1.0 else dh_c
        if self.dw is not None:
            if not (self.low_precision and mm_fp32_out(d_in.t(), h_c, self.dw, self._dw_written)):
                h_acc = h_c if h_c.dtype == self.dw.dtype else h_c.to(self.dw.dtype)
                if self._dw_written:
                    self.dw.addmm_(dlogits.t(), h_acc)
                else:
                    torch.mm(dlogits.t(), h_acc, out=self.dw)
            self._dw_written = True
        if self.db is not None:
            self.db += dlogits.sum(dim=0)

    def result(self) -> Grads:
        if self.dw is not None:
            if not self._dw_written:  # no supervised token at all
                self.dw.zero_()
            elif self.post_scale != 1.0:
                self.dw.mul_(self.post_scale)
        if self.db is not None and self.post_scale != 1.0:
            self.db.mul_(self.post_scale)
        dh = self.dh
        if dh is not None and self.reduce_dh is not None:
            dh = self.reduce_dh(dh)
        return Grads(dh, self.dw, self.db)


def compact_labels(problem: PEARProblem) -> torch.Tensor:
    """(M,) labels of the supervised tokens, in compact order, contiguous."""
    return problem.labels[problem.layout.sup_index].contiguous()


def token_logprobs(problem: PEARProblem, k: ChunkKernels, with_entropy: bool = False):
    """(M,) log pi_theta of every supervised label (and with ``with_entropy`` the (M,) entropy
    of each token's distribution), one chunk of logits at a time."""
    m = problem.layout.num_supervised
    dev = problem.hidden.device
    out = torch.empty(m, dtype=k.work_dtype, device=dev)
    ent = torch.empty(m, dtype=k.work_dtype, device=dev) if with_entropy else None
    y_all = compact_labels(problem)
    for start, end in chunks_from_end(m, problem.rows()):
        z = k.logits(problem.hidden[token_rows(problem, start, end)])
        if ent is None:
            out[start:end] = k.stats(z, y_all[start:end]).logp
        else:
            out[start:end], ent[start:end] = k.logp_entropy(z, y_all[start:end])
    return (out, ent) if with_entropy else out


def forward(problem: PEARProblem, k: ChunkKernels, grad_scale: Optional[float] = None,
            need: Tuple[bool, bool, bool] = (False, False, False)) -> ForwardResult:
    """Log-probs, weights and the weighted loss sum; with ``grad_scale`` (d loss / d token
    loss) the gradients too, computed in the same pass (no logits kept for backward)."""
    layout, config, o = problem.layout, problem.config, problem.options
    m = layout.num_supervised
    dev = problem.hidden.device
    rows = problem.rows()
    behavior = problem.behavior_logprobs[layout.sup_index].to(torch.float64).contiguous()
    d = torch.empty(m, dtype=torch.float64, device=dev)
    incl = torch.empty(m, dtype=torch.float64, device=dev)
    log_w_raw = torch.empty(m, dtype=torch.float64, device=dev)
    logp_all = torch.empty(m, dtype=k.work_dtype, device=dev)
    # the loss options' per-token terms are built from the lse (and the mean logit)
    extras = o.active or problem.want_lse
    lse_all = torch.empty(m, dtype=torch.float64, device=dev) if extras else None
    mean_all = torch.empty(m, dtype=torch.float64, device=dev) if extras and o.label_smoothing else None
    want_grads = grad_scale is not None and any(need)
    post_scale = k.post_scale(grad_scale) if want_grads else 1.0
    coef_scale = grad_scale / post_scale if want_grads else None
    y_all = compact_labels(problem)

    def keep(st: ChunkStats, start: int, end: int) -> None:
        logp_all[start:end] = st.logp
        if lse_all is not None:
            lse_all[start:end] = st.lse
        if mean_all is not None:
            mean_all[start:end] = st.mean

    # the sequence weight needs every log-prob of its sequence before any of its gradients
    prepass = config.variant is Variant.SEQUENCE and m > rows
    coef_all = None
    if prepass:
        for start, end in chunks_from_end(m, rows):
            z = k.logits(problem.hidden[token_rows(problem, start, end)])
            keep(k.stats(z, y_all[start:end]), start, end)
        coef_all = k.weights(logp_all, behavior, d, incl, log_w_raw, 0, m, coef_scale)
        if not want_grads:
            return finish(problem, logp_all, behavior, log_w_raw, None, lse_all, mean_all)

    sink = k.sink(need, post_scale) if want_grads else None
    for start, end in chunks_from_end(m, rows):
        rows_c = token_rows(problem, start, end)
        h_c = problem.hidden[rows_c]
        y = y_all[start:end]
        z = k.logits(h_c)
        st = k.stats(z, y)
        if prepass:
            coef = coef_all[start:end]
        else:
            keep(st, start, end)
            coef = k.weights(st.logp, behavior, d, incl, log_w_raw, start, end, coef_scale)
        if sink is not None:
            ucoef = torch.full_like(coef, coef_scale) if extras else None
            sink.add(k.dlogits_(z, y, st, coef, ucoef), h_c, rows_c)
    return finish(problem, logp_all, behavior, log_w_raw, sink.result() if sink else None, lse_all, mean_all)


def backward(problem: PEARProblem, k: ChunkKernels, coef: torch.Tensor, need: Tuple[bool, bool, bool],
             ucoef: Optional[torch.Tensor] = None) -> Grads:
    """Recompute pass: gradients for the per-token factors ``coef`` (M,) (= w * d loss / d
    token loss) and ``ucoef`` (M,) (the unweighted factor, see ``ChunkKernels.dlogits_``)."""
    sink = k.sink(need, 1.0)
    y_all = compact_labels(problem)
    for start, end in chunks_from_end(problem.layout.num_supervised, problem.rows()):
        rows_c = token_rows(problem, start, end)
        h_c = problem.hidden[rows_c]
        y = y_all[start:end]
        z = k.logits(h_c)
        st = k.stats(z, y)
        u = ucoef[start:end] if ucoef is not None else None
        sink.add(k.dlogits_(z, y, st, coef[start:end], u), h_c, rows_c)
    return sink.result()


def finish(problem: PEARProblem, logp: torch.Tensor, behavior: torch.Tensor, log_w_raw: torch.Tensor,
           grads: Optional[Grads], lse: Optional[torch.Tensor] = None,
           mean: Optional[torch.Tensor] = None) -> ForwardResult:
    """The ForwardResult of every backend, from the per-token log-probs and log-weights.

    With the loss options (``lse`` given), per token, eps the smoothing, s_z the z-loss scale:
        token_ce = (1 - eps) (-log p_y) + eps (lse - mean_v z_v)     (weighted by w)
        z_loss   = s_z lse^2                                         (unweighted)
    """
    o = problem.options
    log_w = clip_log_weights(log_w_raw, problem.config)
    nll = -logp.to(torch.float64)
    token_ce = z_loss = lse64 = None
    if lse is not None:
        lse64 = lse.to(torch.float64)
        eps = o.label_smoothing
        token_ce = (1.0 - eps) * nll + eps * (lse64 - mean.to(torch.float64)) if eps else nll
        z_loss = o.lse_square_scale * lse64 * lse64 if o.lse_square_scale else torch.zeros_like(lse64)
    loss_sum = (log_w.exp() * (nll if token_ce is None else token_ce)).sum()
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
        lse=lse64,
    )
