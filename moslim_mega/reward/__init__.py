"""The multi-head classification reward model: ``load_reward_model(path)`` loads a trained one."""

from .io import LoadedRewardModel, load_reward_model

__all__ = ["LoadedRewardModel", "load_reward_model"]
