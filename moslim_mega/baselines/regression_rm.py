"""DPA's multi-objective regression reward model: one backbone, a linear layer → D scores, MSE
on per-attribute scores (DPA §2.1; ArmoRM-style). Same backbone and budget as MOSLIM's RM.

Targets are each rating's class rescaled to [0, 1] (class / (K_i − 1)), so every dimension has the
same range in vᵀr; unlabelled heads (class −1) carry no loss.

Legend: B batch, T tokens, D dimensions (hidden size is ``hidden``).

Single process only: no ``Stage`` (no dp shard, no rank-0 save), so under ``parallel.pp > 1``
``build_engine`` refuses it. Pipelining it is more than passing ``stage``/``optim`` as the RM
trainer does: the pipeline split knows the multi-head RM's ``heads`` as the reward role's head
(parallel/pipeline.py), not this model's ``head`` read-out, and the evaluation and the save would
have to go through the engine's forward and export.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer

from ..config import Config, save_config
from ..data.template import encode_pair, pad_batch
from ..models.build import build_backbone, build_tokenizer
from ..prefs import PreferenceSpec, spec_from_config, strip_prefix
from ..reward.data import load_rm_examples
from ..reward.model import last_token_index
from ..utils.optim import Updater
from ..engine import build_engine
from ..engine.base import HeadIn
from ..training.loop import TrainLoop, loop_config
from ..utils.seed import seed_everything


class RegressionRewardModel(nn.Module):
    """Backbone + one linear read-out of D scores at the last non-padding token. Architecture only."""

    def __init__(self, backbone: nn.Module, num_dims: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, num_dims)

    def forward(self, input_ids_BT, attention_mask_BT, head=None) -> torch.Tensor:
        """scores_BD; ``head(pooled, weight, bias)`` (the last token's hidden state and the read-out's
        parameters) replaces the read-out when given: the training engine's ``reward`` role computes
        the loss there, as for the multi-head RM."""
        hidden_BTD = self.backbone(input_ids=input_ids_BT, attention_mask=attention_mask_BT).last_hidden_state
        idx_B = last_token_index(attention_mask_BT)
        pooled = hidden_BTD[torch.arange(hidden_BTD.shape[0]), idx_B]
        if head is not None:
            return head(pooled, self.head.weight, self.head.bias)
        return self.head(pooled)  # scores_BD


def regression_targets(labels_BD: torch.Tensor, num_classes) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_BD = class / (K_i − 1), mask_BD = labelled)."""
    k_D = torch.tensor([max(1, k - 1) for k in num_classes], dtype=torch.float32)
    mask_BD = (labels_BD >= 0).float()
    return labels_BD.clamp(min=0).float() / k_D, mask_BD


def _regression_micro_loss(out: HeadIn, micro: dict, num_classes) -> tuple[torch.Tensor, dict]:
    """The engine's loss function: masked MSE of the read-out ``out`` feeds (same linear as ``head``)."""
    scores_BD = F.linear(out.hidden_BD, out.weight_CD, out.bias_C)
    return masked_mse(scores_BD, *regression_targets(micro["labels_BD"], num_classes)), {}


def masked_mse(pred_BD: torch.Tensor, y_BD: torch.Tensor, mask_BD: torch.Tensor) -> torch.Tensor:
    return ((pred_BD.float() - y_BD).square() * mask_BD).sum() / mask_BD.sum().clamp(min=1)


