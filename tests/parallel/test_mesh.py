"""Layout checks that need no process group: the mesh shape from parallel.* and clear errors."""

from types import SimpleNamespace

import pytest
import torch

from moslim_mega.config import ConfigError, ParallelConfig, PolicyConfig, load_config
from moslim_mega.parallel.mesh import resolve_shape
from moslim_mega.parallel.policy import check_policy_layout
from moslim_mega.parallel.stage import Stage
from moslim_mega.parallel.vocab_parallel import vocab_shard_start


def test_dp_defaults_to_the_remaining_ranks():
    assert resolve_shape(ParallelConfig(tp=2), 8) == resolve_shape(ParallelConfig(dp=4, tp=2), 8)
    assert resolve_shape(ParallelConfig(tp=2), 8).dp == 4


@pytest.mark.parametrize("overrides,world,match", [
    (["parallel.pp=3"], 4, "parallel.pp=3 × parallel.tp=1 does not divide the world size 4"),
    (["parallel.pp=2", "parallel.dp=4"], 4, "parallel.pp=2 × parallel.dp=4 × parallel.tp=1 = 8 ≠ world size 4"),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"], 4, "pp_stages_per_rank >= 2"),
    (["parallel.pp=2", "parallel.pp_stages_per_rank=2"], 4, "parallel.pp_stages_per_rank=2: only interleaved"),
    (["parallel.cp=2"], 4, "parallel.cp=2"),
    (["parallel.tp=3"], 4, "parallel.tp=3 does not divide the world size 4"),
    (["parallel.dp=3", "parallel.tp=2"], 4, "parallel.dp=3 × parallel.tp=2 = 6 ≠ world size 4"),
])
def test_bad_layouts_name_the_key(overrides, world, match):
    with pytest.raises(ConfigError, match=match):
        resolve_shape(load_config(None, overrides).parallel, world)


def test_pipeline_shape_takes_the_outermost_dimension():
    shape = resolve_shape(ParallelConfig(pp=2, tp=2), 8)
    assert (shape.pp, shape.dp, shape.tp, shape.world) == (2, 2, 2, 8)
    assert resolve_shape(ParallelConfig(pp=2, pp_schedule="interleaved_1f1b", pp_stages_per_rank=2), 4).dp == 2


def test_pipeline_schedule_is_a_checked_choice():
    with pytest.raises(ConfigError, match="parallel.pp_schedule: 'zb' is not one of gpipe, 1f1b, interleaved_1f1b"):
        load_config(None, ["parallel.pp_schedule=zb"])
    with pytest.raises(ConfigError, match="parallel.pp_microbatches: must be >= 0"):
        load_config(None, ["parallel.pp_microbatches=-1"])


def test_stage_with_pp_needs_that_many_processes():
    # pp > 1 is run by the trainers through the pipeline engine (engine.build_engine); one process
    # cannot hold two stages' ranks.
    with pytest.raises(ConfigError, match=r"parallel.pp=2 × parallel.tp=1 does not divide the world size 1"):
        Stage(ParallelConfig(pp=2))


def test_mixed_precision_is_a_checked_choice():
    with pytest.raises(ConfigError, match="parallel.mixed_precision"):
        load_config(None, ["parallel.mixed_precision=fp8"])


def test_single_process_stage_is_inert():
    stage = Stage(ParallelConfig())
    assert not stage.distributed and stage.dp == 1 and stage.is_main
    assert stage.device.type == ("cuda" if torch.cuda.is_available() else "cpu")  # run.device=auto
    assert Stage(ParallelConfig(), "cpu").device == torch.device("cpu")
    items = list(range(7))
    assert stage.shard(items) == items


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_run_device_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ConfigError, match="run.device=cuda: torch.cuda.is_available"):
        Stage(ParallelConfig(), "cuda")
    with pytest.raises(ConfigError, match="run.device"):
        load_config(None, ["run.device=gpu"])


@pytest.mark.parametrize("n,dp", [(7, 2), (8, 4), (5, 3)])
def test_dp_shards_concatenate_to_the_global_batch(n, dp):
    parts = []
    for r in range(dp):
        stage = Stage.__new__(Stage)
        stage.dp_rank, stage.dp = r, dp
        parts.append(stage.shard(list(range(n))))
    assert sum(parts, []) == list(range(n)) and max(map(len, parts)) - min(map(len, parts)) <= 1


def test_vocab_shard_starts_follow_torch_chunk():
    import torch

    for V, tp in [(97, 2), (218, 4), (10, 3)]:
        sizes = [c.numel() for c in torch.arange(V).chunk(tp)]
        starts = [sum(sizes[:r]) for r in range(tp)]
        assert [vocab_shard_start(V, r, tp) for r in range(tp)] == starts


def test_policy_layout_refusals():
    with pytest.raises(ConfigError, match="prompts_per_step=5 must be divisible by parallel.dp=2"):
        check_policy_layout(SimpleNamespace(dp=2), PolicyConfig(prompts_per_step=5))
    with pytest.raises(ConfigError, match="online_dpo runs with parallel.dp=1"):
        check_policy_layout(SimpleNamespace(dp=2), PolicyConfig(algo="online_dpo", prompts_per_step=4))
    check_policy_layout(SimpleNamespace(dp=1), PolicyConfig(algo="online_dpo", prompts_per_step=5))  # tp only: fine


def test_policy_layout_pp_microbatches():
    """Under pp the update's micro-batches (policy.micro_batch_size cuts of each mini-batch) must
    number parallel.pp_microbatches when it is set; Online-DPO's follow its pairs and cannot."""
    from moslim_mega.config import ParallelConfig

    def stage(dp=1, pp=2, micro=0):
        return SimpleNamespace(dp=dp, pp=pp, pc=ParallelConfig(pp=pp, pp_microbatches=micro))

    pc = PolicyConfig(prompts_per_step=4, samples_per_prompt=2, mini_batch_size=8, micro_batch_size=2)
    check_policy_layout(stage(micro=4), pc)  # 8 rows per dp rank: one mini-batch of 4 micro-batches
    check_policy_layout(stage(micro=0), pc)  # 0: whatever the cuts give
    with pytest.raises(ConfigError, match=r"parallel.pp_microbatches=2: .*policy.micro_batch_size=2, i.e. \[4\]"):
        check_policy_layout(stage(micro=2), pc)
    with pytest.raises(ConfigError, match=r"i.e. \[2, 4\]"):  # 12 rows: mini-batches of 8 and 4
        check_policy_layout(stage(micro=4), PolicyConfig(prompts_per_step=6, samples_per_prompt=2,
                                                        mini_batch_size=8, micro_batch_size=2))
    with pytest.raises(ConfigError, match="pp_microbatches=4 with policy.algo=online_dpo"):
        check_policy_layout(stage(micro=4), PolicyConfig(algo="online_dpo", prompts_per_step=4))
    check_policy_layout(stage(micro=4, pp=1), PolicyConfig(prompts_per_step=4))  # no pipeline: not checked
