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


def test_engine_refuses_left_padded_rows():
    import torch

    ids = torch.ones(2, 4, dtype=torch.long)
    MegatronEngine._check_micro({"ids_BT": ids, "mask_BT": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])})
    with pytest.raises(MegatronEngineError, match="mask_BT: rows must be right-padded"):
        MegatronEngine._check_micro({"ids_BT": ids, "mask_BT": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])})


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


def test_megatron_backend_refuses_gpipe():
    from moslim_mega.config import ConfigError, ParallelConfig
    from moslim_mega.engine.megatron.engine import build_megatron_engine

    parallel = ParallelConfig(backend="megatron", pp=2, pp_schedule="gpipe")
    with pytest.raises(ConfigError, match="parallel.pp_schedule=gpipe: the megatron backend runs 1f1b or "
                                          "interleaved_1f1b only"):
        build_megatron_engine(parallel, "unused", "causal_lm", EngineSettings(lr=1e-3))
