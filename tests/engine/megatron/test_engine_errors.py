"""The megatron engine refuses what it cannot do before building anything, naming the field."""

import pytest

from moslim_mega.engine.megatron.dims import Layout
from moslim_mega.engine.megatron.engine import EngineSettings, MegatronEngine, MegatronEngineError

from .tiny_hf import hf_config


@pytest.mark.parametrize("role, layout, classes, message", [
    ("policy", Layout(), (), "role='policy': expected one of causal_lm, reward, value"),
    ("causal_lm", Layout(vpp=2), (), "vpp=2 virtual pipeline stages need pp > 1"),
    ("reward", Layout(), (), "num_classes: the reward role needs"),
    ("causal_lm", Layout(), (), "torch.distributed is not initialised"),
])
def test_engine_refuses(role, layout, classes, message):
    config = hf_config("qwen2").to_dict()
    with pytest.raises(MegatronEngineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MegatronEngine(config, lambda name: None, role, layout, EngineSettings(lr=1e-3), classes)


def test_left_padded_rows_are_rolled_to_the_front_and_holes_refused():
    import torch

    from moslim_mega.engine.base import LogprobOut
    from moslim_mega.engine.megatron.engine import _roll_back

    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    adv = torch.arange(10.0).reshape(2, 5)
    micro, lead = MegatronEngine._front_aligned({"ids_BT": ids, "mask_BT": mask, "adv_BT": adv,
                                                 "seq_B": torch.tensor([1.0, 2.0])})
    assert micro["ids_BT"].tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 0]]
    assert micro["mask_BT"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert micro["adv_BT"].tolist() == [[2.0, 3.0, 4.0, 0.0, 1.0], [5.0, 6.0, 7.0, 8.0, 9.0]]
    assert micro["seq_B"].tolist() == [1.0, 2.0] and lead.tolist() == [2, 0]
    back = _roll_back(LogprobOut(micro["adv_BT"], micro["adv_BT"] * 2), lead)
    assert torch.equal(back.logp_BT, adv) and torch.equal(back.entropy_BT, adv * 2)
    right = {"ids_BT": ids, "mask_BT": torch.ones_like(mask)}
    assert MegatronEngine._front_aligned(right) == (right, None)
    with pytest.raises(MegatronEngineError, match="attended tokens must be contiguous"):
        MegatronEngine._front_aligned({"ids_BT": ids, "mask_BT": torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]])})


class _OneProcessStage:
    distributed = False


@pytest.mark.parametrize("role, stage, init_dir, message", [
    ("causal_lm", None, None, "parallel.backend=megatron: the sft trainer does not run the megatron engine"),
    ("causal_lm", _OneProcessStage(), "init", "parallel.backend=megatron: needs torchrun"),
])
def test_build_engine_refuses_megatron_before_building_a_model(role, stage, init_dir, message):
    from moslim_mega.config import ConfigError, ParallelConfig
    from moslim_mega.engine import build_engine

    def build():
        raise AssertionError("no model may be built")

    with pytest.raises(ConfigError, match=message):
        build_engine(ParallelConfig(backend="megatron"), build, lambda m: None, role, "model", stage=stage, optim={},
                     init_dir=init_dir, label="sft")


def test_policy_refuses_megatron_under_pp_before_building_anything(tmp_path):
    from moslim_mega.config import ConfigError, load_config
    from moslim_mega.policy.controller import train_policy

    cfg = load_config(None, ["parallel.backend=megatron", "parallel.pp=2"])
    with pytest.raises(ConfigError, match="parallel.backend=megatron with parallel.pp=2: the policy's reference"):
        train_policy(cfg, tmp_path / "out", tmp_path / "no_sft", tmp_path / "no_rm", tmp_path / "no_prompts")
    assert not (tmp_path / "out").exists()


def test_megatron_backend_refuses_gpipe():
    from moslim_mega.config import ConfigError, ParallelConfig
    from moslim_mega.engine.megatron.engine import build_megatron_engine

    parallel = ParallelConfig(backend="megatron", pp=2, pp_schedule="gpipe")
    with pytest.raises(ConfigError, match="parallel.pp_schedule=gpipe: the megatron backend runs 1f1b or "
                                          "interleaved_1f1b only"):
        build_megatron_engine(parallel, "unused", "causal_lm", EngineSettings(lr=1e-3))
