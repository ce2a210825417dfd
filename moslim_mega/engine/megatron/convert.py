"""``moslim convert hf-to-megatron`` / ``megatron-to-hf``: HF ⇄ megatron-core checkpoints.

A Megatron checkpoint directory written here::

    moslim_megatron.json            format version, kind (causal_lm | reward_model), architecture,
                                    vocabulary (real and padded), the layout it was checked for
    hf/                             the HF config.json, generation config and tokenizer files
    rm/                             reward model only: rm.json, mapping_stats.json (+ config.yaml)
    latest_checkpointed_iteration.txt   "release" (Megatron-LM's directory convention)
    release/                        the megatron.core.dist_checkpointing checkpoint (torch_dist):
                                    GPTModel's sharded-state-dict keys, plus ``reward_heads.weight``
                                    [C, D] / ``reward_heads.bias`` [C] for the RM (C = ΣK_i);
                                    common.pt holds Megatron-LM's ``checkpoint_version`` and
                                    ``iteration``, so load ``{"model": model.sharded_state_dict()}``

Both directions stream: a tensor is read from the source when the destination writes it, so a
72B model is never whole in memory (peak: one layer's, or one expert's, largest tensor and its
HF pieces; the HF writer buffers up to ``max_shard_bytes``). A reward-model directory
(``moslim_mega.reward.io``) converts to a Megatron checkpoint with the RM heads and back to an
RM directory that ``load_reward_model`` loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import MEGATRON_CORE_VERSION
from .config import params_dtype
from .dims import ConversionError, Layout, ModelDims, check_layout, model_dims
from .dist_ckpt import StreamingReader, process_group, save_streaming
from .mapping import (GLOBAL, MissingTensorError, Rule, ShapeMismatchError, hf_shapes, instances, rules, to_hf,
                      to_megatron)

FORMAT_VERSION = 1
META_FILE = "moslim_megatron.json"
TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
LAYOUT_FILE = "moslim_layout.json"
"""In a megatron engine's training checkpoint (``engine.MegatronCheckpoint``): the tp/pp/ep layout
it was written under."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Non-persistent HF buffers that some checkpoints still carry; they have no Megatron tensor.
IGNORED_HF = ("rotary_emb.inv_freq",)
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class HFTensorSource:
    """Lazy reader of the safetensors files of an HF model directory (single file or index)."""

    def __init__(self, model_dir: str | Path, extra: dict[str, Path] | None = None):
        """``extra``: more files, as {name prefix: safetensors file} (the RM's heads)."""
        self.dir = Path(model_dir)
        self.files: dict[str, tuple[Path, str]] = {}  # name → (file, name inside the file)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: (self.dir / f, name) for name, f in weight_map.items()}
        elif (self.dir / "model.safetensors").is_file():
            self._add(self.dir / "model.safetensors", "")
        else:
            raise ConversionError(f"{self.dir}: no model.safetensors or model.safetensors.index.json "
                                  "(only safetensors checkpoints are converted)")
        for prefix, path in (extra or {}).items():
            self._add(path, prefix)

    def _add(self, path: Path, prefix: str) -> None:
        with safe_open(path, "pt") as f:
            self.files.update({prefix + name: (path, name) for name in f.keys()})

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise MissingTensorError(f"{self.dir}: tensor {name} is missing from the HF checkpoint")
        path, inner = self.files[name]
        with safe_open(path, "pt") as f:
            return f.get_tensor(inner)

    def shape(self, name: str) -> tuple[int, ...]:
        """From the file header: no tensor data is read."""
        path, inner = self.files[name]
        with safe_open(path, "pt") as f:
            return tuple(f.get_slice(inner).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        path, inner = self.files[name]
        with safe_open(path, "pt") as f:
            return _ST_DTYPES.get(f.get_slice(inner).get_dtype(), torch.float32)


class HFShardWriter:
    """Writes HF safetensors shards of at most ``max_shard_bytes`` (+ the index when several)."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = 4 << 30):
        self.dir, self.max_bytes = out_dir, max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = self.total = 0  # bytes of tensors: buffered, written
        self.shards: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.buffered and self.buffered + tensor.nbytes > self.max_bytes:
            self._flush()
        self.buffer[name] = tensor.contiguous()
        self.buffered += tensor.nbytes

    def _flush(self) -> None:
        path = self.dir / f"model-part-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.buffer, path, metadata={"format": "pt"})
        self.shards.append((path, list(self.buffer)))
        self.total += self.buffered
        self.buffer, self.buffered = {}, 0

    def close(self) -> None:
        if self.buffer or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.dir / "model.safetensors")
            return
        n, weight_map = len(self.shards), {}
        for i, (path, names) in enumerate(self.shards, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _copy_non_weights(src: Path, dst: Path) -> None:
    """Config, generation config and tokenizer files: everything but weights and their index."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
            shutil.copy2(f, dst / f.name)


def _parse_dtype(dtype: str | None, fallback: torch.dtype) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype in (None, "auto"):
        return fallback
    if dtype not in table:
        raise ConversionError(f"dtype={dtype!r}: expected auto, fp32, bf16 or fp16")
    return table[dtype]


def _source(path: Path) -> tuple[str, Path, dict, dict]:
    """(kind, HF model dir, HF config, RM meta) of a source directory."""
    if (path / "rm.json").is_file():
        meta = json.loads((path / "rm.json").read_text())
        for name in ("backbone/config.json", "heads.safetensors", "mapping_stats.json"):
            if not (path / name).exists():
                raise ConversionError(f"{path}: reward-model directory without {name}")
        return "reward_model", path / "backbone", json.loads((path / "backbone/config.json").read_text()), meta
    if not (path / "config.json").is_file():
        raise ConversionError(f"{path}: neither an HF model directory (config.json) nor an RM directory (rm.json)")
    return "causal_lm", path, json.loads((path / "config.json").read_text()), {}


def _check_source(source: HFTensorSource, dims: ModelDims, rule_list: list[Rule]) -> set[str]:
    """The HF names the rules read, after checking — from the file headers, before anything is
    written — that none is missing, none would be silently dropped, and every shape fits the config."""
    needed = {n for r in rule_list for lay, e in instances(dims, r) for n in r.hf_names(dims, lay, e)}
    missing = sorted(n for n in needed if n not in source.files)
    if missing:
        raise MissingTensorError(f"{source.dir}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    extra = sorted(n for n in source.files if n not in needed and not n.endswith(IGNORED_HF))
    if extra:
        raise ConversionError(f"{source.dir}: tensor {extra[0]} has no Megatron mapping ({len(extra)} unmapped)")
    for rule in rule_list:
        for layer, expert in instances(dims, rule):
            for name, shape in zip(rule.hf_names(dims, layer, expert), hf_shapes(rule, dims)):
                if source.shape(name) != tuple(shape):
                    raise ShapeMismatchError(f"{source.dir}: {name} has shape {source.shape(name)}, the config "
                                             f"implies {tuple(shape)}")
    return needed


def hf_to_megatron(src: str | Path, out: str | Path, layout: Layout = Layout(), dtype: str | None = None) -> dict:
    """Convert an HF causal LM or an RM directory into a Megatron checkpoint directory (module doc)."""
    src, out = Path(src), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"{out}: not empty; hf-to-megatron writes into a new or empty directory")
    kind, hf_dir, config, rm_meta = _source(src)
    dims = model_dims(config, tp=layout.tp, backbone=kind == "reward_model")
    check_layout(dims, layout)
    num_classes = sum(rm_meta.get("num_classes", []))
    source = HFTensorSource(hf_dir, {"heads.": src / "heads.safetensors"} if kind == "reward_model" else None)
    rule_list = rules(dims, num_classes)
    target = _parse_dtype(dtype, source.dtype(rule_list[0].hf_names(dims)[0]))

    def get_whole(rule: Rule, layer, expert) -> torch.Tensor:
        names = rule.hf_names(dims, layer, expert)
        return to_megatron(rule, dims, [source.get(n) for n in names], names)

    needed = _check_source(source, dims, rule_list)
    out.mkdir(parents=True, exist_ok=True)
    save_streaming(out / RELEASE, dims, rule_list, target, get_whole,
                   common={"checkpoint_version": 3.0, "iteration": 0})
    (out / TRACKER).write_text(RELEASE)
    _copy_non_weights(hf_dir, out / "hf")
    if target != params_dtype(config):
        # The config travels with the weights: it states the dtype they now have.
        (out / "hf/config.json").write_text(json.dumps({**config, "dtype": _DTYPE_NAMES[target]}, indent=2))
    if kind == "reward_model":
        _copy_non_weights(src, out / "rm")
    meta = {"format_version": FORMAT_VERSION, "kind": kind, "arch": dims.arch, "vocab_size": dims.vocab_size,
            "padded_vocab_size": dims.padded_vocab_size, "layout": layout.to_dict(), "dtype": str(target),
            "num_reward_classes": num_classes, "megatron_core": MEGATRON_CORE_VERSION}
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return {**meta, "out": str(out), "tensors": len(needed)}


def read_meta(ckpt: Path) -> tuple[dict, dict, ModelDims]:
    """(moslim_megatron.json, HF config, dims) of a Megatron checkpoint written here."""
    if not (ckpt / META_FILE).is_file():
        raise ConversionError(f"{ckpt}: no {META_FILE} (not written by moslim convert hf-to-megatron)")
    meta = json.loads((ckpt / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConversionError(f"{ckpt}/{META_FILE}: unsupported format_version {meta.get('format_version')!r}")
    config = json.loads((ckpt / "hf/config.json").read_text())
    dims = model_dims(config, backbone=meta["kind"] == "reward_model")
    dims = ModelDims(**{**dims.__dict__, "padded_vocab_size": int(meta["padded_vocab_size"])})
    return meta, config, dims


def _read_batches(dims: ModelDims, rule_list: list[Rule]):
    """The tensors to read, grouped: each global tensor alone, then one group per layer."""
    for rule in rule_list:
        if rule.scope == GLOBAL:
            yield [(rule, None, None)]
    for layer in range(dims.num_layers):
        yield [(rule, lay, e) for rule in rule_list if rule.scope != GLOBAL
               for lay, e in instances(dims, rule) if lay == layer]


def iter_checkpoint_hf_tensors(ckpt_dir: Path, dims: ModelDims, num_reward_classes: int = 0):
    """(HF name, whole tensor) of every HF tensor of a megatron dist checkpoint — ``release/`` of
    a converted checkpoint or a megatron-engine training checkpoint (``MegatronCheckpoint``: its
    optimizer keys are not read) — one megatron load per layer, so only that layer's tensors are
    in memory together. Consume it whole (it holds a process group while it runs)."""
    reader = StreamingReader(ckpt_dir, dims)
    with process_group():  # one group for all the loads
        for batch in _read_batches(dims, rules(dims, num_reward_classes)):
            for (rule, layer, expert), whole in zip(batch, reader.read(batch)):
                yield from zip(rule.hf_names(dims, layer, expert), to_hf(rule, dims, whole, rule.key))


def engine_checkpoint_tensors(ckpt_dir: str | Path, hf_config: dict, role: str,
                              num_reward_classes: int = 0) -> dict[str, torch.Tensor]:
    """{HF name: tensor} of the model in a megatron engine's checkpoint directory
    (``ckpt/step_N/engine/<name>``; ``hf_config`` from the checkpoint's assets): what ``moslim
    export hf`` writes. Its layout file gives the vocabulary padding the engine used."""
    ckpt_dir = Path(ckpt_dir)
    layout = json.loads((ckpt_dir / LAYOUT_FILE).read_text())
    dims = model_dims(hf_config, tp=int(layout["tp"]), backbone=role != "causal_lm")
    return dict(iter_checkpoint_hf_tensors(ckpt_dir, dims, num_reward_classes))


def megatron_to_hf(ckpt: str | Path, out: str | Path, max_shard_bytes: int = 4 << 30) -> dict:
    """Convert a Megatron checkpoint directory (module doc) back into an HF model / RM directory."""
    ckpt, out = Path(ckpt), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"{out}: not empty; megatron-to-hf writes into a new or empty directory")
    meta, config, dims = read_meta(ckpt)
    release = ckpt / ((ckpt / TRACKER).read_text().strip() if (ckpt / TRACKER).is_file() else RELEASE)
    is_rm = meta["kind"] == "reward_model"
    hf_dir = out / "backbone" if is_rm else out
    hf_dir.mkdir(parents=True, exist_ok=True)
    writer, heads = HFShardWriter(hf_dir, max_shard_bytes), {}
    count = 0
    for name, t in iter_checkpoint_hf_tensors(release, dims, int(meta.get("num_reward_classes", 0))):
        if name.startswith("heads."):
            heads[name.removeprefix("heads.")] = t
        else:
            writer.add(name, t)
        count += 1
    writer.close()
    _copy_non_weights(ckpt / "hf", hf_dir)
    if is_rm:
        save_file(heads, out / "heads.safetensors")
        _copy_non_weights(ckpt / "rm", out)
    return {**meta, "out": str(out), "tensors": count}
