"""Patch a Hugging Face *ForCausalLM so training computes the fused PEAR loss.

The patched forward takes one extra argument, ``behavior_logprobs`` (B, T), aligned with
``input_ids``: behavior_logprobs[b, i] = log pi_beta(input_ids[b, i] | input_ids[b, :i]); values
at unsupervised positions are ignored. In training with labels it runs the backbone, shifts the
last hidden state, labels and behavior log-probs exactly as ``ForCausalLMLoss`` shifts labels
(position i predicts label i + 1), and computes ``fused_pear_loss`` without building logits.
Everything else (eval, generation, no labels, ``logits_to_keep`` != 0) calls the original
forward unchanged, with ``behavior_logprobs`` dropped.

Packed rows (several sequences in one row, as DataCollatorWithFlattening or TRL's
padding-free collator produce) are detected from ``seq_idx``, ``position_ids`` (a position
that does not follow its predecessor by 1 starts a sequence, as in transformers'
``find_packed_sequence_indices``) or ``cu_seq_lens_q``; the loss then gets ``cu_seqlens`` so no
PEAR weight crosses a sequence boundary, and the prediction of one sequence's first token from
the previous sequence's last token is masked.

``num_items_in_batch`` (passed by Trainer under gradient accumulation) is the loss's normalizer.
Under autocast the head's matmul runs in the autocast dtype, as the stock ``lm_head`` would; the
kernel itself runs with autocast off.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import fused_pear_loss
from ..checks import IGNORE_INDEX
from ..config import PEARConfig, Variant
from .head import call_through_head, resolve_head

__all__ = [
    "PEARCausalLMOutput",
    "PEARPatchState",
    "apply_pear_kernel",
    "apply_pear_kernel_to_llama",
    "apply_pear_kernel_to_qwen2",
    "apply_pear_kernel_to_qwen3",
    "remove_pear_kernel",
    "pear_state",
    "require_pear_forward",
]

_STATE_ATTR = "_pear_patch_state"

# Kwargs the loss consumes and the backbone must not see.
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index")

# Config fields of architectures whose logits are not plain hidden @ W^T + b and that the fused
# loss does not reproduce (a logit multiplier): patching them is refused. A logit soft-cap
# (Gemma 2/3 ``final_logit_softcapping``) is reproduced: it is passed to the loss as softcap.
_UNSUPPORTED_LOGIT_TRANSFORMS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def _logit_softcap(config) -> Optional[float]:
    """The model's final-logit soft-cap (None when unset or 0)."""
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "final_logit_softcapping", None)
    return float(value) if value else None


