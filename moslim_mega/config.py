"""One tree of frozen dataclasses: the whole configuration of a run.

Every field carries a one-line docstring (the string literal under it); ``moslim config
--doc`` prints them and the README's config reference is generated from them. Recipes are YAML
files in ``configs/``; command-line overrides are ``a.b=value``. Unknown keys and values of the
wrong type raise :class:`ConfigError` naming the key. The resolved tree is saved as
``config.yaml`` in every run directory.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key."""


@dataclass(frozen=True)
class PrefsConfig:
    """Which preference dimensions the reward model has and how many classes each."""

    datatype: int = 4
    """Paper Table 5 preset (1-4) for helpfulness/honesty/harmlessness; ignored if `dimensions` is set."""
    dimensions: tuple[str, ...] = ()
    """Explicit dimension names (2-5 for the embedded world); empty = the DataType preset."""
    num_classes: tuple[int, ...] = ()
    """Classes per dimension, same order as `dimensions`."""


@dataclass(frozen=True)
class WorldConfig:
    """The embedded preference world (synthetic task + oracle), see docs/world.md."""

    seed: int = 0
    """Seed of every random choice in the world's data sets."""
    num_rm_prompts: int = 3000
    """Prompts in the reward-model training set."""
    num_rm_eval_prompts: int = 300
    """Held-out prompts for reward-model evaluation (disjoint prompt ids)."""
    responses_per_prompt: int = 4
    """Rated responses per RM prompt (UltraFeedback has 4)."""
    num_sft: int = 4000
    """Examples in the neutral (prefix-free) SFT set."""
    num_policy_prompts: int = 2000
    """Policy prompts with random 1-3 dimension prefixes (paper §3.2)."""
    harmful_fraction: float = 0.3
    """Fraction of prompts that are harmful requests."""
    sft_prefix_fraction: float = 0.5
    """SFT prompts given a random prefix that carries no information (response drawn independently)."""
    rm_reachable_fraction: float = 0.0
    """Fraction of RM training responses drawn from what a policy can reach with the world's
    vocabulary (off-topic items, mixed topics, repeats, long and near-empty answers), so that the
    RM is right where an optimised policy goes (issue 18). ``rm_eval_ood.jsonl`` always holds such
    responses to held-out prompts, as the RM's out-of-distribution eval slice."""


@dataclass(frozen=True)
class ModelConfig:
    """A HF-architecture model: a tiny random one or a local checkpoint."""

    name_or_path: str = "tiny-llama"
    """`tiny-llama`, `tiny-qwen2` (random init with the sizes below) or a local HF checkpoint path."""
    hidden_size: int = 128
    """Hidden width of a tiny random model."""
    num_layers: int = 2
    """Transformer layers of a tiny random model."""
    num_heads: int = 4
    """Attention heads of a tiny random model."""
    intermediate_size: int = 256
    """MLP width of a tiny random model."""
    max_position_embeddings: int = 256
    """Longest sequence a tiny random model accepts."""
    trust_remote_code: bool = False
    """Allow custom modelling code from a checkpoint (off by default)."""
    dtype: str = "float32"
    """Parameter dtype: float32 or bfloat16."""
    chat_template: str = ""
    """Chat template: '' = the tokenizer's own, `none` = plain text, else a Jinja file (policy and RM may differ)."""


@dataclass(frozen=True)
class RewardConfig:
    """Multi-head classification reward model training (paper §2.2, Eq. 6-10)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The reward model's backbone."""
    loss: str = "per_head_ce"
    """`per_head_ce` (Eq. 6-9, default) or `paper_eq10` (Eq. 10 taken literally)."""
    class_weights: str = "none"
    """`none` or `balanced` (inverse class frequency per head, for skewed ratings)."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Linear warm-up steps, then linear decay to 10% of lr."""
    epochs: float = 4.0
    """Passes over the training set (fractions allowed)."""
    batch_size: int = 64
    """Examples per optimizer step."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = off)."""
    eval_every: int = 100
    """Evaluate on the held-out set every N steps (0 = only at the end)."""
    max_length: int = 96
    """Truncate prompt+response to this many tokens (prompt side is truncated first); recorded in rm.json, so scoring truncates alike."""
    stats_mode: str = "welford"
    """Running class-probability statistics for Eq. 11: `welford` (exact) or `ema`."""
    stats_momentum: float = 0.99
    """EMA momentum when stats_mode=ema."""
    calibrate: bool = True
    """After training, recompute the statistics with the final weights over the training set."""
    max_minutes: float = 0.0
    """Stop training after this many minutes (0 = no limit); the run still evaluates and saves."""


