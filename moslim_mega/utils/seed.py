"""Seeding and thread setup shared by every stage."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int, num_threads: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if num_threads > 0:
        torch.set_num_threads(num_threads)