@dataclass
class PEARCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the PEAR weight statistics of the batch (detached scalars).

    ``logits`` is None when the fused loss ran: no logits were built.
    """

    pear_metrics: Optional[Dict[str, torch.Tensor]] = None


@dataclass
class PEARPatchState:
    config: PEARConfig
    original_forward: Any  # the function (unbound) the patch replaced
    patched_instance: bool
    temperature: float = 1.0
    chunk_size: Optional[int] = None
    backend: Optional[str] = None
    require_behavior_logprobs: bool = True
    # distillation from stored teacher top-k (used when the batch carries teacher_ids /
    # teacher_logprobs): keyword arguments of fused_pear_distill_loss (tail, hard_weight)
    distill: Optional[Dict[str, Any]] = None


def _effective_forward(model):
    """The forward a call runs, seen through wrappers that declare what they wrap
    (``__wrapped__``: accelerate's mixed-precision ``convert_outputs_to_fp32(autocast(...))``,
    functools.wraps decorators). A replacement that does not wrap the PEAR forward (Liger's
    fused cross-entropy forward) ends the walk, so it is still detected."""
    if isinstance(model, nn.Module):
        f = model.__dict__.get("forward")
        if f is None:
            f = type(model).forward
    else:
        f = getattr(model, "forward", None)
    for _ in range(16):
        func = getattr(f, "__func__", f)
        if getattr(func, "_pear_patched", False) or not hasattr(f, "__wrapped__"):
            return func
        f = f.__wrapped__
    return getattr(f, "__func__", f)


def backbone_of(model):
    """The decoder backbone of a ``*ForCausalLM``: ``getattr(model, model.base_model_prefix)``, or
    ``model.model`` when that is not a module (before transformers 5, Gemma 3's ForCausalLM names
    its prefix ``language_model`` but keeps the backbone in ``model``); None if neither is one."""
    backbone = getattr(model, model.base_model_prefix, None)
    if not isinstance(backbone, nn.Module):
        backbone = getattr(model, "model", None)
    return backbone if isinstance(backbone, nn.Module) else None


def pear_state(model) -> Optional[PEARPatchState]:
    """The patch state of a model instance or class, or None if it is not patched.

    A model whose forward was replaced after the PEAR patch (for instance by Liger-Kernel's
    ``apply_liger_kernel_to_*(fused_linear_cross_entropy=True)``, which swaps in its own
    forward) is *not* patched any more, whatever state it still carries: it would compute
    plain cross-entropy and ignore behavior_logprobs. Applying the PEAR patch again (the
    trainers do) puts the PEAR forward back on top, keeping Liger's module patches (RMSNorm,
    RoPE, SwiGLU) underneath.
    """
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return None
    if not getattr(_effective_forward(model), "_pear_patched", False):
        return None
    return state


def require_pear_forward(model) -> None:
    """Raise if ``model`` (PEFT-unwrapped) no longer runs the PEAR forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") and callable(model.get_base_model) else model
    base = getattr(base, "module", base)  # DDP/accelerate wrappers
    if getattr(base, _STATE_ATTR, None) is not None and pear_state(base) is None:
        raise RuntimeError(
            "the model's PEAR forward was replaced after apply_pear_kernel (e.g. by Liger-Kernel's "
            "apply_liger_kernel_to_*(fused_linear_cross_entropy=True)): it would train with plain "
            "cross-entropy. Apply the PEAR patch last (apply_pear_kernel(model) again), or pass "
            "fused_linear_cross_entropy=False to Liger"
        )


def _check_logits_are_linear(config) -> None:
    if config is None:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
        value = getattr(text, name, None)
        if value is not None and value != 1.0:
            raise ValueError(
                f"cannot apply the fused PEAR loss: the model's config sets {name}={value!r}, so its logits "
                "are not hidden @ lm_head.weight^T (+ bias) and the fused loss would compute a different model"
            )


def _packed_sequence_ids(position_ids, seq_idx, shape, cu_seq_lens=None) -> Optional[torch.Tensor]:
    """(B, T) globally increasing sequence ids if any row holds more than one sequence, else None.

    Sources, in order: ``seq_idx``; ``position_ids`` (a position that does not follow its
    predecessor by 1 starts a sequence); ``cu_seq_lens_q`` of a single packed row (flash-attention
    kwargs of DataCollatorWithFlattening).
    """
    if seq_idx is None and position_ids is None and cu_seq_lens is not None:
        cu = cu_seq_lens.to(torch.int64).reshape(-1)
        if shape[0] != 1 or int(cu[-1]) != shape[1] or int(cu[0]) != 0:
            raise ValueError(
                f"cu_seq_lens_q {cu.tolist()[:8]}... must describe one packed row of {shape[1]} tokens"
            )
        if cu.numel() <= 2:
            return None
        positions = torch.arange(shape[1], device=cu.device)
        return torch.searchsorted(cu[1:], positions, right=True).reshape(shape)
    if seq_idx is not None:
        ids = seq_idx.to(torch.int64)
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    elif position_ids is not None:
        pos = position_ids.to(torch.int64)
        if pos.dim() == 3:  # mrope-style (3, B, T): the first plane carries the text positions
            pos = pos[0]
        if tuple(pos.shape) != tuple(shape):
            pos = pos.expand(shape)
        starts = torch.ones_like(pos, dtype=torch.bool)
        starts[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
    else:
        return None
    if not bool(starts[:, 1:].any()):
        return None
    return torch.cumsum(starts.reshape(-1).to(torch.int64), 0).reshape(shape) - 1


def _cu_seqlens(ids_flat: torch.Tensor) -> torch.Tensor:
    _, counts = torch.unique_consecutive(ids_flat, return_counts=True)
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=ids_flat.device)
    cu[1:] = torch.cumsum(counts, 0)
    return cu


