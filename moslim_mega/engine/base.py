"""The training-engine seam: what a trainer asks of the code that owns the model's parameters.

A trainer (SFT, RM, policy controller, the regression RM baseline) never calls ``backward()`` or an
optimizer itself. It hands the engine a list of micro-batches and a *pure* loss function; the engine
owns the forward, the micro-batching (gradient accumulation, or a pipeline schedule under
``parallel.pp > 1``, or megatron-core's ``forward_backward_func``), backward, gradient clipping and
the optimizer/scheduler step. That is why the loss function never sees the model: under pipeline
parallelism no rank holds the whole model, only the last stage holds the head.

What the loss function receives is the **head output** of the engine's role, computed on the last
stage from that stage's hidden states and the micro-batch's own tensors:

==============  ==========================================================================
role            head output passed to ``loss_fn(out, micro)``
==============  ==========================================================================
``causal_lm``   :class:`LogprobOut` — per-token log p(ids[t] | ids[<t]) and entropy, under the
                engine's sampling temperature (column 0 and unattended tokens are 0); the
                fused linear → log-prob kernel, so the B×T×V logits never exist
``reward``      :class:`HeadIn` — the pooled hidden state of each row and the stacked heads'
                weight/bias, so the loss can run the fused multi-head kernel (reward/model.py)
``value``       ``values_BT`` — the value head's per-token values
==============  ==========================================================================

A micro-batch is a ``dict`` of tensors with at least ``ids_BT`` and ``mask_BT`` (right-padded
token ids and attention mask); any other key (labels, advantages, old log-probs...) is the loss
function's business and is sliced with the rows.

Gradient scale contract: ``loss_fn`` returns each micro-batch's loss already weighted by its share
of the step's global batch (e.g. a token mean × its tokens / the mini-batch's tokens), so the sum of
the micro-batch gradients *is* the step's gradient. Under data parallelism the engine's dp gradient
average is undone by the trainer's ``dp_loss_scale`` exactly as before (parallel/stage.py).

Shape legend: B rows, T tokens, D hidden size, C = ΣK_i classes of all reward heads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

MicroBatch = dict[str, torch.Tensor]
LossFn = Callable[[Any, MicroBatch], "tuple[torch.Tensor, dict[str, float]]"]
"""``loss_fn(head_output, micro) -> (weighted loss, log row)``; pure: no parameters of its own."""

ROLES = ("causal_lm", "reward", "value")


@dataclass(frozen=True)
class LogprobOut:
    """Head output of the ``causal_lm`` role."""

    logp_BT: torch.Tensor
    entropy_BT: torch.Tensor


@dataclass(frozen=True)
class HeadIn:
    """Head output of the ``reward`` role: what the (fused) multi-head classifier consumes."""

    hidden_BD: torch.Tensor
    weight_CD: torch.Tensor
    bias_C: torch.Tensor


class TrainEngine(ABC):
    """One trainable model (policy, reference-free critic, RM) and its optimizer, however sharded.

    ``train_step`` is the only place gradients are made. ``forward`` is the no-grad pass used for
    reference/old log-probs, RM scoring and values — through the same stages and schedule.
    """

    role: str
    losses_on_every_rank: bool = True
    """Whether ``loss_fn`` runs on every rank that calls ``train_step``. False for the pipeline
    engine: only its last stage runs the losses, so a loss function must not raise there (the other
    stages would wait in the schedule for ever) — a trainer checks the rows ``train_step`` returns
    instead, which every rank receives."""

    @abstractmethod
    def train_step(self, micro_batches: list[MicroBatch], loss_fn: LossFn, step: int) -> dict[str, float]:
        """zero_grad → for every micro-batch: head output, ``loss_fn``, backward → clip → optimizer
        and scheduler step. Returns the mean of the loss functions' log rows plus ``grad_norm``
        (pre-clip) and ``lr``. Raises ``NonFiniteError`` naming ``step`` on a non-finite norm."""

    @abstractmethod
    def forward(self, micro: MicroBatch) -> Any:
        """The role's head output for ``micro`` without gradients (on every rank that needs it)."""

    @abstractmethod
    def checkpoint_items(self) -> tuple[dict, dict]:
        """``({name: model}, {name: (model, optimizer)})`` for ``checkpoint.hooks.StageCheckpoints``."""

    @abstractmethod
    def export_weights(self, bucket_bytes: int = 1 << 28) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named tensors, one at a time (collective: every rank iterates); the single source
        for ``moslim export hf`` and rollout-engine weight pushes. ``bucket_bytes``: how much is
        gathered at once (``rollout.push_bucket_mb``)."""

    @property
    @abstractmethod
    def lr(self) -> float:
        """The learning rate the next step will use."""

    def scheduler_state(self) -> dict:
        """The LR scheduler's state: part of the trainer's loop state in a checkpoint (the model and
        optimizer go through ``checkpoint_items``). Engines without one return ``{}``."""
        return {}

    def load_scheduler_state(self, state: dict) -> None:
        """Restore :meth:`scheduler_state` on resume."""


def mean_log_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the mean over the rows that have it (keys sorted): how ``train_step`` reduces its
    micro-batches' log rows."""
    keys = {k for row in rows for k in row}
    return {k: sum(r[k] for r in rows if k in r) / max(1, sum(1 for r in rows if k in r)) for k in sorted(keys)}
