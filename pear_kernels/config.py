"""PEARConfig: the knobs of the PEAR importance weight, validated once, in one place.

Defaults follow docs/pear_math.md (the paper's recommended settings): token variant, gamma 0.999, block size 4,
per-decision log-ratio clip [-0.08, 0.3], log-weight clip [-10, 5].
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Tuple

__all__ = ["PEARConfig", "Variant", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum", "none")
# Positions and block ends are int64; (rank // B + 1) * B must not overflow for any rank.
MAX_BLOCK_SIZE = 2**62


class Variant(str, enum.Enum):
    """How the per-token log-ratios are turned into one log-weight per token."""

    TOKEN = "token"  # discounted product of the ratios of the strictly later tokens
    BLOCK = "block"  # the token weight taken at the end of each block of `block_size` tokens
    SEQUENCE = "sequence"  # one undiscounted weight for the whole sequence
    NONE = "none"  # weight 1: plain SFT through the same fused path

    @classmethod
    def parse(cls, value: "Variant | str") -> "Variant":
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        allowed = ", ".join(repr(v.value) for v in cls)
        raise ValueError(f"variant must be one of {allowed}, got {value!r}")


def _as_pair(name: str, value: Any) -> Tuple[float, float]:
    try:
        low, high = value
        low, high = float(low), float(high)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if math.isnan(low) or math.isnan(high):
        raise ValueError(f"{name} must not contain NaN, got {value!r}")
    if low > high:
        raise ValueError(f"{name} must satisfy low <= high, got ({low}, {high})")
    return low, high


@dataclass(frozen=True)
class PEARConfig:
    """Parameters of the PEAR weight (see docs/pear_math.md).

    Attributes:
        variant: "token" (default), "block", "sequence" or "none".
        gamma: per-token discount in (0, 1]; the token and block weights carry gamma^(#later tokens).
        block_size: tokens per block for the block variant (>= 1; 1 equals the token variant).
        delta_clip: (low, high) clip of each per-token log-ratio log pi_theta - log pi_beta.
        log_weight_clip: (low, high) clip of the log-weight before exponentiation.
    """

    variant: Variant = Variant.TOKEN
    gamma: float = 0.999
    block_size: int = 4
    delta_clip: Tuple[float, float] = field(default=(-0.08, 0.3))
    log_weight_clip: Tuple[float, float] = field(default=(-10.0, 5.0))

    def __post_init__(self) -> None:
        object.__setattr__(self, "variant", Variant.parse(self.variant))
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)):
            raise TypeError(f"gamma must be a number in (0, 1], got {self.gamma!r}")
        gamma = float(self.gamma)
        if not (0.0 < gamma <= 1.0):
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma!r}")
        object.__setattr__(self, "gamma", gamma)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise TypeError(f"block_size must be an int >= 1, got {self.block_size!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.block_size > MAX_BLOCK_SIZE:
            # token positions are int64: a larger block is one block per sequence anyway
            raise ValueError(
                f"block_size must be <= {MAX_BLOCK_SIZE} (int64 positions), got {self.block_size}"
            )
        object.__setattr__(self, "delta_clip", _as_pair("delta_clip", self.delta_clip))
        object.__setattr__(self, "log_weight_clip", _as_pair("log_weight_clip", self.log_weight_clip))

    @property
    def log_gamma(self) -> float:
        return math.log(self.gamma)

    def with_overrides(self, **overrides: Any) -> "PEARConfig":
        """A copy with the given fields replaced; ``None`` values leave a field as it is."""
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown PEARConfig field(s): {sorted(unknown)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, **given) if given else self

    @classmethod
    def coerce(cls, config: Any) -> "PEARConfig":
        """``config`` as a PEARConfig: None gives the defaults, a mapping its fields."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            names = {f.name for f in fields(cls)}
            unknown = set(config) - names
            if unknown:
                raise TypeError(f"config has unknown PEARConfig field(s): {sorted(unknown)}")
            return cls(**config)
        raise TypeError(f"config must be a PEARConfig, a dict of its fields or None, got {type(config).__name__}")

    def to_dict(self) -> dict:
        return {
            "variant": self.variant.value,
            "gamma": self.gamma,
            "block_size": self.block_size,
            "delta_clip": list(self.delta_clip),
            "log_weight_clip": list(self.log_weight_clip),
        }