def _pear_loss_from_hidden(
    self,
    hidden_states: torch.Tensor,
    labels: Optional[torch.Tensor],
    shift_labels: Optional[torch.Tensor],
    behavior_logprobs: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    seq_idx: Optional[torch.Tensor],
    cu_seq_lens: Optional[torch.Tensor],
    num_items_in_batch,
    ignore_index: int,
    state: PEARPatchState,
    teacher: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, Any]:
    B, T, _ = hidden_states.shape
    if teacher is not None:
        t_ids, t_lp = teacher
        if not (torch.is_tensor(t_ids) and torch.is_tensor(t_lp)) or t_ids.dim() != 3 or tuple(t_ids.shape[:2]) != (B, T) \
                or t_lp.shape != t_ids.shape:
            raise ValueError(
                f"teacher_ids and teacher_logprobs must be (B, T, K) aligned with input_ids {(B, T)}, got "
                f"{tuple(getattr(t_ids, 'shape', ()))} and {tuple(getattr(t_lp, 'shape', ()))}"
            )
        t_ids, t_lp = t_ids.to(hidden_states.device), t_lp.to(hidden_states.device)
    if behavior_logprobs is None:
        if state.config.variant is not Variant.NONE:
            raise ValueError(
                "behavior_logprobs is required to train with the PEAR loss (variant "
                f"{state.config.variant.value!r}); pass them aligned with input_ids, or use variant='none'"
            )
        behavior_logprobs = torch.zeros((B, T), dtype=torch.float32, device=hidden_states.device)
    if not torch.is_tensor(behavior_logprobs) or not behavior_logprobs.is_floating_point():
        raise TypeError("behavior_logprobs must be a floating-point tensor aligned with input_ids")
    if tuple(behavior_logprobs.shape) != (B, T):
        raise ValueError(
            f"behavior_logprobs must have input_ids' shape {(B, T)}, got {tuple(behavior_logprobs.shape)}"
        )
    behavior_logprobs = behavior_logprobs.to(hidden_states.device)

    packed = _packed_sequence_ids(position_ids, seq_idx, (B, T), cu_seq_lens)
    if shift_labels is not None:
        # Already shifted (context/sequence parallel): behavior_logprobs are taken as shifted too.
        if tuple(shift_labels.shape) != (B, T):
            raise ValueError(f"shift_labels must have shape {(B, T)}, got {tuple(shift_labels.shape)}")
        h, y, lb = hidden_states, shift_labels.to(hidden_states.device), behavior_logprobs
        tt = (t_ids, t_lp) if teacher is not None else None
        ids = packed
    else:
        if tuple(labels.shape) != (B, T):
            raise ValueError(f"labels must have input_ids' shape {(B, T)}, got {tuple(labels.shape)}")
        labels = labels.to(hidden_states.device)
        # position i predicts token i + 1: drop the last hidden state and the first label / log-prob
        h, y, lb = hidden_states[:, :-1], labels[:, 1:], behavior_logprobs[:, 1:]
        # the teacher's top-k at input position i + 1 is what hidden state i is trained on
        tt = (t_ids[:, 1:], t_lp[:, 1:]) if teacher is not None else None
        ids = None
        if packed is not None:
            # a pair (i -> i + 1) that crosses into the next packed sequence is not a prediction
            y = y.masked_fill(packed[:, 1:] != packed[:, :-1], ignore_index)
            ids = packed[:, :-1]

    opts = dict(
        config=state.config,
        temperature=state.temperature,
        num_items_in_batch=num_items_in_batch,
        ignore_index=ignore_index,
        # inside torch.compile the loss is one custom op returning the loss alone (no stats)
        return_stats=not torch.compiler.is_compiling(),
        softcap=_logit_softcap(getattr(self, "config", None)),
        chunk_size=state.chunk_size,
        backend=state.backend,
    )

    def loss_in_head(hid, weight, bias):
        device_type = weight.device.type
        if torch.is_autocast_enabled(device_type):
            # Under autocast the stock head runs its matmul in the autocast dtype; do the same, but
            # explicitly, and run the kernel with autocast off so its own dtype choices hold.
            dtype = torch.get_autocast_dtype(device_type)
            hid, weight = hid.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        elif hid.dtype != weight.dtype:
            hid = hid.to(weight.dtype)
        hid = hid.to(weight.device)
        yy, ll = y.to(weight.device), lb.to(device=weight.device)
        ll = ll.to(torch.float32) if ll.dtype in (torch.float16, torch.bfloat16) else ll
        with torch.autocast(device_type, enabled=False):
            if tt is not None:
                from ..distill import fused_pear_distill_loss

                dopts = dict(config=opts["config"], temperature=opts["temperature"],
                             num_items_in_batch=opts["num_items_in_batch"], ignore_index=ignore_index,
                             return_stats=opts["return_stats"], chunk_size=opts["chunk_size"],
                             **(state.distill or {}))
                ti, tl = tt[0].to(weight.device), tt[1].to(device=weight.device, dtype=torch.float32)
                if ids is not None:
                    cu = _cu_seqlens(ids.reshape(-1).to(weight.device))
                    K = ti.shape[-1]
                    return fused_pear_distill_loss(
                        hid.reshape(-1, hid.shape[-1]), weight, yy.reshape(-1), ll.reshape(-1),
                        ti.reshape(-1, K), tl.reshape(-1, K), bias=bias, cu_seqlens=cu, **dopts,
                    )
                return fused_pear_distill_loss(hid, weight, yy, ll, ti, tl, bias=bias, **dopts)
            if ids is not None:
                cu = _cu_seqlens(ids.reshape(-1).to(weight.device))
                return fused_pear_loss(
                    hid.reshape(-1, hid.shape[-1]), weight, yy.reshape(-1), ll.reshape(-1),
                    bias=bias, cu_seqlens=cu, **opts,
                )
            return fused_pear_loss(hid, weight, yy, ll, bias=bias, **opts)

    return call_through_head(self.get_output_embeddings(), h, loss_in_head)


