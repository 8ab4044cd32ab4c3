"""pear_kernels: fused PEAR loss kernels for SFT that prepares for RL.

Public API: fused_pear_loss, PEARLoss, PEARConfig, Variant, pear_weights, pear_log_weights,
reference_pear_loss (the materialised-logits oracle), PEARStats, and set_chunk_budget (the
memory one chunk of logits may use).
"""

from .config import PEARConfig, Variant
from .distill import PEARDistillLoss, fused_pear_distill_loss
from .importance import pear_log_weights, pear_weights
from .inputs import set_chunk_budget
from .logprobs import fused_token_logprobs
from .loss import PEARLoss, fused_pear_loss
from .ops.dispatch import native_status
from .reference import reference_pear_loss
from .stats import PEARStats

__version__ = "0.1.0"

__all__ = [
    "PEARConfig",
    "PEARLoss",
    "PEARStats",
    "Variant",
    "PEARDistillLoss",
    "fused_pear_distill_loss",
    "fused_pear_loss",
    "fused_token_logprobs",
    "native_status",
    "pear_log_weights",
    "pear_weights",
    "reference_pear_loss",
    "set_chunk_budget",
    "__version__",
]
