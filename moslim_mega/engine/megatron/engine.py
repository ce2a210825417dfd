"""``parallel.backend=megatron``: a :class:`TrainEngine` on megatron-core's ``GPTModel``.

Legend: B rows, T tokens, D hidden, V real vocabulary, Vs this TP rank's rows of the (padded)
output layer, N tokens with a target, C = ΣK_i reward classes.

The model is megatron-core's ``GPTModel`` (Transformer Engine layer spec when ``transformer_engine``
imports, else the local spec) built for one TP × PP layout, loaded tensor by tensor from the HF
weights through ``mapping.rank_state_dict`` — the same mapping as ``moslim convert`` — and wrapped
in megatron's ``DistributedDataParallel`` with megatron's optimizer. ``train_step`` drives
megatron's ``get_forward_backward_func()`` (no pipelining, 1F1B under pp > 1, interleaved 1F1B
under virtual pipeline stages); the role's head runs on the last stage from the final-norm hidden
states.

Virtual pipeline stages (``Layout.vpp`` > 1; ``parallel.pp_schedule=interleaved_1f1b`` with
``parallel.pp_stages_per_rank``): each rank builds vpp ``GPTModel`` chunks (``vp_stage``; chunk v
holds layer block v·pp + pp_rank, as mapping.py assigns them), each loaded from its own
``RankCoords(vp=v)`` and wrapped in its own DDP, with one optimizer over all chunks. The embedding
is on chunk 0 of the first stage, the head on the last chunk of the last stage. A step needs a
multiple of pp micro-batches (megatron-core 0.16); its micro-batches are padded at the end to one
[B, T] (no shape exchange: at pp = 2 megatron's batched p2p cannot tell the two directions apart),
and ``forward`` runs its row batch pp times (one group). Checkpoints hold one sharded state dict
per chunk ("model0", "model1", … as Megatron-LM names them).

``EngineSettings.activation_checkpointing`` turns on megatron's full recomputation of every layer
(``recompute_granularity="full"``, uniform, one layer per group): the same gradients.

The heads:

* ``causal_lm``: the output layer never makes logits. Its ``forward`` is replaced by the identity,
  and its weight (this rank's Vs vocabulary rows) feeds the project's fused linear → log-prob
  kernel (vocab-parallel under tp > 1: two all-reduces of per-row softmax states, never the N×V
  logits). Not megatron's ``vocab_parallel_cross_entropy``: that one needs this rank's N×Vs logits
  in memory and gives no entropy; the kernel gives both from the weight, as the torch engine does.
* ``reward``: the output layer is dropped; ``reward_heads`` ([C, D] + [C]) sits on the last stage
  and the loss gets :class:`HeadIn` of the last attended token's hidden state (reward/model.py's
  pooling).
* ``value``: the output layer is dropped; ``value_head`` ([1, D] + [1]) gives ``values_BT``,
  shifted one token right like models/value.py.

Padding: megatron's RoPE uses positions 0..T−1 whatever the mask, while the torch engines count
positions over the attended tokens (``cumsum(mask) − 1``). A row's attended tokens must therefore
be contiguous; rows with left padding (the policy's rollouts) are rolled to the front of their row
for the model and rolled back (``_front_aligned``), which gives the torch engines' positions.

FP8 (``EngineSettings.fp8``, ``parallel.fp8``): Transformer Engine's recipes through megatron-core's
``TransformerConfig`` (config.fp8_fields); megatron-core's TransformerBlock enters TE's
``fp8_autocast`` itself. Refused without TE, for MoE, below sm89 (MXFP8: sm100) and for GEMM dims
that are not multiples of 16 (32); the token dimension is padded here (``_run``).

Qwen2-MoE trains under expert parallelism (``ep``; not with pp > 1, nor tp > 1 without sequence
parallelism). Not here (docs/megatron.md): context parallelism.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ...algos.core import NonFiniteError
from ...reward.model import last_token_index
from ...utils.optim import warmup_decay
from ..base import ROLES, HeadIn, LogprobOut, LossFn, MicroBatch, TrainEngine
from . import require_megatron_core
from .config import gpt_model_args, transformer_config
from .convert import LAYOUT_FILE
from .dims import ConversionError, Layout, check_fp8_dims, check_layout, fp8_align, model_dims
from .mapping import RankCoords, iter_hf_tensors, rank_state_dict, rules, to_megatron

# Local spec name → Transformer Engine spec name: TE fuses each pre-norm into the next linear.
_TE_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
             "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
TE_OFF_MESSAGE = (
    "transformer_engine is not importable: the megatron engine uses megatron-core's local layer spec — "
    "unfused softmax attention (no flash/cuDNN attention), RMSNorm not fused into the following linear, "
    "no FP8, and torch's AdamW instead of TE's fused Adam. Numbers are the same; speed and memory are not.")


# Full recomputation, one layer at a time: only each layer's input is kept, as the torch backend's
# per-layer activation checkpointing does ("uniform" with 1 layer per group = every layer).
_RECOMPUTE = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


class MegatronEngineError(ConversionError):
    """A setting, role or batch the megatron engine cannot handle; names the field."""


@dataclass(frozen=True)
class EngineSettings:
    """What the engine takes from the trainer's config (the torch engine's Updater knobs)."""

    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    total_steps: int = 0
    """0 = constant after warm-up; else linear decay to 0.1 × lr (utils/optim.warmup_decay)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 = none."""
    temperature: float = 1.0
    logprob_chunk: int = 8192
    sequence_parallel: bool = False
    seed: int = 0
    use_te: bool | None = None
    """None = the TE spec when transformer_engine imports; False = always the local spec."""
    moe_aux_loss_coeff: float | None = None
    """MoE load-balancing loss coefficient; None = the HF config's ``router_aux_loss_coef``. The torch
    engine adds no aux loss (HF's is only in ``labels`` losses), so 0 trains the same objective."""
    activation_checkpointing: bool = False
    """Full recomputation (``parallel.activation_checkpointing``): each layer's activations are
    dropped after its forward and recomputed in the backward; the gradients are the same."""
    fp8: str = "none"
    """``parallel.fp8``: a Transformer Engine FP8 recipe of the decoder layers' linears
    (config.FP8_RECIPES: tensorwise, delayed, blockwise, mxfp8), or none. Needs the TE layer spec
    and a GPU with FP8 tensor cores; the embedding and the heads stay in the model's dtype."""


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _layer_spec(dims, use_te: bool):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    # SequentialMLP experts (moe_grouped_gemm=False): one linear_fc1/fc2 per expert, mapping.py's layout.
    experts = dims.num_experts or None
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(num_experts=experts, moe_grouped_gemm=False)
    return specs.get_gpt_layer_local_spec(num_experts=experts, normalization="RMSNorm")


class _Identity(nn.Module):
    """Stands where ``GPTModel`` calls its output layer: returns the hidden states as the 'logits'."""

    def __init__(self, sequence_parallel: bool):
        super().__init__()
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden_TBD, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            # Backward is a plain split, not a reduce-scatter: every head below already hands each
            # TP rank the whole gradient of the whole sequence (the replicated heads compute the
            # same loss on every rank; the vocab-parallel kernel all-reduces its hidden gradient).
            hidden_TBD = gather_from_sequence_parallel_region(hidden_TBD, tensor_parallel_output_grad=False)
        return hidden_TBD, None


class MegatronCheckpoint:
    """What ``checkpoint_items`` hands ``StageCheckpoints`` for the megatron engine: an item that
    saves and loads itself (checkpoint/manager.py calls ``save_checkpoint`` / ``load_checkpoint``
    with a directory of its own instead of putting it into the trainer's torch DCP state).

    Torch DCP cannot take this model: every rank's ``decoder.layers.0…`` — different TP shards and
    different PP stages under one name — would look like replicas, and megatron's optimizer has no
    ``get_optimizer_state_dict``. megatron's own ``dist_checkpointing`` of the model's and the
    optimizer's *sharded* state dicts names each shard by its global key and offset (the layer
    index a leading axis, so PP stages do not collide) — megatron's native format (torch_dist)."""

    def __init__(self, engine: "MegatronEngine"):
        self.engine = engine

    def _model_keys(self) -> list[str]:
        """The state-dict key of each model chunk: megatron's convention ("model", or "model0",
        "model1", … under virtual pipeline stages)."""
        gpts = self.engine.gpts
        return ["model"] if len(gpts) == 1 else [f"model{v}" for v in range(len(gpts))]

    def _model_sharded(self, gpt) -> dict:
        if self.engine.role == "causal_lm" or not gpt.post_process:
            return gpt.sharded_state_dict()
        # The reward / value roles dropped the output layer, but megatron-core 0.16's
        # LanguageModule.sharded_state_dict marks ``output_layer.weight`` on every last stage
        # (KeyError); post_process only selects that marking there (the decoder's final norm is
        # the decoder's own flag), so the last stage is described without it.
        gpt.post_process = False
        try:
            return gpt.sharded_state_dict()
        finally:
            gpt.post_process = True

    def _sharded(self, loading: bool) -> dict:
        models = {k: self._model_sharded(gpt) for k, gpt in zip(self._model_keys(), self.engine.gpts)}
        # The optimizer finds each parameter's sharded tensor anywhere in the dict it is given; one
        # chunk's dict alone without vpp (the format mgwire's checkpoints have).
        model_sd = models["model"] if len(models) == 1 else models
        # is_loading: the optimizer creates its (still empty) Adam state so every key has a tensor to load into.
        return {**models, "optimizer": self.engine.optimizer.sharded_state_dict(model_sd, is_loading=loading)}

    def save_checkpoint(self, path: Path) -> None:
        """Collective. ``path`` is created here (rank 0) and must not exist."""
        from megatron.core import dist_checkpointing

        if dist.get_rank() == 0:
            path.mkdir(parents=True)
            (path / LAYOUT_FILE).write_text(json.dumps(self.engine.layout.to_dict(), indent=1))
        dist.barrier()
        dist_checkpointing.save(self._sharded(loading=False), str(path))
        _stop_writer_manager()

    def load_checkpoint(self, path: Path) -> None:
        """Collective; strict: every model and optimizer tensor of this rank must be in ``path``."""
        from megatron.core import dist_checkpointing

        saved = json.loads((path / LAYOUT_FILE).read_text())
        now = self.engine.layout.to_dict()
        if saved != now:
            # dist_checkpointing could reshard the model; resuming into another layout is not
            # tested here (the optimizer's state and the data order per dp rank would change).
            raise MegatronEngineError(f"{path}: written under the megatron layout {saved}, this run has {now}; "
                                      "resume needs the same parallel.tp / parallel.pp / parallel.pp_stages_per_rank "
                                      "(to change layout, export the checkpoint's weights with `moslim export hf` and "
                                      "start a run from them)")
        state = dist_checkpointing.load(self._sharded(loading=True), str(path))
        for key, gpt in zip(self._model_keys(), self.engine.gpts):
            result = gpt.load_state_dict(state[key], strict=False)
            missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
            if missing or result.unexpected_keys:
                raise MegatronEngineError(f"{path}: {key} keys missing {missing[:5]}, "
                                          f"unexpected {result.unexpected_keys[:5]}")
        self.engine.optimizer.load_state_dict(state["optimizer"])


def _stop_writer_manager() -> None:
    """megatron-core 0.16's torch_dist writer (``FileSystemWriterAsync``) forks its writer processes
    and collects their results through a queue of a *spawned* ``multiprocessing`` Manager that it
    keeps in a module global for the life of the process. The CLI leaves with ``os._exit``
    (parallel/dist.exit_process), which runs no finaliser, so that server process would outlive the
    run as an orphan; shut it down after each save (the next save spawns another)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = getattr(filesystem_async, "_results_queue", None)
    manager = getattr(queue, "_manager", None)
    if manager is not None:
        manager.shutdown()
        filesystem_async._results_queue = None


class _RemoteState(Mapping):
    """One model chunk's state dict as seen from every rank of the model-parallel group: a lookup
    broadcasts the tensor from the rank that holds it. Every rank looks tensors up in the same
    order (``merge_rank_state_dicts``), so the broadcasts pair up."""

    def __init__(self, names: set[str], src: int, group, local: dict | None):
        self.names, self.src, self.group, self.local = names, src, group, local

    def __getitem__(self, name):
        box = [self.local[name].detach().cpu() if self.local is not None else None]
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        return box[0]

    def __contains__(self, name):
        return name in self.names

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


class MegatronEngine(TrainEngine):
    """One model (policy, RM or critic) as megatron-core ``GPTModel`` chunks and megatron's optimizer.

    Needs ``torch.distributed`` initialised; initialises megatron's parallel state for ``layout``
    (tp × pp; dp = world / (tp·pp)) unless it already is. ``get_hf(name)`` returns one HF tensor by
    its HF name — a safetensors reader (:meth:`from_pretrained`) or a state dict.
    """

    def __init__(self, hf_config: dict, get_hf: Callable[[str], torch.Tensor], role: str, layout: Layout,
                 settings: EngineSettings, num_classes: tuple[int, ...] = ()):
        if role not in ROLES:
            raise MegatronEngineError(f"role={role!r}: expected one of {', '.join(ROLES)}")
        if layout.vpp > 1 and layout.pp == 1:
            raise MegatronEngineError(f"layout {layout.to_dict()}: vpp={layout.vpp} virtual pipeline stages need pp > 1")
        if settings.sequence_parallel and layout.tp > 1 and not (te_available() if settings.use_te is None else settings.use_te):
            raise MegatronEngineError("sequence_parallel: needs the Transformer Engine layer spec (megatron-core's "
                                      "local spec norms refuse it); transformer_engine is not importable")
        if role == "reward" and not num_classes:
            raise MegatronEngineError("num_classes: the reward role needs the heads' class counts")
        if settings.fp8 != "none":
            _check_fp8(hf_config, role, layout, settings)
        if not dist.is_initialized():
            raise MegatronEngineError("torch.distributed is not initialised (run under torchrun)")
        require_megatron_core()
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        self.role, self.layout, self.settings = role, layout, settings
        self.num_classes = tuple(int(k) for k in num_classes)
        self.dims = model_dims(hf_config, tp=layout.tp, backbone=role != "causal_lm")
        if self.dims.is_moe and layout.tp > 1 and not settings.sequence_parallel:
            raise MegatronEngineError(f"tp={layout.tp}: megatron-core trains MoE layers under tensor parallelism only "
                                      "with sequence_parallel (which needs Transformer Engine); use ep instead")
        if self.dims.is_moe and layout.pp > 1:
            raise MegatronEngineError(f"pp={layout.pp}: MoE under pipeline parallelism is not in the megatron engine "
                                      "(its allgather dispatcher refuses the variable sequence lengths the schedule uses)")
        check_layout(self.dims, layout)
        vpp = layout.vpp if layout.vpp > 1 else None  # megatron's "no virtual stages" is None, not 1
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(layout.tp, layout.pp, virtual_pipeline_model_parallel_size=vpp,
                                         expert_model_parallel_size=layout.ep,
                                         expert_tensor_parallel_size=layout.expert_tp)
        elif (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
              ps.get_expert_model_parallel_world_size(),
              ps.get_virtual_pipeline_model_parallel_world_size()) != (layout.tp, layout.pp, layout.ep, vpp):
            raise MegatronEngineError(f"layout {layout.to_dict()}: megatron's parallel state is already set up "
                                      "for another tp/pp/vpp")
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            tensor_parallel.model_parallel_cuda_manual_seed(settings.seed)
        self.use_te = te_available() if settings.use_te is None else settings.use_te
        if not self.use_te and settings.use_te is None:
            warnings.warn(TE_OFF_MESSAGE, stacklevel=2)
        # This rank's model chunks (one per virtual stage; one without vpp): chunk v holds layer block
        # v·pp + pp_rank (mapping._owner); the embedding is on chunk 0 of the first stage, the head
        # on the last chunk of the last stage.
        self.tp_group, self.tp_rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
        self.chunk_coords = [RankCoords(tp=self.tp_rank, pp=ps.get_pipeline_model_parallel_rank(),
                                        ep=ps.get_expert_model_parallel_rank(),
                                        etp=ps.get_expert_tensor_parallel_rank(), vp=v) for v in range(layout.vpp)]
        self.last = ps.is_pipeline_last_stage()
        """This rank runs the head (on its last chunk)."""
        self._schedule = lambda: warmup_decay(settings.warmup_steps, settings.total_steps)
        self._steps_done = 0
        self.losses_on_every_rank = layout.pp == 1
        """Under pp > 1 megatron's schedule runs the loss functions on the last stage only (base.py)."""
        self.name = "model"
        """The checkpoint item's name (``checkpoint_items``); the trainer's (build_engine's ``name``)."""
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        """Where batches go (and where ``forward``'s head output is)."""
        self.cfg = self._config(hf_config)
        self.gpts = [self._build(hf_config, v) for v in range(layout.vpp)]
        """The ``GPTModel`` chunks, in virtual-stage order."""
        self.rules = rules(self.dims, sum(self.num_classes) if role == "reward" else 0)
        for gpt, coords in zip(self.gpts, self.chunk_coords):
            self._load(get_hf, gpt, coords)
        self.models, self.optimizer = self._wrap()

    @property
    def gpt(self):
        """The chunk with the head (the only chunk without virtual stages)."""
        return self.gpts[-1]

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, path: str | Path, role: str, layout: Layout, settings: EngineSettings) -> "MegatronEngine":
        """From an HF model directory (causal_lm, value) or a reward-model directory (reward)."""
        import json

        from .convert import HFTensorSource

        path = Path(path)
        num_classes: tuple[int, ...] = ()
        if role == "reward":
            rm = json.loads((path / "rm.json").read_text())
            num_classes = tuple(rm["num_classes"])
            source = HFTensorSource(path / "backbone", {"heads.": path / "heads.safetensors"})
            config = json.loads((path / "backbone" / "config.json").read_text())
            return cls(config, source.get, role, layout, settings, num_classes)
        source = HFTensorSource(path)
        config = json.loads((path / "config.json").read_text())
        get = source.get
        if role == "value" and "model.embed_tokens.weight" in source.files:
            get = lambda name: source.get(name if name.startswith("value_head.") else "model." + name)  # noqa: E731
        return cls(config, get, role, layout, settings)

    def _config(self, hf_config: dict):
        if self.dims.is_moe:
            from megatron.core.transformer.moe import moe_utils

            if not hasattr(moe_utils, "te_general_gemm"):
                # megatron-core 0.16.1 bug: without TE the router tests ``te_general_gemm is not
                # None`` on a name its failed TE import never bound (NameError); None is what that
                # test means — the plain-torch gating matmul.
                moe_utils.te_general_gemm = None

        dtype = torch.float32 if not self.cuda else None  # CPU: fp32 (no bf16 kernels worth having)
        moe = {}
        if self.dims.is_moe and self.settings.moe_aux_loss_coeff is not None:
            moe["moe_aux_loss_coeff"] = self.settings.moe_aux_loss_coeff
        # FP8: megatron-core's TransformerBlock enters TE's fp8_autocast itself whenever config.fp8
        # is set (fp8_utils.get_fp8_context: around the whole block for delayed scaling, whose
        # amax reduction must see every layer; per layer for the others), in forward and in the
        # recomputed forward, and TE's linears run their backward GEMMs in FP8 from what that
        # autocast recorded — so nothing here wraps forward or backward. The output layer (our
        # log-prob kernel) and the reward/value heads run outside the block, in the model's dtype.
        cfg = transformer_config(
            hf_config, self.layout, dims=self.dims, dtype=dtype, fp8=self.settings.fp8,
            use_cpu_initialization=not self.cuda, **moe,
            # perform_initialization stays True although every weight is loaded next: megatron-core
            # 0.16 marks a TP-split weight (tensor_model_parallel, partition_dim) only inside its
            # init, and without the mark the grad norm drops TP rank > 0's shards as "duplicates".
            sequence_parallel=self.settings.sequence_parallel and self.layout.tp > 1,
            **(_RECOMPUTE if self.settings.activation_checkpointing else {}),
        )
        # Micro-batches may differ in T: p2p sends the shapes first. Set after construction: the
        # config check refuses it with the allgather MoE dispatcher, which a dense model never builds.
        cfg.variable_seq_lengths = self.layout.pp > 1 and self.layout.vpp == 1
        if self.layout.vpp > 1:
            # At pp = 2 a rank's previous and next stage are the same rank, and the interleaved
            # schedule sends both ways in one exchange: megatron's batched p2p would pair the
            # activation and the gradient by posting order (the wrong way round). Its unbatched
            # p2p puts the two directions on two process groups. Its shape exchange is always
            # batched, so no variable shapes either: _run pads a step's micro-batches to one shape.
            cfg.batch_p2p_comm = False
        if self.use_te:
            cfg.bias_activation_fusion, cfg.apply_rope_fusion, cfg.masked_softmax_fusion = True, True, True
        return cfg

    def _build(self, hf_config: dict, vp: int):
        """Model chunk ``vp`` of this rank (megatron-core places its layers by ``vp_stage``)."""
        from megatron.core import parallel_state as ps
        from megatron.core.models.gpt import GPTModel

        cfg = self.cfg
        vp_stage = vp if self.layout.vpp > 1 else None
        first = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        last = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        args = gpt_model_args(hf_config, self.layout, dims=self.dims)
        gpt = GPTModel(cfg, _layer_spec(self.dims, self.use_te), **args.kwargs(),
                       pre_process=first, post_process=last, vp_stage=vp_stage)
        pad_id = hf_config.get("pad_token_id")
        if first and isinstance(pad_id, int) and 0 <= pad_id < self.dims.vocab_size:
            gpt.embedding.word_embeddings.register_forward_hook(partial(_no_pad_row_gradient, pad_id))
        if last:
            if self.role == "causal_lm":
                # Keep the weight (state-dict name, TP sharding, tied-embedding sync); skip the logits.
                gpt.output_layer.forward = _Identity(cfg.sequence_parallel).forward
            else:
                gpt.output_layer = _Identity(cfg.sequence_parallel)
                if self.role == "reward":
                    gpt.reward_heads = nn.Linear(self.dims.hidden_size, sum(self.num_classes), dtype=cfg.params_dtype)
                else:
                    gpt.value_head = nn.Linear(self.dims.hidden_size, 1, dtype=cfg.params_dtype)
        return gpt.cuda() if self.cuda else gpt

    def _load(self, get_hf: Callable[[str], torch.Tensor], gpt, coords: RankCoords) -> None:
        dims = self.dims

        def get_whole(rule, layer, expert):
            names = rule.hf_names(dims, layer, expert)
            return to_megatron(rule, dims, [get_hf(n) for n in names], names)

        state = rank_state_dict(dims, self.layout, coords, self.rules, get_whole)
        if self.use_te:
            state = {self._te_name(k): v for k, v in state.items()}
        if self.role == "value" and gpt.post_process:
            for name in ("value_head.weight", "value_head.bias"):
                try:
                    state[name] = get_hf(name)
                except (KeyError, ConversionError):
                    state[name] = torch.zeros_like(gpt.state_dict()[name])  # V ≡ 0, as models/value.py
        own = gpt.state_dict()
        extra = {k for k in own if k.endswith("_extra_state")}
        missing = set(own) - set(state) - extra
        unexpected = set(state) - set(own) - {k for k in state if k.endswith("_extra_state")}
        if missing or unexpected:
            raise ConversionError(f"megatron engine load (chunk {coords}): missing {sorted(missing)}, "
                                  f"unexpected {sorted(unexpected)}")
        with torch.no_grad():
            for name, tensor in state.items():
                if tensor is not None and name in own:
                    own[name].copy_(tensor)

    @staticmethod
    def _te_name(name: str) -> str:
        for local, te in _TE_NAMES.items():
            if name.endswith(local):
                return name[: -len(local)] + te
        return name

    def _wrap(self):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        s = self.settings
        ddps = [DistributedDataParallel(self.cfg, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=self.cuda), module=gpt) for gpt in self.gpts]
        self.cfg.finalize_model_grads_func = finalize_model_grads
        # The interleaved schedule enters and leaves each chunk's no_sync on its own (a list).
        self.cfg.no_sync_func = ddps[0].no_sync if len(ddps) == 1 else [d.no_sync for d in ddps]
        opt_cfg = OptimizerConfig(
            optimizer="adam", lr=s.lr, weight_decay=s.weight_decay, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
            clip_grad=0.0,  # clipped in train_step, after the finite check (utils/optim.Updater's order)
            bf16=self.cfg.bf16, params_dtype=self.cfg.params_dtype, use_distributed_optimizer=self.cuda)
        # config_overrides={}: weight decay on every parameter, as torch's AdamW in the torch engine
        # (megatron's default exempts biases and norms).
        optimizer = get_megatron_optimizer(opt_cfg, ddps, config_overrides={})
        return ddps, optimizer

    # ------------------------------------------------------------------ heads

    def _head(self, out_BTD: torch.Tensor, micro: MicroBatch):
        mask_BT = micro["mask_BT"]
        if self.role == "reward":
            idx_B = last_token_index(mask_BT)
            hidden_BD = out_BTD[torch.arange(out_BTD.shape[0], device=out_BTD.device), idx_B]
            return HeadIn(hidden_BD, self.gpt.reward_heads.weight, self.gpt.reward_heads.bias)
        if self.role == "value":
            v_BT = self.gpt.value_head(out_BTD).squeeze(-1).float()
            return torch.cat([torch.zeros_like(v_BT[:, :1]), v_BT[:, :-1]], dim=1)
        return self._logprobs(out_BTD, micro["ids_BT"], mask_BT)

    def _logprobs(self, hidden_BTD, ids_BT, mask_BT) -> LogprobOut:
        from ...kernels.linear_logprob import fused_linear_logprob, vocab_parallel_linear_logprob

        s, V = self.settings, self.dims.vocab_size
        mask_BT = mask_BT.long()
        valid_BT = torch.zeros_like(mask_BT, dtype=torch.bool)
        valid_BT[:, 1:] = (mask_BT[:, 1:] != 0) & (mask_BT[:, :-1] != 0)  # as algos/logprob.sequence_logprobs
        hidden_NH = hidden_BTD[:, :-1][valid_BT[:, 1:]]
        targets_N = ids_BT[:, 1:][valid_BT[:, 1:]]
        weight_VsH = (self.gpt.shared_embedding_or_output_weight() if self.gpt.share_embeddings_and_output_weights
                      else self.gpt.output_layer.weight)
        # The padded vocabulary's zero rows are not tokens: cut them off, or their logit 0 would
        # take probability mass (Megatron-LM masks them the same way).
        start = self.tp_rank * weight_VsH.shape[0]
        rows = max(0, min(weight_VsH.shape[0], V - start))
        weight_VsH = weight_VsH[:rows].to(hidden_NH.dtype)
        if self.layout.tp == 1:
            logp_N, entropy_N = fused_linear_logprob(hidden_NH, weight_VsH, targets_N, s.temperature,
                                                     chunk_size=s.logprob_chunk)
        else:
            logp_N, entropy_N = vocab_parallel_linear_logprob(hidden_NH, weight_VsH, targets_N, self.tp_group,
                                                              start, V, s.temperature, chunk_size=s.logprob_chunk)
        zeros_BT = torch.zeros(mask_BT.shape, dtype=logp_N.dtype, device=logp_N.device)
        return LogprobOut(zeros_BT.index_put((valid_BT,), logp_N), zeros_BT.index_put((valid_BT,), entropy_N))

    # ------------------------------------------------------------------ schedule

    @staticmethod
    def _check_micro(micro: MicroBatch) -> None:
        mask_BT = micro["mask_BT"]
        if mask_BT.shape != micro["ids_BT"].shape or mask_BT.dim() != 2:
            raise MegatronEngineError(f"mask_BT: shape {tuple(mask_BT.shape)} != ids_BT {tuple(micro['ids_BT'].shape)}")
        if bool((mask_BT[:, 1:] > mask_BT[:, :-1]).any()):
            raise MegatronEngineError("mask_BT: rows must be right-padded for the megatron engine "
                                      "(its RoPE positions are 0..T-1 whatever the mask)")

    @classmethod
    def _front_aligned(cls, micro: MicroBatch) -> tuple[MicroBatch, torch.Tensor | None]:
        """``micro`` with each row's attended tokens at the front of the row — every ``*_BT``
        tensor (the shape-suffix convention: each per-token tensor a loss reads) rolled left by the
        row's leading padding — and that padding per row (None when no row has any: ``micro``
        itself). Positions 0..n−1 of the rolled row are the torch engines' ``cumsum(mask) − 1``.
        Every head output and loss is per token of its own row, so the loss function sees the
        rolled micro-batch consistently; :meth:`forward` rolls its output back. Refuses a row whose
        attended tokens are not contiguous."""
        mask_BT = micro["mask_BT"]
        if mask_BT.shape != micro["ids_BT"].shape or mask_BT.dim() != 2:
            cls._check_micro(micro)  # raises, naming the shapes
        lead_B = (mask_BT.cumsum(-1) == 0).sum(-1)
        if bool(lead_B.any()):
            idx_BT = _roll_index(lead_B, mask_BT.shape[1])
            micro = {k: (v.gather(1, idx_BT.to(v.device)) if k.endswith("_BT") and v.dim() == 2 else v)
                     for k, v in micro.items()}
        else:
            lead_B = None
        try:
            cls._check_micro(micro)
        except MegatronEngineError:
            raise MegatronEngineError("mask_BT: each row's attended tokens must be contiguous (padding before "
                                      "and/or after them only) for the megatron engine (its RoPE positions are "
                                      "0..T-1 whatever the mask)") from None
        return micro, lead_B

    def _forward_step(self, loss_fn, num_micro, rows, data_iterator, model):
        ids_BT, micro = next(data_iterator)  # the model's ids (maybe padded), the seam's micro-batch
        T = ids_BT.shape[1]
        position_ids_BT = torch.arange(T, device=ids_BT.device).expand_as(ids_BT)
        # Causal only: with right padding no attended query sees a padding key (True = masked out).
        causal_11TT = torch.triu(torch.ones(T, T, dtype=torch.bool, device=ids_BT.device), diagonal=1)[None, None]
        out = model(ids_BT, position_ids_BT, causal_11TT)

        def loss_func(out_BTD):
            B, T = micro["ids_BT"].shape
            # Rows and tail positions _run padded on: causal attention kept them out of the real ones.
            head = self._head(out_BTD[:B, :T], micro)
            loss, row = loss_fn(head, micro)
            rows.append(row)
            # megatron divides a (loss, dict) pair by the number of micro-batches; the seam's loss
            # is already weighted by its share of the step, so undo it.
            return loss * num_micro, {}

        return out, loss_func

    def _run(self, micro_batches: list[MicroBatch], loss_fn, forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if self.cuda:
            micro_batches = [{k: v.cuda(non_blocking=True) for k, v in m.items()} for m in micro_batches]
        rows: list[dict] = []
        B, T = micro_batches[0]["ids_BT"].shape
        pp, vpp = self.layout.pp, self.layout.vpp
        if vpp > 1 and len(micro_batches) % pp:
            # megatron-core 0.16's interleaved schedule runs micro-batches in groups of pp per chunk
            # and refuses a last group of fewer than pp (its "dependency bubbles" RuntimeError).
            raise MegatronEngineError(f"micro_batches: {len(micro_batches)} micro-batches; the interleaved schedule "
                                      f"(vpp={vpp}) needs a multiple of pp={pp} (parallel.pp_microbatches)")
        ids = [m["ids_BT"] for m in micro_batches]
        if vpp > 1:
            # One tensor shape per step (no shape exchange, see _config): every row batch padded
            # at the end to the step's largest B and T.
            B, T = max(i.shape[0] for i in ids), max(i.shape[1] for i in ids)
            ids = [torch.nn.functional.pad(i, (0, T - i.shape[1], 0, B - i.shape[0])) for i in ids]
        if self.settings.fp8 != "none":
            # TE's FP8 GEMMs also need the token dimension (T·B, T/tp·B under sequence parallelism)
            # to be a multiple of 16 (32 for MXFP8): pad every row at the end. Causal attention
            # keeps the pad tokens out of the real ones, and loss_func cuts the output back to T.
            mult = fp8_align(self.settings.fp8) * (self.layout.tp if self.cfg.sequence_parallel else 1)
            T = -(-max(i.shape[1] for i in ids) // mult) * mult
            ids = [torch.nn.functional.pad(i, (0, T - i.shape[1])) for i in ids]
        # One iterator per chunk: each chunk's forward steps take the micro-batches in order
        # (the first chunk reads ids, the last one the head's inputs; all of them T).
        pairs = list(zip(ids, micro_batches))
        data = iter(pairs) if vpp == 1 else [iter(pairs) for _ in range(vpp)]
        get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, loss_fn, len(micro_batches), rows),
            data_iterator=data, model=self.models, num_microbatches=len(micro_batches),
            seq_length=T, micro_batch_size=B, forward_only=forward_only)
        return rows

    def _from_last_stage(self, obj):
        """``obj`` from the last pipeline stage, on every stage."""
        if self.layout.pp == 1:
            return obj
        from megatron.core import parallel_state as ps

        box = [obj]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
        return box[0]

    def parallel_ranks(self) -> dict:
        """This rank's (index, size) in megatron's data-parallel and pipeline groups."""
        from megatron.core import parallel_state as ps

        return {"dp": (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()),
                "pp": (ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size())}

    # ------------------------------------------------------------------ the seam

    @property
    def lr(self) -> float:
        return self.settings.lr * self._schedule()(self._steps_done)

    def train_step(self, micro_batches: list[MicroBatch], loss_fn: LossFn, step: int) -> dict[str, float]:
        for model in self.models:
            model.train()
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        rows = self._run([self._front_aligned(m)[0] for m in micro_batches], loss_fn, forward_only=False)
        # Same order as utils/optim.Updater: norm, finite check (before any parameter changes), clip, step.
        self.optimizer.prepare_grads()
        clip = self.settings.grad_clip
        norm = float(self.optimizer.get_grad_norm())
        if not math.isfinite(norm):
            raise NonFiniteError(f"step {step}: gradient norm is not finite")
        if clip > 0 and clip / (norm + 1e-6) < 1.0:
            # megatron's clip_grad_by_total_norm_fp32 without a second norm pass (and the same
            # coefficient as torch's clip_grad_norm_): scale the grads the optimizer will apply.
            grads = [p.grad for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer])
                     for p in opt.get_parameters() if p.grad is not None]
            torch._foreach_mul_(grads, clip / (norm + 1e-6))
        lr = self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step_with_ready_grads()
        self._steps_done += 1
        # The mean over micro-batches of each key (engine/base.mean_log_rows on the seam branch).
        keys = sorted({k for r in rows for k in r})
        metrics = {k: sum(float(r[k]) for r in rows if k in r) / max(1, sum(k in r for r in rows)) for k in keys}
        metrics = self._from_last_stage(metrics)
        # "lr": the one the next step uses, as the torch engines report it (Updater.lr after its step).
        return {**metrics, "grad_norm": norm, "lr": self.lr}

    @torch.no_grad()
    def forward(self, micro: MicroBatch):
        outs: list = []

        def keep(head, _micro):
            outs.append(head)
            return torch.zeros((), device=micro["ids_BT"].device), {}

        aligned, lead_B = self._front_aligned(micro)
        # The interleaved schedule takes whole groups of pp micro-batches: the row batch again as
        # the group's other members (their outputs are dropped; pp× the forward work, vpp > 1 only).
        copies = self.layout.pp if self.layout.vpp > 1 else 1
        self._run([aligned] * copies, keep, forward_only=True)
        out = outs[0] if outs else None
        if self.layout.pp > 1:
            out = self._from_last_stage(_to_cpu(out))
            device = micro["ids_BT"].device
            out = _to_device(out, torch.device("cuda") if self.cuda else device)
        return out if lead_B is None else _roll_back(out, lead_B)

    def scheduler_state(self) -> dict:
        """The schedule is a pure function of the steps done (utils/optim.warmup_decay)."""
        return {"steps_done": self._steps_done}

    def load_scheduler_state(self, state: dict) -> None:
        self._steps_done = int(state.get("steps_done", 0))

    def checkpoint_items(self) -> tuple[dict, dict]:
        """``{name: MegatronCheckpoint}``: the model and its optimizer state in one self-saving
        item (megatron's ``dist_checkpointing``); no torch-DCP optimizer entry."""
        return {self.name: MegatronCheckpoint(self)}, {}

    def export_weights(self, bucket_bytes: int = 1 << 28) -> Iterator[tuple[str, torch.Tensor]]:
        """``bucket_bytes`` is accepted for the seam's signature; this engine always moves one
        Megatron tensor (one rank's shards of it) at a time, so its peak is below any bucket."""
        from megatron.core import parallel_state as ps

        # Expert-parallel ranks are data-parallel for the dense weights, so under ep > 1 the shards
        # of one model span the whole world, not megatron's (tp × pp) model-parallel group.
        group = ps.get_model_parallel_group() if self.layout.ep == 1 else dist.group.WORLD
        back = {te: loc for loc, te in _TE_NAMES.items()}

        def local_names(gpt) -> dict:
            local = {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
            if self.use_te:
                local = {next((k[: -len(t)] + loc for t, loc in back.items() if k.endswith(t)), k): v
                         for k, v in local.items()}
            return local

        locals_ = {c: local_names(gpt) for c, gpt in zip(self.chunk_coords, self.gpts)}
        # Every model-parallel rank's chunks (coordinates and tensor names), then tensors one at a time.
        infos = [None] * dist.get_world_size(group)
        dist.all_gather_object(infos, (dist.get_rank(), [(c, sorted(loc)) for c, loc in locals_.items()]),
                               group=group)
        me = dist.get_rank()
        shards = {c: _RemoteState(set(names), src, group, locals_[c] if src == me else None)
                  for src, chunks in infos for c, names in chunks}
        yield from iter_hf_tensors(self.dims, self.layout, self.rules, shards)
        if self.role == "value":
            head = RankCoords(pp=self.layout.pp - 1, vp=self.layout.vpp - 1)
            last = next(src for src, chunks in infos for c, _ in chunks
                        if (c.pp, c.vp, c.tp) == (head.pp, head.vp, 0))
            mine = locals_[self.chunk_coords[-1]] if last == me else None
            for name in ("value_head.weight", "value_head.bias"):
                yield name, _RemoteState({name}, last, group, mine)[name]


def build_megatron_engine(parallel, model_path: str | Path, role: str, settings: EngineSettings,
                          name: str = "model") -> MegatronEngine:
    """The engine ``parallel.backend=megatron`` selects: ``parallel`` is the run's ParallelConfig
    (its ``tp`` and ``pp``, dp = world / (tp·pp); ``pp_schedule`` / ``pp_stages_per_rank``, the
    virtual stages; ``activation_checkpointing``, full recomputation; ``fp8``, the Transformer
    Engine recipe, :data:`~.config.FP8_RECIPES`); ``model_path`` an HF (or
    reward-model) directory; ``name`` the checkpoint item's name."""
    from ...config import ConfigError

    if getattr(parallel, "cp", 1) != 1:
        raise MegatronEngineError(f"parallel.cp={parallel.cp}: context parallelism is not in the megatron engine")
    schedule = getattr(parallel, "pp_schedule", "1f1b")
    vpp = 1
    if parallel.pp > 1 and schedule == "gpipe":
        # megatron-core schedules 1F1B (interleaved with virtual stages) only; running 1F1B under a
        # gpipe setting would silently change the run's memory profile.
        raise ConfigError("parallel.pp_schedule=gpipe: the megatron backend runs 1f1b or interleaved_1f1b only")
    if parallel.pp > 1 and schedule == "interleaved_1f1b":
        vpp = parallel.pp_stages_per_rank
    if getattr(parallel, "activation_checkpointing", False):
        settings = replace(settings, activation_checkpointing=True)
    fp8 = getattr(parallel, "fp8", "none")
    if fp8 == "rowwise":  # ParallelConfig refuses it at load time; a hand-built one is refused here
        raise ConfigError("parallel.fp8=rowwise: torchao's recipe of parallel.backend=torch; the megatron backend "
                          "(Transformer Engine) offers tensorwise, delayed, blockwise, mxfp8")
    if fp8 != "none":
        settings = replace(settings, fp8=fp8)
    layout = Layout(tp=parallel.tp, pp=parallel.pp, vpp=vpp)
    engine = MegatronEngine.from_pretrained(model_path, role, layout, settings)
    engine.name = name
    return engine


def _check_fp8(hf_config: dict, role: str, layout: Layout, settings: EngineSettings) -> None:
    """Refuse a ``parallel.fp8`` recipe this engine cannot run, naming the field, before megatron
    or TE builds anything: megatron-core without TE silently runs FP8 configs in full precision
    (its ``get_fp8_context`` is then a null context), and TE itself fails deep in the first GEMM."""
    from .config import FP8_RECIPES

    recipe = settings.fp8
    if recipe not in FP8_RECIPES:
        raise MegatronEngineError(f"parallel.fp8={recipe}: the megatron backend (Transformer Engine) offers "
                                  f"{', '.join(FP8_RECIPES)}")
    if not (te_available() if settings.use_te is None else settings.use_te):
        raise MegatronEngineError(f"parallel.fp8={recipe}: FP8 in megatron-core needs Transformer Engine (its layer "
                                  "spec's linears do the FP8 GEMMs) and transformer_engine is not importable here "
                                  "(or the local spec was asked for); install it or set parallel.fp8=none")
    dims = model_dims(hf_config, tp=layout.tp, backbone=role != "causal_lm")
    if dims.is_moe:
        # SequentialMLP experts get any number of tokens each, and TE's FP8 GEMM needs multiples
        # of 16; megatron pads them (moe_router_padding_for_quantization) only with a dispatcher
        # other than the allgather one this engine uses.
        raise MegatronEngineError(f"parallel.fp8={recipe}: FP8 of a Qwen2-MoE model is not in the megatron "
                                  "engine (the experts' token counts are not padded for TE's FP8 GEMMs); "
                                  "use parallel.fp8=none")
    check_layout(dims, layout)
    check_fp8_dims(dims, layout, recipe)
    if not torch.cuda.is_available():
        raise MegatronEngineError(f"parallel.fp8={recipe}: Transformer Engine's FP8 runs on CUDA GPUs only")
    cap = torch.cuda.get_device_capability()
    need = (10, 0) if recipe == "mxfp8" else (8, 9)
    if cap < need:
        what = "MXFP8 needs Blackwell (compute capability ≥ 10.0)" if recipe == "mxfp8" else \
            "FP8 needs compute capability ≥ 8.9 (Ada, Hopper, Blackwell)"
        alt = "tensorwise or delayed" if recipe == "mxfp8" and cap >= (8, 9) else "none"
        raise MegatronEngineError(f"parallel.fp8={recipe}: {what}; {torch.cuda.get_device_name()} is "
                                  f"sm{cap[0]}{cap[1]} — use parallel.fp8={alt}")


def _no_pad_row_gradient(pad_id: int, module, inputs, out_BTD):
    """Forward hook of the word embeddings: the HF models build ``nn.Embedding(..., padding_idx=
    pad_token_id)``, whose lookup never sends gradient to the pad token's row; megatron's
    VocabParallelEmbedding has no padding index. Same values, no gradient where the input is the pad
    token — which matters where it is *attended* (a policy that sampled it; a tokenizer whose pad is
    its EOS). Only the lookup: a tied output layer still trains that row, as in HF."""
    pad_BT = inputs[0] == pad_id
    return torch.where(pad_BT[..., None], out_BTD.detach(), out_BTD) if bool(pad_BT.any()) else out_BTD


def _roll_index(shift_B: torch.Tensor, T: int) -> torch.Tensor:
    """[B, T] gather index that rolls each row left by ``shift_B`` (right when negative)."""
    return (torch.arange(T, device=shift_B.device)[None] + shift_B[:, None]) % T


def _roll_back(out, lead_B: torch.Tensor):
    """A head output of front-aligned rows back at the rows' own positions (``HeadIn`` is per row)."""
    if isinstance(out, torch.Tensor):
        return out.gather(1, _roll_index(-lead_B, out.shape[1]).to(out.device))
    if isinstance(out, LogprobOut):
        return LogprobOut(_roll_back(out.logp_BT, lead_B), _roll_back(out.entropy_BT, lead_B))
    return out


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (LogprobOut, HeadIn)):
        return type(obj)(*(_to_cpu(getattr(obj, f)) for f in obj.__dataclass_fields__))
    return obj


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (LogprobOut, HeadIn)):
        return type(obj)(*(_to_device(getattr(obj, f), device) for f in obj.__dataclass_fields__))
    return obj