def _make_forward(original):
    """A forward with ``original``'s signature plus ``behavior_logprobs`` (Trainer reads it)."""

    sig = inspect.signature(original)

    @functools.wraps(original)
    def pear_forward(self, *args, behavior_logprobs=None, teacher_ids=None, teacher_logprobs=None, **kwargs):
        state: PEARPatchState = pear_state(self)
        named, extra = _bind(sig, self, args, kwargs)
        labels = named.pop("labels", None)
        shift_labels = extra.pop("shift_labels", None)
        logits_to_keep = named.pop("logits_to_keep", 0)
        use_fused = (
            self.training
            and (labels is not None or shift_labels is not None)
            and isinstance(logits_to_keep, int)
            and logits_to_keep == 0
        )
        if not use_fused:
            return state.original_forward(self, *args, **kwargs)

        num_items = extra.pop("num_items_in_batch", None)
        ignore_index = extra.pop("ignore_index", IGNORE_INDEX)
        return_dict = named.pop("return_dict", extra.pop("return_dict", None))
        if named.get("use_cache") is None:
            named["use_cache"] = False  # no cache in a training forward (as the stock forward under grad ckpt)
        backbone = backbone_of(self)
        outputs = backbone(**named, **extra)
        hidden_states = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        result = _pear_loss_from_hidden(
            self, hidden_states, labels, shift_labels, behavior_logprobs,
            named.get("position_ids", extra.get("position_ids")), extra.get("seq_idx"),
            extra.get("cu_seq_lens_q"), num_items, ignore_index, state,
            teacher=(teacher_ids, teacher_logprobs) if teacher_ids is not None or teacher_logprobs is not None else None,
        )
        loss, stats = result if isinstance(result, tuple) else (result, None)
        out = PEARCausalLMOutput(
            loss=loss,
            logits=None,
            past_key_values=getattr(outputs, "past_key_values", None),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
            pear_metrics=_stat_scalars(stats) if stats is not None else None,
        )
        return out.to_tuple() if return_dict is False else out

    params = list(sig.parameters.values())
    new = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
           for n in ("behavior_logprobs", "teacher_ids", "teacher_logprobs")]
    var_kw = [i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD]
    if var_kw:
        params[var_kw[0]:var_kw[0]] = new
    else:
        params.extend(new)
    pear_forward.__signature__ = sig.replace(parameters=params)
    del pear_forward.__wrapped__  # inspect must read __signature__, not the original's
    pear_forward._pear_patched = True
    return pear_forward