@dataclass(frozen=True)
class MappingConfig:
    """Reward mapping from head probabilities to one scalar (paper Eq. 11)."""

    kind: str = "zscore"
    """`zscore` (Eq. 11), `logprob` (mean log p of the target class) or `neg_abs_dist` (−E|c − t|)."""
    normalize_by: str = "all"
    """k in Eq. 11: `all` heads (paper) or only the `named` ones."""
    std_floor: float = 1e-3
    """Lower bound on the recorded std, so a near-constant class cannot blow the reward up."""
    clip: float = 0.0
    """Clip the mapped reward to [-clip, clip] (0 = off)."""


@dataclass(frozen=True)
class SamplingConfig:
    """How the rollout engine samples responses."""

    temperature: float = 1.0
    """Softmax temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    max_new_tokens: int = 12
    """Longest response in tokens (EOS ends a response earlier)."""


@dataclass(frozen=True)
class RolloutConfig:
    """Which rollout engine samples the policy's responses (moslim_mega/rollout), and its guard."""

    engine: str = "hf"
    """`hf` (transformers generate on a plain copy of the actor) or `vllm` (`pip install -e .[vllm]`)."""
    tensor_parallel_size: int = 1
    """vLLM: tensor-parallel degree of the engine."""
    gpu_memory_utilization: float = 0.5
    """vLLM: fraction of GPU memory the engine may take (weights + KV cache)."""
    max_model_len: int = 0
    """vLLM: longest prompt + response (0 = prompt width + sampling.max_new_tokens rounded up, or the model's)."""
    sleep_level: int = 0
    """vLLM: free memory during training: 0 = never sleep, 1 = free the KV cache, 2 = also the weights."""
    enforce_eager: bool = True
    """vLLM: no CUDA graphs (faster start; graphs pay off only for long runs)."""
    dtype: str = "auto"
    """vLLM: weight/compute dtype (`auto` = the checkpoint's)."""
    kv_cache_memory_bytes: int = 268435456
    """vLLM on CPU: bytes of KV cache."""
    push_bucket_mb: int = 256
    """Weight push: full tensors are gathered and streamed to the engine in buckets of about this many MiB."""
    max_logprob_diff: float = 0.1
    """Stale-weight guard: stop when the mean |rollout − trainer| sampled-token log-prob exceeds this (0 = off)."""
    probe: bool = True
    """Stale-weight guard: after each weight push, sample a few tokens of a fixed prompt and check them at once."""


@dataclass(frozen=True)
class SFTConfig:
    """Supervised warm start on prefix-free (prompt, response) pairs: the stand-in for an
    off-the-shelf model (the paper starts from any SFT checkpoint)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy architecture (or a local checkpoint to fine-tune)."""
    lr: float = 2e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 20
    """Linear warm-up steps, then linear decay to 10% of lr."""
    epochs: float = 3.0
    """Passes over the SFT set."""
    batch_size: int = 64
    """Examples per optimizer step."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = off)."""
    max_length: int = 64
    """Truncate prompt+response to this many tokens."""
    max_minutes: float = 0.0
    """Stop after this many minutes (0 = no limit)."""


