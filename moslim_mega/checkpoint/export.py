"""``moslim export hf``: a (sharded) training checkpoint → a standard HF directory.

Reads only the chosen model's tensors from the DCP shards (never the optimizer state), in one
process and without a process group, whatever world size wrote them: DCP's metadata gives every
tensor's global shape, and ``dcp.load`` assembles the shards into whole tensors. The model is
rebuilt on the meta device from the HF config saved in ``assets/<name>/`` and the tensors are
assigned (strict: a missing or extra key is an error), so no random initialisation is spent.

* ``causal_lm`` (SFT model, policy actor) → ``save_pretrained`` safetensors + config + tokenizer:
  ``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads it.
* ``reward`` (the multi-head RM) → the RM directory of ``moslim_mega.reward.io`` (HF backbone,
  ``heads.safetensors``, ``mapping_stats.json``, ``rm.json``): ``load_reward_model(out)`` loads it.
  The mapping statistics are the running ones at the checkpoint's step (the final calibration
  pass of ``moslim rm train`` happens after training, not in a checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .manager import ENGINE_DIR, CheckpointError, check_dcp_metadata, resolve_checkpoint, safe_dcp_load

EXPORTABLE = ("causal_lm", "reward")


def list_models(ckpt: Path) -> dict[str, dict]:
    """{name: model.json} of the models a checkpoint carries export assets for."""
    assets = ckpt / "assets"
    if not assets.is_dir():
        return {}
    return {p.name: json.loads((p / "model.json").read_text()) for p in sorted(assets.iterdir())
            if (p / "model.json").is_file()}


def _choose(ckpt: Path, name: str | None) -> tuple[str, dict]:
    models = list_models(ckpt)
    exportable = {n: m for n, m in models.items() if m["kind"] in EXPORTABLE}
    if name is not None:
        if name not in models:
            raise CheckpointError(f"--model {name!r}: {ckpt} holds {sorted(models) or 'no exportable models'}")
        if name not in exportable:
            raise CheckpointError(f"--model {name!r}: a {models[name]['kind']} model; export supports {EXPORTABLE}")
        return name, exportable[name]
    if len(exportable) != 1:
        raise CheckpointError(f"{ckpt}: choose one of {sorted(exportable)} with --model" if exportable
                              else f"{ckpt}: no exportable model (assets/*/model.json)")
    return next(iter(exportable.items()))


def load_model_tensors(ckpt: Path, key: str) -> dict[str, torch.Tensor]:
    """Whole (unsharded) tensors of one model from a DCP checkpoint: {fqn: tensor} on CPU."""
    prefix = key + "."
    check_dcp_metadata(ckpt)  # read_metadata unpickles; only DCP's own records may be in there
    meta = dcp.FileSystemReader(str(ckpt)).read_metadata()
    sd = {}
    for fqn, md in meta.state_dict_metadata.items():
        if fqn.startswith(prefix) and isinstance(md, TensorStorageMetadata):
            sd[fqn] = torch.empty(md.size, dtype=md.properties.dtype)
    if not sd:
        raise CheckpointError(f"{ckpt}: no tensors under {key!r}")
    safe_dcp_load(sd, ckpt, no_dist=True)
    return {fqn[len(prefix):]: t for fqn, t in sd.items()}


def _engine_tensors(engine_dir: Path, assets: Path, info: dict) -> dict[str, torch.Tensor]:
    """The model of a megatron-engine checkpoint (``parallel.backend=megatron``: megatron's
    dist_checkpointing, resharded here into whole tensors) under the module names the DCP path
    gives: the RM's backbone tensors get ``backbone.``; a tied LM head its embedding."""
    try:
        from ..engine.megatron.convert import engine_checkpoint_tensors
    except ImportError as e:
        raise CheckpointError(f"{engine_dir}: written by the megatron engine; exporting it needs megatron-core "
                              f"({e})") from None
    check_dcp_metadata(engine_dir, allow_plans=True)
    config = json.loads((assets / "config.json").read_text())
    role = "causal_lm" if info["kind"] == "causal_lm" else "reward"
    classes = sum(info.get("num_classes", [])) if role == "reward" else 0
    tensors = engine_checkpoint_tensors(engine_dir, config, role, classes)
    if role == "reward":
        return {(k if k.startswith("heads.") else "backbone." + k): v for k, v in tensors.items()}
    if config.get("tie_word_embeddings") and "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    return tensors


def _assign(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    expected = set(module.state_dict())
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise CheckpointError(f"{what}: checkpoint keys do not match the model "
                              f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    module.load_state_dict(tensors, strict=True, assign=True)


def export_hf(ckpt: str | Path, out: str | Path, name: str | None = None) -> dict:
    """Export model ``name`` (default: the only exportable one) of checkpoint ``ckpt`` (a step
    directory or a checkpoint root with ``latest``) to ``out``; returns a summary."""
    path = resolve_checkpoint(ckpt)
    name, info = _choose(path, name)
    assets = path / "assets" / name
    if (path / ENGINE_DIR / name).is_dir():
        tensors = _engine_tensors(path / ENGINE_DIR / name, assets, info)
    else:
        tensors = load_model_tensors(path, info["key"])
    config = AutoConfig.from_pretrained(assets)
    tokenizer = AutoTokenizer.from_pretrained(assets) if (assets / "tokenizer_config.json").is_file() else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if info["kind"] == "causal_lm":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        _assign(model, tensors, f"{path}:{name}")
        model.save_pretrained(out, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    else:
        _export_reward(info, config, tensors, tokenizer, out, f"{path}:{name}")
    step = json.loads((path / "meta.json").read_text())["step"]
    return {"checkpoint": str(path), "model": name, "kind": info["kind"], "step": step, "out": str(out),
            "num_tensors": len(tensors)}


def _export_reward(info: dict, config, tensors: dict, tokenizer, out: Path, what: str) -> None:
    from ..prefs import PreferenceSpec
    from ..reward.io import save_reward_model
    from ..reward.mapping import RunningClassStats
    from ..reward.model import MultiHeadRewardModel

    with torch.device("meta"):
        model = MultiHeadRewardModel(AutoModel.from_config(config), tuple(info["num_classes"]))
    _assign(model, tensors, what)
    state = info["mapping_stats"]
    stats = RunningClassStats(state["num_classes"], mode=state["mode"], momentum=state["momentum"])
    stats.load_state_dict(state)
    if "max_length" not in info:
        raise CheckpointError(f"{what}: assets model.json has no max_length (the RM's training truncation); "
                              "this checkpoint predates it, export the RM from a newer checkpoint")
    save_reward_model(model, tokenizer, PreferenceSpec.from_dict(info["spec"]), stats, out,
                      max_length=info["max_length"])
