"""The torch training engine: today's single-process / FSDP2 / tensor-parallel path behind
:class:`~moslim_mega.engine.base.TrainEngine`.

The model is built (and sharded) by the trainer through ``parallel.stage.Stage`` as before; this
engine holds it with its ``utils.optim.Updater`` (AdamW, warm-up/decay, clipping, the finite-norm
check) and runs every gradient the trainers make: zero_grad → per micro-batch head output →
``loss_fn`` → backward → clip + optimizer + scheduler step. On one CPU thread a step is the same
op sequence as the trainers' hand-written loops it replaces, so their numbers are bitwise unchanged.

Shape legend: B rows, T tokens, D hidden size, C = ΣK_i classes of all reward heads.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from ..algos.core import check_finite
from ..algos.logprob import sequence_logprobs
from ..config import KernelsConfig
from ..parallel.export import export_hf_weights
from ..utils.optim import Updater
from .base import ROLES, HeadIn, LogprobOut, LossFn, MicroBatch, TrainEngine, mean_log_rows


class TorchEngine(TrainEngine):
    """One trainable torch module (plain, FSDP2 or DTensor-sharded) and its ``Updater``.

    ``name`` is the module's key in the stage's checkpoints (``model``, ``rm``, ``actor``,
    ``critic``: kept from the trainers' checkpoints so older runs resume); ``label`` names the
    stage in errors ("step 3: sft loss is not finite").
    """

    def __init__(self, model, updater: Updater, role: str, name: str, label: str | None = None,
                 temperature: float = 1.0, kernels: KernelsConfig | None = None):
        if role not in ROLES:
            raise ValueError(f"engine role {role!r}: expected one of {', '.join(ROLES)}")
        self.model, self.updater, self.role, self.name = model, updater, role, name
        self.label = label or name
        # causal_lm: log-probs under the sampler's temperature, so that ratios and KL compare like
        # with like (as verl/OpenRLHF do); 0 (greedy) has no distribution and means 1.
        self.temperature = temperature if temperature > 0 else 1.0
        self.kernels = kernels or KernelsConfig()

    # ---- gradients ------------------------------------------------------------------------
    def train_step(self, micro_batches: list[MicroBatch], loss_fn: LossFn, step: int) -> dict[str, float]:
        self.updater.zero_grad()
        rows = []
        for micro in micro_batches:
            loss, row = self._loss(micro, loss_fn)
            check_finite(loss, f"{self.label} loss", step)
            loss.backward()  # accumulates: each loss is already weighted by its share of the step
            rows.append(row)
        grad_norm = self.updater.step(step, f"{self.label} gradient norm")
        return {**mean_log_rows(rows), "grad_norm": grad_norm, "lr": self.lr}

    def _loss(self, micro: MicroBatch, loss_fn: LossFn):
        if self.role == "reward":
            # The loss runs *inside* the model's forward on the pooled state and the stacked heads'
            # parameters, so the fused multi-head kernel computes it from hidden + weights directly
            # (and under FSDP2 the heads' parameters are gathered there).
            return self.model(micro["ids_BT"], micro["mask_BT"], head=lambda h, w, b: loss_fn(HeadIn(h, w, b), micro))
        return loss_fn(self._head_output(micro), micro)

    def _head_output(self, micro: MicroBatch) -> Any:
        ids_BT, mask_BT = micro["ids_BT"], micro["mask_BT"]
        if self.role == "causal_lm":
            kc = self.kernels
            return LogprobOut(*sequence_logprobs(self.model, ids_BT, mask_BT, temperature=self.temperature,
                                                 chunk_size=kc.logprob_chunk, impl=kc.impl))
        if self.role == "value":
            return self.model(ids_BT, mask_BT)
        return self.model(ids_BT, mask_BT, head=HeadIn)

    # ---- everything else --------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, micro: MicroBatch) -> Any:
        return self._head_output(micro)

    def checkpoint_items(self) -> tuple[dict, dict]:
        return {self.name: self.model}, {self.name: (self.model, self.updater.opt)}

    def export_weights(self, bucket_bytes: int = 1 << 28) -> Iterator[tuple[str, torch.Tensor]]:
        return export_hf_weights(self.model, bucket_bytes)

    @property
    def lr(self) -> float:
        return self.updater.lr

    def scheduler_state(self) -> dict:
        return self.updater.sched.state_dict()

    def load_scheduler_state(self, state: dict) -> None:
        self.updater.sched.load_state_dict(state)