@dataclass(frozen=True)
class PolicyConfig:
    """MOSLIM policy optimisation (paper §2.3, Eq. 12) with PPO, RLOO or Online-DPO."""

    algo: str = "rloo"
    """`ppo` (critic + GAE), `rloo` (leave-one-out baseline) or `online_dpo`."""
    init: str = ""
    """Policy start: a HF checkpoint directory (e.g. an SFT run's `model/`); empty = the demo's SFT."""
    rm_dir: str = ""
    """A trained reward-model directory (`moslim rm train --out`); empty = the demo's RM."""
    prompts: str = ""
    """jsonl of prefixed policy prompts (world: `policy_train.jsonl`); empty = the demo's."""
    steps: int = 150
    """Rollout → update iterations."""
    prompts_per_step: int = 32
    """Prompts sampled per iteration."""
    samples_per_prompt: int = 4
    """Responses per prompt (RLOO needs ≥ 2; Online-DPO ranks them)."""
    lr: float = 5e-4
    """Policy AdamW learning rate."""
    critic_lr: float = 1e-3
    """Critic AdamW learning rate (PPO)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warm-up of both learning rates."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = off)."""
    update_epochs: int = 1
    """Passes over each rollout batch."""
    mini_batch_size: int = 64
    """Sequences per optimizer step within a rollout batch."""
    micro_batch_size: int = 0
    """Sequences per forward/backward (gradient accumulation); 0 = the mini-batch."""
    clip_range: float = 0.2
    """PPO ratio clip ε (also used by RLOO's clipped surrogate)."""
    value_clip_range: float = 0.2
    """PPO value clip (0 = unclipped value loss)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE λ."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean and unit std per batch."""
    kl_coef: float = 0.05
    """β of Eq. 12 (initial value when adaptive)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator: `k1` (log ratio), `k2` (½ log² ratio) or `k3` (exp − 1 − log)."""
    kl_in_reward: bool = True
    """True: −β·KL in the per-token reward (PPO style, Eq. 12); False: β·KL as a loss term."""
    adaptive_kl: bool = False
    """Adapt β towards kl_target (Ziegler et al. 2019)."""
    kl_target: float = 1.0
    """Target sequence KL for the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller in samples."""
    dpo_beta: float = 0.1
    """β of the (online) DPO loss."""
    dpo_loss: str = "sigmoid"
    """`sigmoid` (DPO) or `ipo`."""
    rollout_correction: str = "none"
    """Rollout/trainer mismatch correction of the PPO/RLOO policy gradient: `none`, `token_tis` or `seq_tis` (truncated importance weights)."""
    rollout_correction_cap: float = 2.0
    """C of the truncated importance weight min(π_trainer_old / π_rollout, C)."""
    eval_every: int = 50
    """Controllability eval (oracle) every N steps (0 = only at the end)."""
    save_every: int = 0
    """Save the policy as an HF checkpoint `checkpoints/step_N` every N steps (0 = final only)."""
    max_minutes: float = 0.0
    """Stop after this many minutes (0 = no limit); evaluation and saving still happen."""


@dataclass(frozen=True)
class EvalConfig:
    """Oracle-measured controllability evaluation (Figures 5-6 analogues)."""

    prompts_per_target: int = 48
    """Held-out prompts per (dimension, level) point."""
    temperature: float = 0.0
    """Sampling temperature at evaluation (0 = greedy)."""
    seed: int = 1234
    """Seed of prompt choice and sampling."""


@dataclass(frozen=True)
class CheckpointConfig:
    """Exact-resume training checkpoints (torch.distributed.checkpoint), for every stage."""

    every: int = 0
    """Write a resumable checkpoint every N optimizer/rollout steps (0 = never)."""
    keep_last: int = 2
    """Keep only the newest N checkpoints (0 = keep all)."""
    resume: str = "auto"
    """`auto` (resume from the stage's `latest` checkpoint if there is one), `never`, or a checkpoint path."""
    dir: str = ""
    """Checkpoint directory; empty = `<stage out>/ckpt`, a relative path is taken under the stage's out dir."""


@dataclass(frozen=True)
class BenchConfig:
    """Public benchmarks (MT-Bench, HaluEval 2.0, Hackaprompt, RewardBench) with a pluggable judge."""

    max_new_tokens: int = 512
    """Longest policy answer generated per turn, in tokens."""
    temperature: float = 0.0
    """Policy sampling temperature for benchmark answers (0 = greedy)."""
    seed: int = 1234
    """Seed of policy and local-judge sampling."""
    batch_size: int = 8
    """Conversations generated (or RM pairs scored) per forward batch."""
    prefix: str = ""
    """Preference prefix put before the first user turn of every policy prompt (empty = none)."""
    limit: int = 0
    """Use only the first N records of the benchmark (0 = all)."""
    split: str = ""
    """Split to read when --data is a hub data set (empty = its only split)."""
    judge_max_tokens: int = 512
    """Longest judge verdict generated, in tokens."""
    judge_temperature: float = 0.0
    """Judge sampling temperature (0 = greedy, the usual choice for grading)."""
    request_timeout: float = 120.0
    """Seconds before one HTTP judge request is abandoned."""
    max_retries: int = 3
    """Attempts per HTTP judge request (connection errors and 5xx) before the run fails."""
    allow_insecure_key: bool = False
    """Send `OPENAI_API_KEY` to an openai judge over plain `http://` on a non-loopback host (readable on the wire)."""
    rm_score: str = "mapped"
    """How a multi-head RM scores a response: Eq. 11 mapped reward for rm_prefix, or expected class."""
    rm_prefix: str = ""
    """Targets of the mapped reward, e.g. `<helpfulness 5><harmlessness 1>` (empty = every head at max)."""
    rm_head: str = ""
    """rm_score=expected: the head whose expected class is the score (empty = mean over heads, each scaled to 0-1)."""