def _bind(sig: inspect.Signature, self, args, kwargs) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Named arguments of a call with signature ``sig`` and, separately, its ``**kwargs`` contents."""
    try:
        bound = sig.bind(self, *args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{type(self).__name__}.forward: {exc}") from None
    named: Dict[str, Any] = {}
    extra: Dict[str, Any] = {}
    for i, (name, value) in enumerate(bound.arguments.items()):
        kind = sig.parameters[name].kind
        if i == 0:
            continue  # self
        if kind == inspect.Parameter.VAR_KEYWORD:
            extra.update(value)
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{type(self).__name__}.forward: unexpected positional arguments")
        else:
            named[name] = value
    return named, extra


def _stat_scalars(stats) -> Dict[str, torch.Tensor]:
    n = torch.tensor(float(stats.num_tokens))
    return {
        "mean_weight": stats.mean_weight.detach(),
        "ess": stats.ess.detach(),
        "ess_fraction": stats.ess_fraction.detach(),
        "ratio_clip_fraction": stats.ratio_clip_fraction.detach(),
        "weight_clip_fraction": stats.weight_clip_fraction.detach(),
        "num_tokens": n.to(stats.mean_weight.device),
    }


def _causal_lm_class(target) -> type:
    cls = target if isinstance(target, type) else type(target)
    if not (isinstance(target, type) and issubclass(target, nn.Module)) and not isinstance(target, nn.Module):
        raise TypeError(f"model must be a *ForCausalLM model instance or class, got {type(target).__name__}")
    if not callable(getattr(cls, "get_output_embeddings", None)) or not hasattr(cls, "base_model_prefix"):
        raise TypeError(f"{cls.__name__} is not a Hugging Face PreTrainedModel with an output embedding")
    return cls


def apply_pear_kernel(
    model,
    config: Optional[PEARConfig] = None,
    *,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    distill: Optional[Dict[str, Any]] = None,
    **overrides,
):
    """Make ``model`` train with the fused PEAR loss; returns ``model``.

    ``model``: a ``*ForCausalLM`` instance (patched alone) or class (every instance, present
    and future). Its head must be reachable with ``get_output_embeddings()`` and its backbone as
    ``getattr(model, model.base_model_prefix)``, which holds for transformers' decoder-only LMs.
    ``config``/``overrides``: the PEARConfig (and field overrides). ``temperature`` divides the
    logits; ``chunk_size`` and ``backend`` go to fused_pear_loss. Applying again replaces the
    settings; ``remove_pear_kernel`` restores the original forward.
    ``distill``: settings of fused_pear_distill_loss ({"tail": ..., "hard_weight": ...}) used
    when a batch carries ``teacher_ids``/``teacher_logprobs`` (aligned with input_ids).
    """
    if distill is not None:
        if not isinstance(distill, dict) or set(distill) - {"tail", "hard_weight", "kl"}:
            raise ValueError(f"distill must be a dict with keys among tail, hard_weight, kl; got {distill!r}")
    cls = _causal_lm_class(model)
    if config is not None and not isinstance(config, PEARConfig):
        raise TypeError(f"config must be a PEARConfig, got {type(config).__name__}")
    config = (config or PEARConfig()).with_overrides(**overrides)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if isinstance(model, nn.Module):
        _check_logits_are_linear(getattr(model, "config", None))
        head = model.get_output_embeddings()
        if head is None:
            raise TypeError(f"{cls.__name__} has no output embeddings (lm_head) to compute the loss with")
        resolve_head(head)  # fails early on a head whose weight cannot be found
        backbone = backbone_of(model)
        if backbone is None:
            raise TypeError(
                f"{cls.__name__}.{model.base_model_prefix} is not a module: cannot run the backbone alone"
            )
    target = model
    previous = target.__dict__.get(_STATE_ATTR) if isinstance(model, nn.Module) else cls.__dict__.get(_STATE_ATTR)
    if previous is not None:
        original = previous.original_forward
    else:
        original = cls.forward if isinstance(model, nn.Module) else model.forward
        if getattr(original, "_pear_patched", False):  # instance of an already patched class
            original = pear_state(cls).original_forward
    state = PEARPatchState(
        config=config, original_forward=original, patched_instance=isinstance(model, nn.Module),
        temperature=float(temperature), chunk_size=chunk_size, backend=backend, distill=distill,
    )
    forward = _make_forward(original)
    if isinstance(model, nn.Module):
        model.__dict__[_STATE_ATTR] = state
        model.forward = types.MethodType(forward, model)
    else:
        setattr(model, _STATE_ATTR, state)
        model.forward = forward
    return model


def remove_pear_kernel(model):
    """Undo apply_pear_kernel on this instance or class; returns it."""
    if isinstance(model, nn.Module):
        if model.__dict__.pop(_STATE_ATTR, None) is not None:
            model.__dict__.pop("forward", None)
    elif isinstance(model, type) and _STATE_ATTR in model.__dict__:
        model.forward = model.__dict__[_STATE_ATTR].original_forward
        delattr(model, _STATE_ATTR)
    return model


def _shortcut(module_path: str, class_name: str):
    def apply(model=None, config: Optional[PEARConfig] = None, **kwargs):
        import importlib

        cls = getattr(importlib.import_module(module_path), class_name)
        target = cls if model is None else model
        if isinstance(target, type):
            if not issubclass(target, cls):
                raise TypeError(f"expected {class_name} or a subclass, got {target.__name__}")
        elif not isinstance(target, cls):
            raise TypeError(f"expected a {class_name} instance, got {type(target).__name__}")
        return apply_pear_kernel(target, config, **kwargs)

    apply.__name__ = f"apply_pear_kernel_to_{class_name.replace('ForCausalLM', '').lower()}"
    apply.__doc__ = (
        f"apply_pear_kernel for {class_name}: ``model`` is an instance, a subclass, or None for the "
        f"class itself (every {class_name} created afterwards is patched)."
    )
    return apply


apply_pear_kernel_to_qwen2 = _shortcut("transformers.models.qwen2.modeling_qwen2", "Qwen2ForCausalLM")
apply_pear_kernel_to_qwen3 = _shortcut("transformers.models.qwen3.modeling_qwen3", "Qwen3ForCausalLM")
apply_pear_kernel_to_llama = _shortcut("transformers.models.llama.modeling_llama", "LlamaForCausalLM")
