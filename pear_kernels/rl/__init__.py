"""Reference SFT-then-RL tools: a verifiable task, an exact behavior policy, PEAR SFT, GRPO.

A tools layer above the public API: it may import transformers (lazily, in ``rl.model``);
nothing in the core imports it. See examples/sft_then_rl.py for the full experiment.
"""

from .advantages import group_advantages
from .batching import IGNORE_INDEX, TokenBatch, encode_batch
from .behavior import ChainSolverPolicy
from .evaluate import evaluate, pass_at_k
from .grpo_loss import AGGREGATIONS, fused_grpo_loss, grpo_loss
from .model import final_hidden_states, lm_head_params, tiny_qwen2
from .rollout import generate
from .sft import SFTConfig, SFTExample, collect_sft_data, sft_train
from .tasks import Problem, ReasoningGymTask, SumChainTask, check_chain, parse_answer
from .tokenizer import CharTokenizer
from .trainer import GRPOConfig, GRPOTrainer

__all__ = [
    "AGGREGATIONS", "CharTokenizer", "ChainSolverPolicy", "GRPOConfig", "GRPOTrainer",
    "IGNORE_INDEX", "Problem", "ReasoningGymTask", "SFTConfig", "SFTExample", "SumChainTask",
    "TokenBatch", "check_chain", "collect_sft_data", "encode_batch", "evaluate",
    "final_hidden_states", "fused_grpo_loss", "generate", "grpo_loss", "group_advantages",
    "lm_head_params", "parse_answer", "pass_at_k", "sft_train", "tiny_qwen2",
]
