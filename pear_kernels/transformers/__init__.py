"""Hugging Face integration: patched *ForCausalLM forwards, data loading, collection, trainers.

This is the integrations layer: it may import transformers (and, where used, trl, pyarrow,
tqdm); the core never imports it. Importing it without transformers raises an ImportError that
names the extra to install.

    from pear_kernels.transformers import apply_pear_kernel, PEARTrainer, load_pear_dataset
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra installed
    raise ImportError(
        "pear_kernels.transformers needs Hugging Face transformers: pip install pear_kernels[hf]"
    ) from exc

from .auto import AutoPEARKernelForCausalLM
from .collator import PEARDataCollator
from .collect import collect_behavior_logprobs, ingest_generation_logprobs
from .data import MisalignedExampleError, build_example, load_pear_dataset
from .formats import read_collected, read_records
from .patch import (
    apply_pear_kernel,
    apply_pear_kernel_to_llama,
    apply_pear_kernel_to_qwen2,
    apply_pear_kernel_to_qwen3,
    pear_state,
    remove_pear_kernel,
    require_pear_forward,
)

__all__ = [
    "AutoPEARKernelForCausalLM",
    "MisalignedExampleError",
    "PEARDataCollator",
    "PEARDataset",
    "PEARSFTTrainer",
    "PEARTrainer",
    "apply_pear_kernel",
    "apply_pear_kernel_to_llama",
    "apply_pear_kernel_to_qwen2",
    "apply_pear_kernel_to_qwen3",
    "require_pear_forward",
    "pear_state",
    "build_example",
    "collect_behavior_logprobs",
    "ingest_generation_logprobs",
    "load_pear_dataset",
    "pear_sft_config",
    "read_collected",
    "read_records",
    "remove_pear_kernel",
]


def __getattr__(name):
    if name == "PEARDataset":  # a datasets.Dataset subclass: datasets is imported when asked for
        from . import data

        return data.PEARDataset
    # The trainers are imported when first asked for: transformers.Trainer pulls in accelerate
    # (seconds of import time), and TRL is optional, so `import pear_kernels.transformers` stays
    # light and works with transformers alone.
    if name == "PEARTrainer":
        from .trainer import PEARTrainer

        return PEARTrainer
    if name in ("PEARSFTTrainer", "pear_sft_config"):
        from . import trl as _trl

        return getattr(_trl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