@dataclass(frozen=True)
class CompareConfig:
    """`moslim compare`: MOSLIM against MORLHF, Rewarded Soups and DPA on the embedded world
    (same world, SFT start, RM backbone/budget `rm.*` and policy budget `policy.*` for all)."""

    methods: tuple[str, ...] = ("moslim", "morlhf", "rsoup", "dpa")
    """Methods to train and evaluate (any of moslim, morlhf, rsoup, dpa); `--methods` overrides."""
    morlhf_weights: tuple[str, ...] = ("1,1,1",)
    """MORLHF weight vectors (Eq. 1), one policy each, as comma-separated weights in `prefs` order."""
    rsoup_lambda_steps: int = 5
    """Points of the Rewarded Soups λ sweep between each pair of per-dimension policies (Eq. 2)."""
    dpa_iterations: int = 3
    """DPA rejection-sampling fine-tuning iterations T."""
    dpa_prompts_per_iter: int = 128
    """Prompts sampled per DPA iteration."""
    dpa_directions_per_prompt: int = 4
    """Preference directions sampled per prompt (DPA paper: 5)."""
    dpa_samples: int = 8
    """Responses drawn per (prompt, direction); the best by vᵀr is kept (DPA paper: 16)."""
    dpa_replay_fraction: float = 0.15
    """Share of each iteration's fine-tuning set that replays the original SFT data."""
    dpa_lr: float = 5e-4
    """Learning rate of each DPA fine-tuning iteration."""
    dpa_sft_epochs: float = 2.0
    """Passes over each iteration's selected responses."""
    dpa_sft_max_minutes: float = 0.0
    """Cap on each DPA fine-tuning iteration in minutes (0 = none)."""


FP8_TORCH = ("tensorwise", "rowwise")
"""``parallel.fp8`` recipes of the torch backend (torchao's ``Float8LinearConfig.from_recipe_name``)."""
FP8_MEGATRON = ("tensorwise", "delayed", "blockwise", "mxfp8")
"""``parallel.fp8`` recipes of the megatron backend (megatron-core's ``fp8_recipe``, run by Transformer Engine)."""
FP8_TORCH_ONLY = tuple(r for r in FP8_TORCH if r not in FP8_MEGATRON)
FP8_MEGATRON_ONLY = tuple(r for r in FP8_MEGATRON if r not in FP8_TORCH)


