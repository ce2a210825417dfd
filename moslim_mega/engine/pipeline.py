"""The pipeline-parallel training engine of the torch backend (``parallel.pp > 1``).

Legend: B rows, T tokens, m micro-batches, S = pp × pp_stages_per_rank stages.

Each pp rank holds its stage(s) of the model (parallel/pipeline.py), each stage FSDP2-sharded over
``dp``. ``train_step`` runs one ``torch.distributed.pipelining`` schedule (GPipe, 1F1B or
interleaved 1F1B) over the trainer's micro-batches: only the hidden states cross ranks, the last
stage turns its hidden states into the role's head output and calls the trainer's ``loss_fn`` there,
one micro-batch at a time, and backward flows back through the stages. The schedule is told not to
scale gradients (``scale_grads=False``): the loss functions are already weighted by their share of
the step's batch (engine/base.py), so the summed micro-batch gradients are the step's gradient.

The schedule needs one shape for every micro-batch of a step (its receive buffers are sized once),
so ragged micro-batches are padded to the step's largest (B, T) — extra rows attend one token,
extra columns none — and the head output is cut back to each micro-batch's own rows and columns
before ``loss_fn`` sees it: padding never reaches a loss, so it adds no gradient. Schedules (and
their stages' static shapes, :meth:`PipelineEngine._metas`) are cached per padded shape.

Gradient clipping uses the norm over all stages (the squared norms summed over the pp group), so
every rank clips by the single-process factor; AdamW, warm-up and the non-finite check are
``utils.optim.Updater``'s.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from ..algos.core import NonFiniteError
from ..config import ConfigError
from ..parallel.export import _gather, hf_name
from ..parallel.grad import clip_grad_norm_
from ..parallel.mesh import pp_rank_size
from ..parallel.pipeline import parallelize_stage, split_model, stage_ids
from ..utils.optim import Updater
from .base import ROLES, HeadIn, LogprobOut, LossFn, MicroBatch, TrainEngine

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}
_CACHE_SIZE = 8


class PipelineUpdater(Updater):
    """``Updater`` whose gradient norm spans every pipeline stage (the pp group)."""

    def __init__(self, params, pp_group, **kw):
        super().__init__(params, **kw)
        self.pp_group = pp_group

    def step(self, step: int | None = None, what: str = "gradient norm") -> float:
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = clip_grad_norm_(self.params, max_norm, sum_groups=(self.pp_group,))
        if not bool(torch.isfinite(norm)):  # the same all-reduced norm on every rank: all raise
            raise NonFiniteError(f"step {step}: {what} is not finite")
        self.opt.step()
        self.sched.step()
        return float(norm)


class PipelineEngine(TrainEngine):
    """One model cut into pipeline stages over ``mesh["pp"]`` (see the module docstring).

    ``model``: the whole model, identical on every rank (same seed or checkpoint); this rank keeps
    only its stages. ``optim``: the ``Updater`` keywords (lr, weight_decay, warmup_steps,
    grad_clip, total_steps); None with ``train=False`` gives a frozen, forward-only engine (the
    policy's reference and RM). ``temperature`` / ``logprob_chunk`` / ``kernels_impl``: the fused
    log-prob head of the ``causal_lm`` role.
    """

    losses_on_every_rank = False  # the last stage runs them (engine/base.py)

    def __init__(self, model, role: str, mesh, pc, optim: dict | None = None, name: str = "model",
                 temperature: float = 1.0, logprob_chunk: int = 8192, kernels_impl: str | None = None,
                 train: bool = True, _rank0_model=None, label: str | None = None):
        if role not in ROLES:
            raise ConfigError(f"engine role {role!r}: one of {', '.join(ROLES)}")
        if mesh is None or "pp" not in (mesh.mesh_dim_names or ()):
            raise ConfigError("parallel.pp: the pipeline engine needs a (pp, dp, tp) DeviceMesh (parallel/mesh.py)")
        self.role, self.pc, self.mesh, self.name = role, pc, mesh, name
        self.label = label or name
        self.pp_rank, self.pp = pp_rank_size(mesh)
        self.pp_group = mesh["pp"].get_group()
        v = pc.pp_stages_per_rank if pc.pp_schedule == "interleaved_1f1b" else 1
        self.num_stages = self.pp * v
        self._export_plan = self._plan_export(model)  # before the split: the whole model's names
        stages = split_model(model, role, stage_ids(self.pp_rank, self.pp, v), self.num_stages,
                             temperature=temperature, logprob_chunk=logprob_chunk, kernels_impl=kernels_impl)
        self.stages = [parallelize_stage(s, mesh, pc, train) for s in stages]
        self._owner = self._owners()
        if next(self.stages[0].parameters()).is_meta:
            self._materialize(_rank0_model)
        self.device = next(self.stages[0].parameters()).device
        params = [p for s in self.stages for p in s.parameters()]
        self.updater = PipelineUpdater(params, self.pp_group, **optim) if optim is not None else None
        self._schedules: dict[tuple, Any] = {}
        self._step_state: dict = {}

    @classmethod
    def from_rank0(cls, build_full, build_skeleton, role: str, mesh, pc, **kw) -> "PipelineEngine":
        """As ``parallel.parallelize.build_sharded``: only rank 0 builds the real model
        (``build_full()``: random init or a checkpoint); every rank cuts its stages from a meta-device
        ``build_skeleton(config)`` and receives its own parameters (its FSDP shards) from rank 0."""
        from ..parallel import dist as pdist
        from ..parallel.pipeline import model_config

        full = build_full() if pdist.rank() == 0 else None
        config, dtype = pdist.broadcast_object(
            (model_config(full, role), next(full.parameters()).dtype) if full is not None else None)
        with torch.device("meta"):
            skeleton = build_skeleton(config).to(dtype)
        if full is not None:
            skeleton.train(full.training)
        return cls(skeleton, role, mesh, pc, _rank0_model=full, **kw)

    def _materialize(self, full) -> None:
        """Allocate the meta-device stages and fill them from rank 0's ``full`` model, one tensor at
        a time over the world (each rank keeps what its stages hold, FSDP shards sliced locally)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        from ..parallel import dist as pdist

        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        for s in self.stages:
            s.to_empty(device=device)
        mine = {n: p for s in self.stages for n, p in s.named_parameters()}
        state = full.state_dict() if full is not None else {}
        with torch.no_grad():
            for name, shape, dtype in self._export_plan:
                t = state[name].to(device) if full is not None else torch.empty(shape, dtype=dtype, device=device)
                dist.broadcast(t, src=0)
                p = mine.get(name)
                if isinstance(p, DTensor):
                    p.to_local().copy_(distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None).to_local())
                elif p is not None:
                    p.copy_(t)
            # Non-persistent buffers (rotary inv_freq) are in no state dict: copy them by name.
            buffers = pdist.broadcast_object({n: b.cpu() for n, b in full.named_buffers()} if full is not None else None)
            for s in self.stages:
                for n, b in s.named_buffers():
                    if n in buffers:
                        b.copy_(buffers[n].to(b.device))

    # ---- the seam ---------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        return self.updater.lr

    @property
    def is_last(self) -> bool:
        """This rank runs the last stage (the head and the loss functions)."""
        return any(s.is_last for s in self.stages)

    def train_step(self, micro_batches: list[MicroBatch], loss_fn: LossFn, step: int) -> dict[str, float]:
        if self.updater is None:
            raise ConfigError(f"{self.name}: built without an optimizer (a frozen model): no train_step")
        want = self.pc.pp_microbatches
        if want and len(micro_batches) != want:
            raise ConfigError(f"parallel.pp_microbatches={want}: the trainer passed {len(micro_batches)} micro-batches")
        for s in self.stages:
            s.train()
        self.updater.zero_grad()
        ids_BT, mask_BT, shape = _stack_padded(micro_batches)
        rows: dict[int, dict] = {}
        self._step_state = {"micro": micro_batches, "loss_fn": loss_fn, "rows": rows, "B": shape[1]}
        schedule = self._schedule(len(micro_batches), shape, train=True)
        target = torch.arange(len(micro_batches), device=self.device)  # micro-batch index: which loss inputs
        args = (ids_BT.to(self.device),) if self.stages[0].is_first else ()
        schedule.step(*args, target=target, return_outputs=False, mask_BT=mask_BT.to(self.device),
                      ids_BT=ids_BT.to(self.device))
        self._step_state = {}
        grad_norm = self.updater.step(step, f"{self.label} gradient norm")
        logged = self._from_last([rows[i] for i in sorted(rows)] if self.is_last else None)
        out = {k: sum(r[k] for r in logged) / len(logged) for k in logged[0]} if logged else {}
        return {**out, "grad_norm": grad_norm, "lr": self.lr}

    @torch.no_grad()
    def forward(self, micro: MicroBatch) -> Any:
        """The head output on every rank of the pp group (broadcast from the last stage). The rows
        are cut into up to pp micro-batches so the stages overlap."""
        for s in self.stages:
            s.eval()
        B, T = micro["ids_BT"].shape
        n = max(1, min(B, self.pp))
        chunks = [{k: micro[k][i::n] for k in ("ids_BT", "mask_BT")} for i in range(n)]  # strided: ≤ 1 row apart
        ids_BT, mask_BT, shape = _stack_padded(chunks)
        schedule = self._schedule(n, shape, train=False)
        args = (ids_BT.to(self.device),) if self.stages[0].is_first else ()
        # return_outputs: the last stage keeps each chunk's output (read per chunk below, unmerged).
        schedule.eval(*args, return_outputs=True, mask_BT=mask_BT.to(self.device), ids_BT=ids_BT.to(self.device))
        out = None
        if self.is_last:
            last = next(s for s in self._last_stages(schedule))
            parts = [self._head_output(o, c["ids_BT"].shape) for o, c in zip(last.output_chunks, chunks)]
            out = _unstride(parts, n, B, self.role)
        return self._from_last(out)

    def checkpoint_items(self) -> tuple[dict, dict]:
        """This rank's stages under the model's own parameter names (one module, however many
        stages), for DCP: the pp ranks save disjoint keys of one checkpoint."""
        view = merged_view(self.stages)
        view.flatten_optimizer_state = True  # per-name optimizer keys: see checkpoint/state.py
        return {self.name: view}, ({self.name: (view, self.updater.opt)} if self.updater is not None else {})

    def scheduler_state(self) -> dict:
        return self.updater.sched.state_dict() if self.updater is not None else {}

    def load_scheduler_state(self, state: dict) -> None:
        if self.updater is not None:
            self.updater.sched.load_state_dict(state)

    def export_weights(self, bucket_bytes: int = 1 << 28) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter in the whole model's order: its stage's ranks gather it over dp, the
        owner pp rank broadcasts it to the pp group — so every rank sees the full stream. One tensor
        at a time (``bucket_bytes`` is the seam's; a tensor is the bucket here)."""
        mine = {n: p for s in self.stages for n, p in s.named_parameters()}
        for name, shape, dtype in self._export_plan:
            owner = self._owner[name]
            if owner == self.pp_rank:
                full = _gather(mine[name]).to(self.device)
            else:
                full = torch.empty(shape, dtype=dtype, device=self.device)
            dist.broadcast(full, group=self.pp_group, group_src=owner)
            yield hf_name(name), full

    # ---- internals --------------------------------------------------------------------------
    def _plan_export(self, model) -> list[tuple[str, tuple, torch.dtype]]:
        return [(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()]

    def _owners(self) -> dict[str, int]:
        """Which pp rank holds each parameter (all-gathered once)."""
        names = [n for s in self.stages for n, _ in s.named_parameters()]
        everyone: list = [None] * self.pp
        dist.all_gather_object(everyone, names, group=self.pp_group)
        return {n: r for r, ns in enumerate(everyone) for n in ns}

    def _schedule(self, n: int, shape: tuple, train: bool):
        key = (n, shape, train)
        if key not in self._schedules:
            if len(self._schedules) >= _CACHE_SIZE:
                self._schedules.pop(next(iter(self._schedules)))
            pipe = []
            for s in self.stages:
                inputs, outputs = self._metas(s, shape[1], shape[2], train)
                pipe.append(PipelineStage(s, s.stage, self.num_stages, self.device, input_args=inputs,
                                          output_args=outputs, group=self.pp_group))
            cls = SCHEDULES[self.pc.pp_schedule]
            if cls is Schedule1F1B and n < self.num_stages:
                # 1F1B refuses fewer micro-batches than stages (a one-row probe's forward, a policy
                # step with few Online-DPO pairs); with so few there is no steady state to
                # interleave, and GPipe runs the same forwards and backwards — the same numbers.
                cls = ScheduleGPipe
            rounds = max(1, n // self.pp)
            if cls is ScheduleInterleaved1F1B and n % rounds:
                # torch's interleaved schedule walks the micro-batches in rounds of pp.
                raise ConfigError(f"parallel.pp_schedule=interleaved_1f1b: a step of {n} micro-batches on "
                                  f"parallel.pp={self.pp} must be a multiple of {rounds} (its rounds of pp); set "
                                  "parallel.pp_microbatches (or the trainer's micro-batch size) to a multiple of pp")
            loss = self._pipe_loss if train else None
            self._schedules[key] = (cls(pipe, n, loss_fn=loss, scale_grads=False) if cls is ScheduleInterleaved1F1B
                                    else cls(pipe[0], n, loss_fn=loss, scale_grads=False))
        return self._schedules[key]

    def _last_stages(self, schedule):
        stages = getattr(schedule, "_stages", None) or [schedule._stage]
        return [s for s in stages if s.is_last]

    def _pipe_loss(self, out: tuple, target: torch.Tensor) -> torch.Tensor:
        """The schedule's loss: the trainer's ``loss_fn`` on micro-batch ``target[0]``'s own rows."""
        st = self._step_state
        i = int(target[0])
        micro = st["micro"][i]
        loss, row = st["loss_fn"](self._head_output(out, micro["ids_BT"].shape), micro)
        st["rows"][i] = {k: float(v) for k, v in row.items()}
        return loss

    def _head_output(self, out: tuple, shape_BT) -> Any:
        B, T = shape_BT
        if self.role == "causal_lm":
            return LogprobOut(out[0][:B, :T], out[1][:B, :T])
        if self.role == "reward":
            return HeadIn(out[0][:B], out[1], out[2])
        return out[:B, :T]

    def _metas(self, stage, B: int, T: int, train: bool) -> tuple[tuple, tuple]:
        """Example (input, output) tensors of one stage at the padded (B, T), on the meta device:
        static shapes spare the schedule its shape inference (a forward + backward with garbage
        values, the latter through the trainer's loss_fn). The hidden input requires grad in
        training, or the stage would not send its input gradient back."""
        D = stage.decoder.config.hidden_size
        dtype = torch.bfloat16 if self.pc.mixed_precision == "bf16" else next(stage.parameters()).dtype
        meta = torch.device("meta")
        hidden = torch.empty(B, T, D, dtype=dtype, device=meta)
        inputs = (torch.empty(B, T, dtype=torch.long, device=meta),) if stage.is_first else (hidden.requires_grad_(train),)
        if not stage.is_last:
            return inputs, (torch.empty(B, T, D, dtype=dtype, device=meta).requires_grad_(train),)
        f32 = torch.float64 if dtype == torch.float64 else torch.float32  # the fused log-prob's output dtype
        if self.role == "causal_lm":
            outputs = (torch.empty(B, T, dtype=f32, device=meta), torch.empty(B, T, dtype=f32, device=meta))
        elif self.role == "reward":
            C = stage.heads.weight.shape[0]
            outputs = (torch.empty(B, D, dtype=dtype, device=meta), torch.empty(C, D, dtype=dtype, device=meta),
                       torch.empty(C, dtype=dtype, device=meta))
        else:
            outputs = (torch.empty(B, T, dtype=torch.float32, device=meta),)
        return inputs, tuple(o.requires_grad_(train) for o in outputs)

    def _from_last(self, obj):
        """``obj`` of the last stage's rank, on every rank of the pp group."""
        box = [obj]
        dist.broadcast_object_list(box, group=self.pp_group, group_src=self.pp - 1)
        return box[0]


def _stack_padded(micro_batches: list[MicroBatch]) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(ids, mask) of all micro-batches padded to one (B, T) and concatenated along rows, so the
    schedule's row split gives back one padded micro-batch each. Extra rows attend their first
    token (a fully masked row can make attention NaN, and NaN × 0 gradients are still NaN)."""
    B = max(mb["ids_BT"].shape[0] for mb in micro_batches)
    T = max(mb["ids_BT"].shape[1] for mb in micro_batches)
    ids, masks = [], []
    for mb in micro_batches:
        b, t = mb["ids_BT"].shape
        ids_BT = torch.zeros(B, T, dtype=mb["ids_BT"].dtype)
        mask_BT = torch.zeros(B, T, dtype=mb["mask_BT"].dtype)
        ids_BT[:b, :t] = mb["ids_BT"].cpu()
        mask_BT[:b, :t] = mb["mask_BT"].cpu()
        mask_BT[b:, 0] = 1
        ids.append(ids_BT)
        masks.append(mask_BT)
    return torch.cat(ids), torch.cat(masks), (len(micro_batches), B, T)


def _unstride(parts: list, n: int, B: int, role: str):
    """Undo the strided row split of ``forward``: row r came from chunk r mod n, position r // n."""
    def merge(tensors):
        out = torch.empty((B, *tensors[0].shape[1:]), dtype=tensors[0].dtype, device=tensors[0].device)
        for i, t in enumerate(tensors):
            out[i::n] = t
        return out

    if role == "causal_lm":
        return LogprobOut(merge([p.logp_BT for p in parts]), merge([p.entropy_BT for p in parts]))
    if role == "reward":
        return HeadIn(merge([p.hidden_BD for p in parts]), parts[0].weight_CD, parts[0].bias_C)
    return merge(parts)


def merged_view(stages) -> torch.nn.Module:
    """One module whose parameter names are those of all ``stages`` together: fresh containers down
    to the first module that holds parameters or buffers of its own, which is shared with the
    stage (so the view sees the live, sharded tensors and its names are the model's)."""
    if len(stages) == 1:
        return stages[0]
    view = torch.nn.Module()

    def add(dst: torch.nn.Module, name: str, src: torch.nn.Module | None) -> None:
        if src is None:
            return
        own = any(v is not None for v in src._parameters.values()) or any(v is not None for v in src._buffers.values())
        if own or not src._modules:
            if name in dst._modules:
                # Only buffer-holding modules (the rotary embedding) are on every stage; keep one.
                assert not any(True for _ in src.parameters()), f"{name}: parameters on two stages"
                return
            dst.add_module(name, src)
            return
        if name not in dst._modules:
            dst.add_module(name, torch.nn.Module())
        for child_name, child in src._modules.items():
            add(dst._modules[name], child_name, child)

    for s in stages:
        for child_name, child in s._modules.items():
            add(view, child_name, child)
    return view
