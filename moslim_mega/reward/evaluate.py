"""Evaluate or query a saved reward model (``moslim rm eval`` / ``moslim rm score``)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import load_config
from ..prefs import parse_prefix, targets_to_tensor
from .data import RMExamples, load_rm_examples
from .io import LoadedRewardModel, load_reward_model
from .mapping import RewardMapper
from .metrics import rm_report
from .trainer import single_target_rewards


def mapper_for(rm_dir: str | Path, rm: LoadedRewardModel, overrides=()) -> RewardMapper:
    """The mapping config the RM was trained with (``config.yaml``), plus ``mapping.*`` overrides."""
    cfg_path = Path(rm_dir) / "config.yaml"
    cfg = load_config(cfg_path if cfg_path.is_file() else None, list(overrides))
    return RewardMapper.from_config(rm.stats, cfg.mapping)


def evaluate_rm_dir(rm_dir, data_path, mapping_overrides=(), slices: dict | None = None) -> dict:
    """The RM's report on ``data_path``; each of ``slices`` (name → another rated file, e.g. the
    world's out-of-distribution ``rm_eval_ood.jsonl``) gets the same report under ``slices``."""
    rm = load_reward_model(rm_dir)
    mapper = mapper_for(rm_dir, rm, mapping_overrides)

    def one(path) -> dict:
        data: RMExamples = load_rm_examples(path, rm.spec, rm.tokenizer, rm.max_length)
        probs = rm.probs(data.prompts, data.responses)
        rep = rm_report(probs, data.labels_NH, data.groups, list(rm.spec.names), single_target_rewards(mapper, probs))
        rep["num_examples"] = len(data)
        rep["data"] = str(path)
        return rep

    report = one(data_path)
    if slices:
        report["slices"] = {name: one(path) for name, path in slices.items()}
    return report


def score_one(rm_dir, prompt: str, response: str, mapping_overrides=()) -> dict:
    rm = load_reward_model(rm_dir)
    mapper = mapper_for(rm_dir, rm, mapping_overrides)
    targets, stripped = parse_prefix(prompt, rm.spec)
    probs = rm.probs([stripped], [response])
    targets_BH = targets_to_tensor([targets], rm.spec)
    per_head = mapper.per_head(probs, targets_BH)[0]
    heads = {}
    for i, dim in enumerate(rm.spec.dimensions):
        p = probs[i][0]
        heads[dim.name] = {
            "probs": {str(level): round(float(p[c]), 6) for c, level in enumerate(dim.levels)},
            "expected_level": float((p * torch.arange(dim.num_classes)).sum()) + dim.first_level,
            "target_level": None if dim.name not in targets else dim.first_level + targets[dim.name],
            "mapped_term": float(per_head[i]),
        }
    return {
        "prompt_seen_by_rm": stripped,
        "targets": {k: rm.spec[k].first_level + v for k, v in targets.items()},
        "heads": heads,
        "reward": float(mapper(probs, targets_BH)[0]),
        "mapping": {"kind": mapper.kind, "normalize_by": mapper.normalize_by},
    }