@dataclass(frozen=True)
class ParallelConfig:
    """torch.distributed layout of every stage under `torchrun` (issue 6); world size = pp × dp × tp."""

    backend: str = "torch"
    """Training engine: `torch` (FSDP2 + DTensor tensor parallel) or `megatron` (megatron-core engine under torchrun: `sft train`, `rm train` with tp/pp and `policy train` with tp/dp, dist_checkpointing resume; docs/megatron.md)."""
    dp: int = 0
    """FSDP2 data-parallel degree (0 = world size / tp)."""
    tp: int = 1
    """Tensor-parallel degree (DTensor column/row parallel, vocab-parallel embedding and LM head)."""
    pp: int = 1
    """Pipeline-parallel degree: layer-range stages over the outermost mesh dimension (torch.distributed.pipelining)."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule under pp > 1: `gpipe`, `1f1b` or `interleaved_1f1b` (needs pp_stages_per_rank ≥ 2)."""
    pp_microbatches: int = 0
    """Micro-batches per pipelined step: each dp shard of SFT/RM batches is cut into this many (0 = pp, the fewest that keep every stage busy); the policy cuts by policy.micro_batch_size and, when this is set, must give exactly this many."""
    pp_stages_per_rank: int = 1
    """Model chunks (virtual stages) per pp rank: 1 for gpipe/1f1b, ≥ 2 for interleaved_1f1b."""
    cp: int = 1
    """Context-parallel degree (only 1 in the torch backend)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward (saves activation memory)."""
    mixed_precision: str = "none"
    """FSDP2 MixedPrecisionPolicy: `none` (params as stored) or `bf16` (bf16 compute, fp32 gradient reduction)."""
    reshard_after_forward: bool = True
    """FSDP2: free the gathered parameters after forward (ZeRO-3); False keeps them (ZeRO-2-like)."""
    fp8: str = "none"
    """Float8 training of the decoder layers' linears: `none`; torch backend (torchao, emulated on CPU): `tensorwise` or `rowwise`; megatron backend (Transformer Engine, E4M3 forward / E5M2 gradients, needs TE and a GPU): `tensorwise` (current scaling per tensor), `delayed` (amax history), `blockwise` or `mxfp8` (Blackwell) — docs/megatron.md."""
    fp8_auto_filter: bool = False
    """Also skip linears below torchao's H100 size thresholds (too small for fp8 to pay); else only dims % 16 ≠ 0 are skipped."""

    def __post_init__(self):
        # Each backend offers the recipes its FP8 library has; refused at load time, before a run
        # starts, rather than silently trained in another precision.
        if self.backend == "torch" and self.fp8 in FP8_MEGATRON_ONLY:
            raise ConfigError(f"parallel.fp8={self.fp8}: a Transformer Engine recipe of parallel.backend=megatron; "
                              f"parallel.backend=torch (torchao) offers {', '.join(FP8_TORCH)}")
        if self.backend == "megatron" and self.fp8 in FP8_TORCH_ONLY:
            raise ConfigError(f"parallel.fp8={self.fp8}: torchao's recipe of parallel.backend=torch; "
                              f"parallel.backend=megatron (Transformer Engine) offers {', '.join(FP8_MEGATRON)}")


@dataclass(frozen=True)
class KernelsConfig:
    """Fused kernels of the training hot spots (issue 7): the multi-head RM head and the linear → log-prob."""

    impl: str = "auto"
    """`auto` (Triton on CUDA tensors, the plain-PyTorch reference elsewhere), `triton` or `reference`."""
    logprob_chunk: int = 8192
    """Vocabulary rows per chunk of the fused log-prob / entropy (live memory ∝ tokens × chunk, never × vocabulary)."""


@dataclass(frozen=True)
class ProfileConfig:
    """Per-stage profiling: `profile.json` beside `metrics.jsonl` (moslim_mega/profile.py)."""

    enabled: bool = True
    """Write profile.json (wall, phases, tokens/s, device-hours, FLOPs, MFU, peak memory) for every stage."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s per device for MFU (0 = the bf16 dense table by GPU name; on CPU MFU stays null)."""
    torch_trace_steps: str = ""
    """`A:B` = record a torch.profiler trace of steps A..B-1 into `<run dir>/torch_trace/` (empty = off)."""


@dataclass(frozen=True)
class SlurmConfig:
    """`moslim launch slurm`: the sbatch job around one stage (slurm/README.md)."""

    nodes: int = 1
    """Nodes (one srun task, one torchrun agent per node)."""
    gpus_per_node: int = 8
    """GPUs requested per node (`--gpus-per-node`); 0 = a CPU job (gloo)."""
    nproc_per_node: int = 0
    """Ranks per node (torchrun --nproc_per_node); 0 = gpus_per_node, or 1 without GPUs."""
    cpus_per_task: int = 0
    """CPUs of each node's task (`--cpus-per-task`); 0 = not requested (the partition's default)."""
    partition: str = ""
    """`--partition` ('' = the cluster's default)."""
    account: str = ""
    """`--account` ('' = none)."""
    time: str = "04:00:00"
    """`--time` limit of one run (a requeued run gets it again)."""
    qos: str = ""
    """`--qos` ('' = none)."""
    job_name: str = ""
    """`--job-name`; '' = moslim-<stage> (e.g. moslim-rm-train)."""
    container_image: str = ""
    """pyxis/enroot `--container-image` of the srun step ('' = no container)."""
    container_mounts: str = ""
    """pyxis `--container-mounts` (e.g. /data:/data,/runs:/runs)."""
    setup: tuple[str, ...] = ("source .venv/bin/activate",)
    """Shell lines run before the job (venv activation, `module load ...`); empty = none."""
    python: str = "python"
    """Interpreter that runs the node wrapper and torchrun (after `setup`)."""
    port: int = 29500
    """c10d rendezvous port on the first node."""
    socket_ifname: str = ""
    """NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME ('' = let NCCL/Gloo choose)."""
    env: tuple[str, ...] = ()
    """Extra `KEY=VALUE` exports for every rank (e.g. NCCL_IB_HCA=mlx5)."""
    signal_seconds: int = 300
    """Seconds before the time limit at which Slurm sends USR1 (checkpoint, then requeue)."""
    max_requeues: int = 3
    """Requeues after a preemption/time-limit checkpoint (SLURM_RESTART_COUNT below this: requeue)."""
    extra_sbatch: tuple[str, ...] = ()
    """Further `#SBATCH` options, verbatim (e.g. --exclusive, --mem=0)."""
    dependency: str = ""
    """`--dependency` of the job (the pipeline sets afterok:<id> itself)."""


