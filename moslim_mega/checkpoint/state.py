"""What goes into a resumable checkpoint, split by how it is stored.

* **Sharded tensors** (torch.distributed.checkpoint): each model's state dict and each
  optimizer's state, taken with ``get_model_state_dict`` / ``get_optimizer_state_dict`` so that
  FSDP2/DTensor-sharded models save their local shards and plain models save whole tensors.
  DCP keys are ``model_<name>.<fqn>`` and ``optim_<name>.…``.
* **Per-rank loop state** (``extra_rank<r>.json``): RNG states (torch CPU/CUDA, python
  ``random``, numpy), the loop's own state (step, data order, ``torch.Generator`` /
  ``random.Random`` states, scheduler, KL controller, running statistics, metrics-file offset).
  Small; plain JSON (:func:`encode_state`), never a pickle, so reading a checkpoint someone
  hands you runs no code.
* **Assets** (rank 0, ``assets/<name>/``): what ``moslim export hf`` needs to rebuild a standard
  HF model without the training code's config: the HF ``config.json``, the tokenizer and a
  ``model.json`` (kind, and for the RM its class counts, preference spec and mapping statistics).
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

MODEL_KINDS = ("causal_lm", "reward", "value")
"""``causal_lm``: a HF ``*ForCausalLM``; ``reward``: ``MultiHeadRewardModel``; ``value``: the critic."""


def model_key(name: str) -> str:
    return f"model_{name}"


def optim_key(name: str) -> str:
    return f"optim_{name}"


def rng_state() -> dict:
    """Every global RNG a training step may draw from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class LoopStateError(ValueError):
    """A loop-state file that is not the JSON this module writes; the message names the file."""


# Tags of values JSON has no type for. A decoder that meets any other "__…__" key refuses.
_TUPLE, _TENSOR, _NDARRAY, _DICT = "__tuple__", "__tensor__", "__ndarray__", "__dict__"
_TAGS = (_TUPLE, _TENSOR, _NDARRAY, _DICT)


def _array_to_json(dtype: str, shape, raw: bytes) -> dict:
    return {"dtype": dtype, "shape": list(shape), "b64": base64.b64encode(raw).decode("ascii")}


def encode_state(obj, where: str = "state"):
    """A JSON-able form of loop state: tuples, tensors and numpy arrays (bit-exact, base64) and
    dicts with non-string keys are tagged; anything else unknown is a bug of the caller."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [encode_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {_TUPLE: [encode_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        return {_TENSOR: _array_to_json(str(t.dtype).removeprefix("torch."), t.shape,
                                        t.reshape(-1).view(torch.uint8).numpy().tobytes())}
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        return {_NDARRAY: _array_to_json(a.dtype.str, a.shape, a.tobytes())}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: encode_state(v, f"{where}.{k}") for k, v in obj.items()}
        return {_DICT: [[encode_state(k, where), encode_state(v, f"{where}.{k}")] for k, v in obj.items()]}
    raise TypeError(f"{where}: {type(obj).__name__} cannot go into a checkpoint's loop state")


def _array_bytes(spec, where: str) -> tuple[str, list, bytes]:
    if not (isinstance(spec, dict) and isinstance(spec.get("dtype"), str) and isinstance(spec.get("shape"), list)
            and all(isinstance(n, int) and n >= 0 for n in spec["shape"]) and isinstance(spec.get("b64"), str)):
        raise LoopStateError(f"{where}: malformed array (expected dtype, shape, b64)")
    return spec["dtype"], spec["shape"], base64.b64decode(spec["b64"], validate=True)


def _decode_tensor(spec, where: str) -> torch.Tensor:
    dtype_name, shape, raw = _array_bytes(spec, where)
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise LoopStateError(f"{where}: unknown tensor dtype {dtype_name!r}")
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape).clone()


def _decode_ndarray(spec, where: str) -> np.ndarray:
    dtype_name, shape, raw = _array_bytes(spec, where)
    try:
        dtype = np.dtype(dtype_name)
    except TypeError:
        raise LoopStateError(f"{where}: unknown array dtype {dtype_name!r}") from None
    if dtype.hasobject:  # object arrays would need a pickle
        raise LoopStateError(f"{where}: array dtype {dtype_name!r} is not plain data")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def decode_state(obj, where: str = "state"):
    """Inverse of :func:`encode_state`; refuses any tag it does not know."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [decode_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if not isinstance(obj, dict):
        raise LoopStateError(f"{where}: unexpected {type(obj).__name__}")
    tags = [k for k in obj if k.startswith("__") and k.endswith("__")]
    if not tags:
        return {k: decode_state(v, f"{where}.{k}") for k, v in obj.items()}
    if len(obj) != 1 or tags[0] not in _TAGS:
        raise LoopStateError(f"{where}: unknown tagged value {sorted(obj)}")
    tag, value = tags[0], obj[tags[0]]
    if tag == _TENSOR:
        return _decode_tensor(value, where)
    if tag == _NDARRAY:
        return _decode_ndarray(value, where)
    if not isinstance(value, list):
        raise LoopStateError(f"{where}: {tag} must hold a list")
    if tag == _TUPLE:
        return tuple(decode_state(v, f"{where}[{i}]") for i, v in enumerate(value))
    if not all(isinstance(kv, list) and len(kv) == 2 for kv in value):
        raise LoopStateError(f"{where}: {_DICT} must hold [key, value] pairs")
    return {decode_state(k, where): decode_state(v, f"{where}[{k!r}]") for k, v in value}


