"""Rollout engines: sample responses (with their sampling log-probs) from the policy."""

from .base import Generator, RolloutBatch, RolloutError, check_generate_args
from .hf import HFGenerator

__all__ = ["Generator", "HFGenerator", "RolloutBatch", "RolloutError", "check_generate_args"]