@dataclass(frozen=True)
class LaunchConfig:
    """How `moslim launch` submits stages to a cluster scheduler."""

    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """sbatch job settings."""


@dataclass(frozen=True)
class RunConfig:
    """Where and how a run executes."""

    seed: int = 0
    """Seed of model init, data order and sampling."""
    data_dir: str = ""
    """Directory with train/eval jsonl (empty = build the embedded world into the run dir)."""
    num_threads: int = 0
    """torch intra-op threads (0 = leave torch's default)."""
    device: str = "auto"
    """Training device of a single-process run: `auto` (CUDA when available, else CPU), `cuda` or `cpu`; under torchrun each rank uses its local GPU when CUDA is available."""
    tensorboard: bool = True
    """Also write TensorBoard event files beside metrics.jsonl."""


@dataclass(frozen=True)
class Config:
    """The root of the configuration tree."""

    run: RunConfig = field(default_factory=RunConfig)
    """Run-level settings."""
    prefs: PrefsConfig = field(default_factory=PrefsConfig)
    """Preference dimensions."""
    world: WorldConfig = field(default_factory=WorldConfig)
    """Embedded world."""
    rm: RewardConfig = field(default_factory=RewardConfig)
    """Reward-model training."""
    mapping: MappingConfig = field(default_factory=MappingConfig)
    """Reward mapping."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Rollout sampling."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout engine, weight push and stale-weight guard."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised warm start of the policy."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """Policy optimisation."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Controllability evaluation."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Resumable training checkpoints (SFT, RM and policy stages)."""
    bench: BenchConfig = field(default_factory=BenchConfig)
    """Public benchmarks and judges (`moslim eval bench`)."""
    compare: CompareConfig = field(default_factory=CompareConfig)
    """Baselines and `moslim compare`."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Distributed layout under torchrun (ignored in a single process)."""
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    """Which implementation the fused kernels run."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """Per-stage profiling (profile.json)."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """Cluster submission (`moslim launch slurm`)."""


# ---- choices that are checked beyond their type --------------------------------------------
_CHOICES = {
    (RewardConfig, "loss"): ("per_head_ce", "paper_eq10"),
    (RewardConfig, "class_weights"): ("none", "balanced"),
    (RewardConfig, "stats_mode"): ("welford", "ema"),
    (MappingConfig, "kind"): ("zscore", "logprob", "neg_abs_dist"),
    (MappingConfig, "normalize_by"): ("all", "named"),
    (ModelConfig, "dtype"): ("float32", "bfloat16"),
    (PolicyConfig, "algo"): ("ppo", "rloo", "online_dpo"),
    (PolicyConfig, "kl_estimator"): ("k1", "k2", "k3"),
    (PolicyConfig, "dpo_loss"): ("sigmoid", "ipo"),
    (PolicyConfig, "rollout_correction"): ("none", "token_tis", "seq_tis"),
    (RolloutConfig, "engine"): ("hf", "vllm"),
    (RolloutConfig, "sleep_level"): (0, 1, 2),
    (BenchConfig, "rm_score"): ("mapped", "expected"),
    (ParallelConfig, "backend"): ("torch", "megatron"),
    (ParallelConfig, "mixed_precision"): ("none", "bf16"),
    (ParallelConfig, "fp8"): ("none", *FP8_TORCH, *FP8_MEGATRON_ONLY),
    (ParallelConfig, "pp_schedule"): ("gpipe", "1f1b", "interleaved_1f1b"),
    (KernelsConfig, "impl"): ("auto", "triton", "reference"),
    (RunConfig, "device"): ("auto", "cuda", "cpu"),
}
# ---- lower bounds checked at load time -------------------------------------------------------
_MINIMUM = {
    (KernelsConfig, "logprob_chunk"): 1,
    (ParallelConfig, "pp"): 1,
    (ParallelConfig, "pp_microbatches"): 0,
    (ParallelConfig, "pp_stages_per_rank"): 1,
    (ProfileConfig, "peak_tflops"): 0.0,
    (RolloutConfig, "tensor_parallel_size"): 1,
    (RolloutConfig, "max_model_len"): 0,
    (RolloutConfig, "push_bucket_mb"): 1,
    (RolloutConfig, "max_logprob_diff"): 0.0,
    (RolloutConfig, "kv_cache_memory_bytes"): 1,
    (PolicyConfig, "rollout_correction_cap"): 1.0,
    (SlurmConfig, "nodes"): 1,
    (SlurmConfig, "gpus_per_node"): 0,
    (SlurmConfig, "nproc_per_node"): 0,
    (SlurmConfig, "cpus_per_task"): 0,
    (SlurmConfig, "port"): 1,
    (SlurmConfig, "signal_seconds"): 0,
    (SlurmConfig, "max_requeues"): 0,
}


# ---- reading ---------------------------------------------------------------------------------
class _Override:
    """A command-line value: YAML-parsed, but string and boolean fields fall back to the typed
    text, so ``run.data_dir=2024`` is the string ``2024`` and ``rm.calibrate=1`` is True rather
    than integers that fail the type check."""

    __slots__ = ("raw", "parsed")

    def __init__(self, raw: str, parsed):
        self.raw, self.parsed = raw, parsed

    def __repr__(self) -> str:
        return repr(self.raw)


def _coerce(value, tp, key: str):
    """Check/convert one leaf value to the annotated type; ConfigError names the key."""
    if isinstance(value, _Override):
        value = value.raw.strip() if tp in (str, bool) and not isinstance(value.parsed, tp) else value.parsed
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.strip("[]()").split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    raise ConfigError(f"{key}: unsupported field type {tp}")  # internal: a new annotation kind


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown config key {where!r}; known here: {', '.join(sorted(known))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], key)
        else:
            value = _coerce(data[f.name], tp, key)
            choices = _CHOICES.get((cls, f.name))
            if choices and value not in choices:
                raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
            low = _MINIMUM.get((cls, f.name))
            if low is not None and value < low:
                raise ConfigError(f"{key}: must be >= {low}, got {value!r}")
            kwargs[f.name] = value
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like a.b=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is None:
        value = raw
    if isinstance(value, (dict, list)):  # a section or a list: YAML's typing stands, as in a file
        return key.strip().split("."), value
    return key.strip().split("."), _Override(raw, value)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), cls=Config):
    """YAML recipe (optional) + ``a.b=value`` overrides → a validated frozen config tree."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text())
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded
    for text in overrides:
        keys, value = _parse_override(text)
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
            node = nxt
        node[keys[-1]] = value
    return _build(cls, data, "")


def to_dict(cfg) -> dict:
    """Plain dict (tuples as lists) for YAML/JSON."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def save_config(cfg, run_dir: str | Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml``."""
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def field_docs(cls=Config, prefix: str = "") -> list[tuple[str, str, object, str]]:
    """(key, type, default, docstring) for every leaf, read from the string under each field."""
    docs = _attribute_docstrings(cls)
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(field_docs(tp, key))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((key, _type_name(tp), default, docs.get(f.name, "")))
    return rows


def _type_name(tp) -> str:
    if typing.get_origin(tp) is tuple:
        return f"list[{typing.get_args(tp)[0].__name__}]"
    return tp.__name__ if isinstance(tp, type) else str(tp)


def _attribute_docstrings(cls) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = nxt.value.value.strip()
    return docs


def missing_docs(cls=Config) -> list[str]:
    """Leaves without a docstring (a test keeps this empty)."""
    return [key for key, _t, _d, doc in field_docs(cls) if not doc]