def write_loop_state(path: Path, state: dict) -> None:
    Path(path).write_text(json.dumps(encode_state(state)))


def read_loop_state(path: Path) -> dict:
    """The loop state in ``path``; anything but this module's JSON (a pickle, say) is refused."""
    raw = Path(path).read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoopStateError(f"{path}: not a JSON loop-state file (checkpoints never hold pickles; "
                             "refusing to read it)") from None
    if not isinstance(data, dict):
        raise LoopStateError(f"{path}: the loop state must be a JSON object")
    try:
        state = decode_state(data)
    except (ValueError, TypeError) as e:  # base64/shape errors from the arrays
        raise LoopStateError(f"{path}: {e}") from None
    return state


def tensor_state(models: dict, optimizers: dict) -> dict:
    """The DCP state dict: ``models`` {name: module}, ``optimizers`` {name: (module, optimizer)}."""
    opts = StateDictOptions(full_state_dict=False, cpu_offload=False)
    sd = {model_key(n): get_model_state_dict(m, options=opts) for n, m in models.items()}
    for n, (m, opt) in optimizers.items():
        sd[optim_key(n)] = get_optimizer_state_dict(m, opt, options=_optim_options(m, opts))
    return sd


def _optim_options(model, opts: StateDictOptions) -> StateDictOptions:
    """Pipeline stages (engine/pipeline.py sets ``flatten_optimizer_state``) hold different
    parameters per rank: their optimizer state is keyed per parameter name ("param_groups.<fqn>.lr"),
    else DCP would keep one rank's ``param_groups`` list for all. Other models keep the nested
    layout their existing checkpoints have."""
    if getattr(model, "flatten_optimizer_state", False):
        return StateDictOptions(full_state_dict=opts.full_state_dict, cpu_offload=opts.cpu_offload,
                                flatten_optimizer_state_dict=True)
    return opts


def apply_tensor_state(sd: dict, models: dict, optimizers: dict) -> None:
    """Write a loaded DCP state dict back into the live models and optimizers (strict)."""
    for n, m in models.items():
        set_model_state_dict(m, sd[model_key(n)], options=StateDictOptions(strict=True))
    for n, (m, opt) in optimizers.items():
        set_optimizer_state_dict(m, opt, sd[optim_key(n)], options=_optim_options(m, StateDictOptions()))


def write_model_assets(ckpt_dir: Path, name: str, kind: str, model, tokenizer, **meta) -> None:
    """``assets/<name>/``: HF config (+ tokenizer) and ``model.json`` for ``moslim export hf``.

    ``model`` is the HF model itself (causal_lm) or the module whose ``.backbone`` carries the HF
    config (reward, value). ``meta`` must be JSON-serialisable (RM: num_classes, spec, stats).
    """
    assert kind in MODEL_KINDS, kind
    out = Path(ckpt_dir) / "assets" / name
    out.mkdir(parents=True, exist_ok=True)
    hf = model if kind == "causal_lm" else model.backbone
    hf.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "model.json").write_text(json.dumps({"kind": kind, "key": model_key(name), **meta}, indent=1))


def write_reward_assets(ckpt_dir: Path, name: str, model, tokenizer, spec, stats, max_length: int) -> None:
    """Export files of the multi-head RM: backbone config + tokenizer, class counts, preference
    spec, the running mapping statistics at this step (Eq. 11) and the training truncation."""
    write_model_assets(ckpt_dir, name, "reward", model, tokenizer, num_classes=list(model.num_classes),
                       spec=spec.to_dict(), mapping_stats=stats.state_dict(), max_length=max_length)
