"""Read the LM head's weight through its module, so sharding and adapter wrappers still work.

A fused loss needs the raw (V, H) weight, not the head's output. Reading ``lm_head.weight``
directly is wrong in three common set-ups:

- DeepSpeed ZeRO-3 and FSDP2 (``fully_shard`` on the head) gather a module's parameters in its
  forward pre-hook and release them in its post-hook; outside the module's forward the weight
  is an empty shard or a DTensor.
- FSDP1 wraps the head in a ``FullyShardedDataParallel`` module whose forward unshards it.
- PEFT replaces the head with a ``ModulesToSaveWrapper`` (a trainable copy per adapter) or a
  LoRA layer (base weight + B @ A * scaling).

So the loss runs *inside* the head's forward: ``call_through_head`` temporarily redirects the
forward of every module on the path to the weight (outermost first) and calls the outermost
one with the hidden states. Each module's hooks fire as in an ordinary forward, its weight is
materialised while the loss reads it, and autograd sees the loss as the head's output, so
backward hooks (gradient reduce-scatter) are armed too. This is the redirection trick of
Lightning's FSDP strategy and TRL's ``_ForwardRedirection``, applied to a chain of modules.

PEFT is recognised by attributes (it need not be installed): a ModulesToSaveWrapper has
``original_module`` and ``modules_to_save``; a LoRA layer has ``base_layer``, ``lora_A``,
``lora_B`` and ``get_delta_weight``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["HeadPath", "resolve_head", "call_through_head"]


@dataclass
class HeadPath:
    """The modules between the model's head attribute and the effective weight.

    ``chain``: modules whose forwards must run (outermost first) for the weight to be live.
    ``weight_fn``: returns (weight, bias) once inside the innermost forward.
    """

    chain: List[nn.Module]
    weight_fn: Callable[[], Tuple[torch.Tensor, Optional[torch.Tensor]]]
    description: str


def _is_modules_to_save(m: nn.Module) -> bool:
    return hasattr(m, "original_module") and isinstance(getattr(m, "modules_to_save", None), nn.ModuleDict)


def _is_lora_layer(m: nn.Module) -> bool:
    return (
        isinstance(getattr(m, "base_layer", None), nn.Module)
        and isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
        and isinstance(getattr(m, "lora_B", None), nn.ModuleDict)
        and callable(getattr(m, "get_delta_weight", None))
    )


def _active_adapters(m: nn.Module) -> List[str]:
    active = getattr(m, "active_adapters", None)
    if active is None:
        active = getattr(m, "active_adapter", [])
    if isinstance(active, str):
        active = [active]
    return list(active)


def _plain_weight(m: nn.Module) -> Callable[[], Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    def read():
        weight = m.weight
        bias = getattr(m, "bias", None)
        # FSDP2 without a pre-hook on this module leaves DTensors; gather them (a no-op otherwise)
        if hasattr(weight, "full_tensor"):
            weight = weight.full_tensor()
        if bias is not None and hasattr(bias, "full_tensor"):
            bias = bias.full_tensor()
        return weight, bias

    return read


def resolve_head(head: nn.Module) -> HeadPath:
    """The path from ``head`` (what ``get_output_embeddings()`` returns) to its effective weight."""
    if not isinstance(head, nn.Module):
        raise TypeError(f"the model's output embeddings must be an nn.Module, got {type(head).__name__}")
    chain: List[nn.Module] = [head]
    m = head
    names = [type(head).__name__]
    while True:
        inner = getattr(m, "_fsdp_wrapped_module", None)  # FSDP1 wrapper
        if isinstance(inner, nn.Module):
            m = inner
        elif _is_modules_to_save(m):
            active = _active_adapters(m)
            use_copy = not getattr(m, "disable_adapters", False) and active and active[0] in m.modules_to_save
            m = m.modules_to_save[active[0]] if use_copy else m.original_module
        else:
            break
        chain.append(m)
        names.append(type(m).__name__)

    if _is_lora_layer(m):
        lora = m
        base = lora.base_layer
        active = [] if getattr(lora, "disable_adapters", False) or getattr(lora, "merged", False) else [
            a for a in _active_adapters(lora) if a in lora.lora_A
        ]
        use_dora = getattr(lora, "use_dora", None)
        for a in active:
            if isinstance(use_dora, dict) and use_dora.get(a):
                raise NotImplementedError(
                    f"DoRA adapter {a!r} on the LM head: its weight is renormalised per output row, which the "
                    "fused loss does not reproduce; use plain LoRA or modules_to_save for the head"
                )
        chain.append(base)
        for a in active:
            chain.extend([lora.lora_A[a], lora.lora_B[a]])
            drops = getattr(lora, "lora_dropout", None)
            drop = drops[a] if isinstance(drops, nn.ModuleDict) and a in drops else None
            if isinstance(drop, nn.Dropout) and drop.p > 0 and lora.training:
                warnings.warn(
                    "LoRA dropout on the LM head is not applied by the fused PEAR loss "
                    "(the loss reads the merged weight, not the head's output)",
                    stacklevel=3,
                )
        base_read = _plain_weight(base)

        def read_lora():
            weight, bias = base_read()
            for a in active:
                # get_delta_weight is differentiable in lora_A / lora_B: their gradients flow
                weight = weight + lora.get_delta_weight(a).to(weight.dtype)
                b_bias = getattr(lora.lora_B[a], "bias", None)
                if b_bias is not None:  # peft's lora_bias=True: lora_B's bias, scaled, joins the output
                    extra = b_bias.to(weight.dtype) * lora.scaling[a]
                    bias = extra if bias is None else bias + extra
            return weight, bias

        names.append(f"LoRA[{','.join(active) or 'inactive'}]")
        return HeadPath(chain, read_lora, " -> ".join(names))

    if not isinstance(getattr(m, "weight", None), torch.Tensor):
        raise TypeError(
            f"cannot find the LM head's weight: {' -> '.join(names)} has no `weight` tensor "
            "(expected an nn.Linear-like head, possibly wrapped by FSDP or PEFT)"
        )
    return HeadPath(chain, _plain_weight(m), " -> ".join(names))


def call_through_head(
    head: nn.Module,
    hidden: torch.Tensor,
    fn: Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], object],
):
    """Run ``fn(hidden, weight, bias)`` inside the forward of every module on the head's path.

    ``hidden`` is passed as the modules' input, so input hooks (e.g. FSDP2 mixed-precision casts)
    see it; ``fn`` receives it as they leave it. Returns fn's result.
    """
    path = resolve_head(head)
    return _redirect(path.chain, hidden, lambda h: fn(h, *path.weight_fn()))


_MISSING = object()


def _redirect(chain: List[nn.Module], hidden: torch.Tensor, inner: Callable[[torch.Tensor], object]):
    if not chain:
        return inner(hidden)
    module, rest = chain[0], chain[1:]
    saved = module.__dict__.get("forward", _MISSING)

    def restore():
        if saved is _MISSING:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = saved

    def redirected(h, *args, **kwargs):
        # Restore first: fn (or a hook) may legitimately call the module's real forward.
        restore()
        return _redirect(rest, h, inner)

    module.__dict__["forward"] = redirected
    try:
        return module(hidden)
    finally:
        restore()
