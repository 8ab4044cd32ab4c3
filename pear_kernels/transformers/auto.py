"""AutoPEARKernelForCausalLM: load a causal LM by name or path and apply the PEAR head patch
(the counterpart of Liger-Kernel's AutoLigerKernelForCausalLM)."""

from __future__ import annotations

from typing import Optional

from transformers import AutoModelForCausalLM

from ..config import PEARConfig
from .patch import apply_pear_kernel

__all__ = ["AutoPEARKernelForCausalLM"]


class AutoPEARKernelForCausalLM(AutoModelForCausalLM):
    """``AutoPEARKernelForCausalLM.from_pretrained(name_or_path, pear_config=..., **kwargs)``
    loads like AutoModelForCausalLM (kwargs go to it) and returns the model patched with
    ``apply_pear_kernel`` (``pear_config``: a PEARConfig or a dict of its fields;
    ``pear_temperature``, ``pear_chunk_size``, ``pear_backend`` go to the patch)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, pear_config: Optional[PEARConfig] = None,
                        pear_temperature: float = 1.0, pear_chunk_size: Optional[int] = None,
                        pear_backend: Optional[str] = None, **kwargs):
        model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        return apply_pear_kernel(model, PEARConfig.coerce(pear_config), temperature=pear_temperature,
                                 chunk_size=pear_chunk_size, backend=pear_backend)

    @classmethod
    def from_config(cls, config, *, pear_config: Optional[PEARConfig] = None, **kwargs):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        return apply_pear_kernel(model, PEARConfig.coerce(pear_config))