def train_regression_rm(cfg: Config, data_dir, out_dir, show_progress: bool = True) -> dict:
    """Train on ``data_dir/rm_train.jsonl`` with cfg.rm's backbone and budget; save to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    seed_everything(cfg.run.seed, cfg.run.num_threads)
    rc, spec = cfg.rm, spec_from_config(cfg.prefs)
    tokenizer = build_tokenizer(rc.model, spec.names)
    pad = tokenizer.pad_token_id
    train = load_rm_examples(Path(data_dir) / "rm_train.jsonl", spec, tokenizer, rc.max_length)
    held = load_rm_examples(Path(data_dir) / "rm_eval.jsonl", spec, tokenizer, rc.max_length)
    model = RegressionRewardModel(build_backbone(rc.model, tokenizer, cfg.run.seed), len(spec)).train()
    steps_per_epoch = math.ceil(len(train) / rc.batch_size)
    total = max(1, math.ceil(rc.epochs * steps_per_epoch))
    engine = build_engine(cfg.parallel, lambda: model, lambda m: Updater(
        m.parameters(), rc.lr, rc.weight_decay, rc.warmup_steps, rc.grad_clip, total), "reward", "regression_rm",
        label="regression rm")
    gen = torch.Generator().manual_seed(cfg.run.seed)
    order: list[int] = []
    loss_fn = partial(_regression_micro_loss, num_classes=spec.num_classes)

    def body(step: int) -> dict:
        nonlocal order
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(train), generator=gen).tolist()
        i0 = (step % steps_per_epoch) * rc.batch_size
        ids_BT, mask_BT, labels_BD = train.batch(order[i0 : i0 + rc.batch_size], pad)
        engine.train_step([{"ids_BT": ids_BT, "mask_BT": mask_BT, "labels_BD": labels_BD}], loss_fn, step)
        return {}

    # Single process, no metrics file and no checkpoints: the baseline is cheap to rerun.
    result = TrainLoop(loop_config("regression rm", total, rc, "rm", show_progress)).run(0, body)
    model.eval()
    report = {"steps": result["steps"], "train_seconds": result["train_seconds"],
              **evaluate_regression(model, held, spec, pad)}
    model.backbone.save_pretrained(out / "backbone", safe_serialization=True)
    tokenizer.save_pretrained(out / "backbone")
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, out / "head.safetensors")
    (out / "regression_rm.json").write_text(json.dumps({"spec": spec.to_dict(), "max_length": rc.max_length}))
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    return report


@torch.no_grad()
def evaluate_regression(model, examples, spec: PreferenceSpec, pad_id: int) -> dict:
    """Held-out MSE and Pearson correlation per dimension (targets in [0, 1])."""
    preds, ys, masks = [], [], []
    for s in range(0, len(examples), 128):
        ids_BT, mask_BT, labels_BD = examples.batch(list(range(s, min(s + 128, len(examples)))), pad_id)
        y, m = regression_targets(labels_BD, spec.num_classes)
        preds.append(model(ids_BT, mask_BT).float())
        ys.append(y)
        masks.append(m)
    p, y, m = torch.cat(preds), torch.cat(ys), torch.cat(masks)
    out = {}
    for i, name in enumerate(spec.names):
        sel = m[:, i] > 0
        a, b = p[sel, i], y[sel, i]
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item() if sel.sum() > 1 else math.nan
        out[name] = {"mse": float((a - b).square().mean()), "pearson": corr}
    return {"heads": out}


class LoadedRegressionRM:
    """A trained regression RM ready to score (prompt prefixes stripped, as MOSLIM's RM does)."""

    def __init__(self, path):
        path = Path(path)
        meta = json.loads((path / "regression_rm.json").read_text())
        self.spec = PreferenceSpec.from_dict(meta["spec"])
        self.max_length = int(meta["max_length"])
        self.tokenizer = AutoTokenizer.from_pretrained(path / "backbone")
        self.model = RegressionRewardModel(AutoModel.from_pretrained(path / "backbone"), len(self.spec)).eval()
        self.model.head.load_state_dict(load_file(path / "head.safetensors"))

    @torch.no_grad()
    def scores(self, prompts: list[str], responses: list[str], batch_size: int = 128) -> torch.Tensor:
        """r_BD for every (prompt, response)."""
        seqs = [encode_pair(self.tokenizer, strip_prefix(p, self.spec), r, self.max_length)
                for p, r in zip(prompts, responses)]
        out = []
        for s in range(0, len(seqs), batch_size):
            ids_BT, mask_BT = pad_batch(seqs[s : s + batch_size], self.tokenizer.pad_token_id)
            out.append(self.model(ids_BT, mask_BT).float())
        return torch.cat(out)
