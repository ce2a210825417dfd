"""Save and load a trained multi-head reward model with its mapping statistics.

Layout of an RM directory::

    rm.json               format version, class counts, preference spec, and the input the RM was
                          trained on: ``max_length`` (tokens kept, left-truncated) and
                          ``chat_template`` (the tokenizer's template, null = plain text)
    backbone/             HF model (safetensors + config) and the tokenizer
    heads.safetensors     the [ΣK, D] head weight and bias
    mapping_stats.json    RunningClassStats (per head/class mean and std for Eq. 11)
    config.yaml           the resolved training config (written by the trainer)

``load_reward_model(path)`` is the documented loader; the backbone also loads on its own with
``transformers.AutoModel.from_pretrained(path + "/backbone")``. A loaded RM scores with the
truncation and template it was trained with, so rewards come from inputs of the kind it saw;
a caller may override ``max_length`` explicitly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer

from ..data.template import encode_pair, pad_batch
from ..prefs import PreferenceSpec, strip_prefix
from .mapping import RunningClassStats
from .model import MultiHeadRewardModel

FORMAT_VERSION = 1


class RewardModelLoadError(ValueError):
    """An RM directory that is missing files or has an unknown format."""


def save_reward_model(model: MultiHeadRewardModel, tokenizer, spec: PreferenceSpec, stats, out_dir, *,
                      max_length: int) -> Path:
    """Write an RM directory; ``max_length`` is the truncation the RM was trained with (``rm.max_length``)."""
    _check_max_length(max_length, "max_length")
    out = Path(out_dir)
    (out / "backbone").mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(out / "backbone", safe_serialization=True)
    tokenizer.save_pretrained(out / "backbone")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.heads.state_dict().items()}, out / "heads.safetensors")
    stats.to_json(out / "mapping_stats.json")
    meta = {"format_version": FORMAT_VERSION, "num_classes": list(model.num_classes), "spec": spec.to_dict(),
            "max_length": int(max_length), "chat_template": getattr(tokenizer, "chat_template", None)}
    (out / "rm.json").write_text(json.dumps(meta, indent=2))
    return out


@dataclass
class LoadedRewardModel:
    """A reward model ready to score: model (eval mode), tokenizer, spec and mapping statistics."""

    model: MultiHeadRewardModel
    tokenizer: object
    spec: PreferenceSpec
    stats: RunningClassStats
    max_length: int
    """Tokens kept per (prompt, response), left-truncated: the RM's training ``rm.max_length``."""

    def _batches(self, prompts: list[str], responses: list[str], batch_size: int):
        """(start, ids_BT, mask_BT) on the model's device; preference prefixes are stripped first."""
        device = next(self.model.parameters()).device
        seqs = [
            encode_pair(self.tokenizer, strip_prefix(p, self.spec), r, self.max_length)
            for p, r in zip(prompts, responses)
        ]
        for start in range(0, len(seqs), batch_size):
            ids_BT, mask_BT = pad_batch(seqs[start : start + batch_size], self.tokenizer.pad_token_id)
            yield start, ids_BT.to(device), mask_BT.to(device)

    @torch.no_grad()
    def probs(self, prompts: list[str], responses: list[str], batch_size: int = 64) -> list[torch.Tensor]:
        """Per-head class probabilities ``[N, K_i]``; preference prefixes are stripped first."""
        chunks = []
        for _, ids_BT, mask_BT in self._batches(prompts, responses, batch_size):
            chunks.append([torch.softmax(x.float(), dim=-1).cpu() for x in self.model(ids_BT, mask_BT)])
        return [torch.cat([c[i] for c in chunks]) for i in range(len(self.spec))]

    @torch.no_grad()
    def score(
        self, prompts: list[str], responses: list[str], targets_BH: torch.Tensor, mapper, impl: str | None = None,
        batch_size: int = 64,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-head probabilities ``[N, K_i]`` and the mapped reward ``[N]`` (``mapper``, Eq. 11) from
        one fused head pass per batch (Triton on CUDA, the eager reference elsewhere; issue 7)."""
        probs, rewards = [], []
        for start, ids_BT, mask_BT in self._batches(prompts, responses, batch_size):
            t_BH = targets_BH[start : start + ids_BT.shape[0]].to(ids_BT.device)
            probs_BC, reward_B = self.model(ids_BT, mask_BT, head=lambda h, w, b: mapper.head_rewards(
                h, w, b, self.model.num_classes, t_BH, impl=impl))
            probs.append(probs_BC.float().cpu())
            rewards.append(reward_B.float().cpu())
        probs_NC = torch.cat(probs)
        return list(torch.split(probs_NC, list(self.model.num_classes), dim=1)), torch.cat(rewards)


def _check_max_length(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RewardModelLoadError(f"{field}={value!r}: expected an integer >= 0 (0 = no truncation)")
    return value


def _trained_max_length(path: Path, meta: dict) -> int:
    """The truncation the RM was trained with: rm.json's record, or (RM directories written
    before it was recorded) the ``rm.max_length`` of the run's saved config.yaml."""
    if "max_length" in meta:
        return _check_max_length(meta["max_length"], f"{path}/rm.json: max_length")
    config = path / "config.yaml"
    saved = yaml.safe_load(config.read_text()) if config.is_file() else None
    rm = saved.get("rm") if isinstance(saved, dict) else None
    if not isinstance(rm, dict) or "max_length" not in rm:
        raise RewardModelLoadError(
            f"{path}: rm.json has no max_length and there is no config.yaml with rm.max_length, so the "
            "truncation this RM was trained with is unknown; pass max_length= explicitly")
    return _check_max_length(rm["max_length"], f"{config}: rm.max_length")


def load_reward_model(path: str | Path, device: str = "cpu", max_length: int | None = None,
                      weights: bool = True) -> LoadedRewardModel:
    """Load an RM directory written by :func:`save_reward_model` (or ``moslim rm train``).

    It scores with the ``max_length`` it was trained with unless ``max_length`` is given here.
    ``weights=False``: everything but the model (``model`` is None), for a caller that builds the
    model itself — the policy's pipelined RM, whose ranks never load it whole (policy/workers.py).
    """
    path = Path(path)
    for name in ("rm.json", "heads.safetensors", "mapping_stats.json", "backbone"):
        if not (path / name).exists():
            raise RewardModelLoadError(f"{path}: not a reward-model directory (missing {name})")
    meta = json.loads((path / "rm.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise RewardModelLoadError(f"{path}/rm.json: unsupported format_version {meta.get('format_version')!r}")
    max_length = _trained_max_length(path, meta) if max_length is None else _check_max_length(max_length, "max_length")
    spec = PreferenceSpec.from_dict(meta["spec"])
    tokenizer = AutoTokenizer.from_pretrained(path / "backbone")
    if "chat_template" in meta and getattr(tokenizer, "chat_template", None) != meta["chat_template"]:
        # The template is saved with the tokenizer too; two records that disagree mean edited files.
        raise RewardModelLoadError(f"{path}/backbone: the tokenizer's chat template differs from the one in "
                                   "rm.json that the RM was trained with")
    stats = RunningClassStats.from_json(path / "mapping_stats.json")
    if not weights:
        return LoadedRewardModel(None, tokenizer, spec, stats, max_length)
    model = MultiHeadRewardModel(AutoModel.from_pretrained(path / "backbone"), tuple(meta["num_classes"]))
    model.heads.load_state_dict(load_file(path / "heads.safetensors"))
    return LoadedRewardModel(model.to(device).eval(), tokenizer, spec, stats, max_length)
