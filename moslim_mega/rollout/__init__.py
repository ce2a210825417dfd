"""Rollout engines behind one seam: sample responses (with their sampling log-probs) from the policy."""

from .base import (RolloutBatch, RolloutEngine, RolloutError, assemble_batch, check_generate_args, encode_prompts,
                   generate_texts)
from .factory import build_rollout_engine, engine_from_dir
from .hf import HFEngine

__all__ = ["HFEngine", "RolloutBatch", "RolloutEngine", "RolloutError", "assemble_batch", "build_rollout_engine",
           "engine_from_dir",
           "check_generate_args", "encode_prompts", "generate_texts"]
