"""What a training stage (RM, SFT, policy) needs to know about the process layout.

``Stage(cfg.parallel)`` is created by every trainer. In a single process (no torchrun) it is inert:
no mesh, the whole batch, files written as before. Under ``torchrun`` it owns the DeviceMesh and
gives the trainer small, explicit operations: this dp rank's slice of a global batch, the loss
scales that make FSDP's gradient *average* equal the single-process gradient, gathers for
statistics, a writer that only rank 0 uses, and the full weights on rank 0 for saving.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..config import ConfigError
from . import dist as pdist
from .mesh import build_mesh, dp_rank_size, pp_rank_size
from .parallelize import build_sharded


class NullWriter:
    """The metrics writer of ranks ≠ 0 (one process writes the files)."""

    def write(self, *args, **kwargs) -> None:
        return None

    def close(self) -> None:
        return None

    # Checkpoint hooks (checkpoint/hooks.py): rank 0 owns metrics.jsonl and cuts it back on resume.
    def offset(self) -> int:
        return 0

    def truncate(self, offset: int) -> bool:
        return True


class Stage:
    def __init__(self, pc, device: str = "auto"):
        self.pc = pc
        pdist.init_distributed()
        self.mesh = build_mesh(pc)
        self.dp_rank, self.dp = dp_rank_size(self.mesh)
        self.pp = pp_rank_size(self.mesh)[1]
        """Pipeline stages: > 1 means ``build`` gives a skeleton for ``engine.build_engine``'s
        PipelineEngine (a trainer that does not pass ``stage`` there is refused)."""
        self.skeleton = self.pp > 1 or getattr(pc, "backend", "torch") == "megatron"
        """``build`` gives a meta skeleton whose engine places the weights (the pipeline engine, or
        the megatron engine, which loads them from files rank 0 writes): batches go to ``device``."""
        self._rank0: dict[int, object] = {}  # id(skeleton) → rank 0's real model, until its engine takes it
        self._engines: dict[int, object] = {}  # id(skeleton) → its pipeline engine
        self.is_main = pdist.is_main()
        self._dp_group = None if self.mesh is None else self.mesh["dp"].get_group()
        self.device = _comm_device() if self.distributed else _single_device(device)
        """Where this rank's models and batches live (``run.device``; under torchrun its local GPU when
        CUDA is available, as ``build_sharded`` places the shards)."""
        if getattr(pc, "fp8", "none") != "none" and self.device.type == "cpu" and torch.cuda.is_available():
            # Float8Linear fixes emulation at conversion time from the machine (fp8.fp8_emulate):
            # on a CUDA machine it would call torch._scaled_mm on CPU tensors.
            raise ConfigError(f"parallel.fp8={pc.fp8} with run.device=cpu on a machine with CUDA: float8 training "
                              "runs on the GPU here (run.device=auto or cuda), or set parallel.fp8=none")

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    # ---- data ----------------------------------------------------------------------------
    def shard(self, items: list) -> list:
        """This dp rank's contiguous slice of a global batch (sizes differ by at most one);
        concatenating the slices in dp order gives back the global batch."""
        n, k = len(items), self.dp
        lo = self.dp_rank * (n // k) + min(self.dp_rank, n % k)
        return items[lo : lo + n // k + (1 if self.dp_rank < n % k else 0)]

    def dp_loss_scale(self, local_denoms: torch.Tensor) -> torch.Tensor:
        """Per-term factors dp · local / global for losses that are means over ``local_denoms``
        items: FSDP averages gradients over dp ranks, so Σ_r scale_r · mean_r / dp is exactly the
        mean over the global batch (0 where the global batch has no item)."""
        local = local_denoms.detach().double()
        if self._dp_group is None:
            return torch.where(local > 0, torch.ones_like(local), torch.zeros_like(local)).float()
        total = local.to(_comm_device(), copy=True)  # a copy (all_reduce is in place); NCCL needs CUDA
        dist.all_reduce(total, group=self._dp_group)
        total = total.to(local.device)
        return torch.where(total > 0, self.dp * local / total.clamp(min=1e-30), torch.zeros_like(local)).float()

    def gather_dp(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-rank tensor (first dim may differ) over dp ranks, in dp order."""
        if self._dp_group is None:
            return t
        parts = [None] * self.dp
        dist.all_gather_object(parts, t.detach().cpu(), group=self._dp_group)
        return torch.cat(parts).to(t.device)

    def sum_dp(self, value: float) -> float:
        if self._dp_group is None:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t, group=self._dp_group)
        return float(t)

    # ---- models --------------------------------------------------------------------------
    def build(self, build_full, build_skeleton, apply):
        """This rank's model: sharded by ``apply`` over the mesh (rank 0 builds the real weights).
        Under pp > 1: the whole model as a meta-device skeleton on every rank (its config and
        parameter names), which ``engine.build_engine`` cuts into this rank's stages and fills from
        rank 0's real model (``rank0_model``) — no rank ever holds an unsplit trained copy. The same
        under ``parallel.backend=megatron``, whose engine builds its own model from rank 0's."""
        if self.skeleton:
            return self._pipeline_skeleton(build_full, build_skeleton)
        model = build_sharded(build_full, build_skeleton, apply, self.mesh, self.pc)
        return model if self.distributed else model.to(self.device)

    def _pipeline_skeleton(self, build_full, build_skeleton):
        from .pipeline import model_config

        full = build_full() if self.is_main else None
        role = "reward" if hasattr(full, "backbone") else "causal_lm"  # model_config: where the HF config is
        config, dtype, training = pdist.broadcast_object(
            (model_config(full, role), next(full.parameters()).dtype, full.training) if full is not None else None)
        with torch.device("meta"):
            skeleton = build_skeleton(config).to(dtype)
        skeleton.train(training)
        if full is not None:
            self._rank0[id(skeleton)] = full
        return skeleton

    def rank0_model(self, skeleton):
        """Rank 0's real model behind ``skeleton`` (from ``build`` under pp), handed over once;
        None on other ranks."""
        return self._rank0.pop(id(skeleton), None)

    def adopt(self, skeleton, engine) -> None:
        """``engine`` now owns ``skeleton``'s stages: ``full_model(skeleton)`` exports through it
        (anything with ``export_weights()`` under the skeleton's parameter names)."""
        self._engines[id(skeleton)] = engine

    def full_state_dict(self, model) -> dict:
        """Every rank calls this (collectives); rank 0 gets the full CPU state dict, others {}."""
        if self.mesh is None:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def full_model(self, model, build_skeleton):
        """An unsharded copy of ``model`` on rank 0 (for HF saving / generation); None elsewhere.
        Every rank must call it. Single process: the model itself. Under pp > 1 (or the megatron
        backend) the weights come from its engine's ``export_weights()`` (each rank holds only its
        stages / shards)."""
        if self.mesh is None:
            return model
        if id(model) in self._engines:
            sd = {}
            for name, t in self._engines[id(model)].export_weights():
                if self.is_main:
                    sd[name] = t.detach().cpu().clone()
            return plain_copy(model, sd, build_skeleton) if self.is_main else None
        sd = self.full_state_dict(model)
        if not self.is_main:
            return None
        return plain_copy(model, sd, build_skeleton)

    def writer(self, make):
        return make() if self.is_main else NullWriter()

    def broadcast(self, obj):
        return pdist.broadcast_object(obj)

    def pp_rank(self) -> int:
        return pp_rank_size(self.mesh)[0]

    def from_last_stage(self, obj):
        """``obj`` of the last pipeline stage's rank (where the loss functions ran), on every pp
        rank of this dp index; ``obj`` itself when pp = 1."""
        if self.pp == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, group=self.mesh["pp"].get_group(), group_src=self.pp - 1)
        return box[0]

    def barrier(self) -> None:
        pdist.barrier()


def _single_device(choice: str) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"run.device={choice}: torch.cuda.is_available() is False on this machine")
    return torch.device("cuda", torch.cuda.current_device())


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def plain_copy(model, full_sd: dict, build_skeleton):
    """A plain (unsharded) module of ``model``'s architecture holding ``full_sd``."""
    config = model.config if hasattr(model, "config") else model.backbone.config
    with torch.device("meta"):
        plain = build_skeleton(config)
    missing, unexpected = plain.load_state_dict(full_sd, strict=False, assign=True)
    if missing and hasattr(plain, "tie_weights"):
        # Pipeline exports name each parameter once: a tied LM head is in no export stream.
        plain.tie_weights()
        missing = [n for n in missing if plain.get_parameter(n).is_meta]
    if missing or unexpected:
        raise RuntimeError(f"full model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    buffers = dict(model.named_buffers())  # buffers are never sharded: copy them as they are
    for name, buf in plain.named_buffers():
        if name in buffers:
            mod_name, _, attr = name.rpartition(".")
            owner = plain.get_submodule(mod_name) if mod_name else plain
            owner._buffers[attr] = buffers[name].detach().clone().cpu()
    return plain.train(model.training)
