"""Per-stage profiling: ``profile.json`` beside ``metrics.jsonl`` (issue 15, item 4).

A :class:`Profiler` is created by each trainer (SFT, RM, policy) right after its ``Stage`` and
written at the stage's end. It records:

* wall time (max over ranks) and time per phase. Phase boundaries are ``mark(name)`` (the time
  since the previous boundary was spent in ``name``) or ``with phase(name):``. When the stage runs
  on CUDA every boundary calls ``torch.cuda.synchronize`` first, so a phase is charged for the
  kernels it launched rather than the next phase (on CPU nothing is synchronised: ops are eager).
  Under torchrun a phase's time is the MEAN over ranks, so the phases always sum to at most the
  wall time; ``other`` is the rest (start-up gaps, bookkeeping between phases).
* tokens: counters summed over data-parallel replicas (tensor-parallel ranks share one shard and
  are counted once); tokens/s = tokens / wall, per device = that / world size.
* model FLOPs and MFU. For a dense decoder (Llama / Qwen2; Qwen2-MoE with its active experts) with
  N = parameters of the matmuls one token passes through (attention q/k/v/o, MLP, and the output
  head: LM head, RM heads or value head; the embedding lookup is not a matmul), L layers, attention
  width d_attn = heads × head_dim and context T (the batch's mean attended length):
      forward  FLOPs/token = 2·N + 4·L·d_attn·T      (QKᵀ and A·V, 2·T·d_attn each per layer)
      training FLOPs/token = 3 × forward = 6·N + 12·L·d_attn·T     (PaLM, Chowdhery et al. App. B)
  Causal masking is not halved (as in PaLM); norms, softmax and biases are not counted.
  MFU = model FLOPs / (wall × devices × peak), over the stage's whole wall time (set-up, eval and
  checkpoints included, so it is the end-to-end figure). Peak: ``profile.peak_tflops`` if set,
  else :data:`PEAK_TFLOPS` by GPU name at the dense bf16 rate; on CPU, MFU is null with the reason.
* device-hours: GPU-hours on CUDA (wall × GPUs); on CPU core-hours = wall × torch intra-op threads
  × ranks (the cores the run asked for, not measured occupancy; ``cpu_seconds`` is the measured
  user+system CPU time, summed over ranks).
* peak memory, max over ranks: CUDA ``max_memory_allocated`` since the profiler started; on CPU
  the process's peak RSS (``resource.getrusage``; since process start, so a stage that runs after
  another in the same process, as in ``moslim demo``, reports at least the earlier stages' peak).
* optionally a ``torch.profiler`` trace of steps [A, B) (``profile.torch_trace_steps="A:B"``) in
  ``<run dir>/torch_trace/rank<r>.json`` (Chrome trace format; open in Perfetto / chrome://tracing).
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, ProfileConfig

SCHEMA = 1

# Dense (no sparsity) peak TFLOP/s per device from NVIDIA's datasheets (SXM unless named). MFU is
# taken against the bf16 rate, the usual convention; fp8 is listed for reference. First match of a
# key in the upper-cased device name wins, so "H100 PCIE" precedes "H100".
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp8": 1979.0},
    "H100 PCIE": {"bf16": 756.0, "fp8": 1513.0},
    "H100": {"bf16": 989.0, "fp8": 1979.0},
    "A100": {"bf16": 312.0},
}


@dataclass(frozen=True)
class ModelFlops:
    """What the FLOPs-per-token formula needs from a model config (see the module docstring)."""

    params: int
    """N: weights of the matmuls one token passes through (embedding lookup excluded)."""
    layers: int
    attn_width: int

    def per_token(self, context: float, train: bool) -> float:
        forward = 2 * self.params + 4 * self.layers * self.attn_width * context
        return 3 * forward if train else forward


def flops_from_config(config, outputs: int) -> ModelFlops:
    """ModelFlops of a HF decoder config whose final linear has ``outputs`` columns (vocabulary
    for a causal LM, Σ classes for the multi-head RM, 1 for a value model)."""
    d, L, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    attn = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2  # q and o; k and v
    if getattr(config, "num_experts", None):  # Qwen2-MoE: the experts a token is routed to
        mlp = (config.num_experts_per_tok * 3 * d * config.moe_intermediate_size
               + 3 * d * getattr(config, "shared_expert_intermediate_size", 0) + d * config.num_experts)
    else:
        mlp = 3 * d * config.intermediate_size  # gated (SwiGLU) MLP: gate, up, down
    return ModelFlops(params=L * (attn + mlp) + d * outputs, layers=L, attn_width=heads * head_dim)


def model_flops(module) -> ModelFlops | None:
    """ModelFlops of a causal LM, a MultiHeadRewardModel or a ValueModel (None if unknown)."""
    try:
        if hasattr(module, "backbone"):
            outputs = sum(module.num_classes) if hasattr(module, "num_classes") else 1
            return flops_from_config(module.backbone.config, outputs)
        return flops_from_config(module.config, module.config.vocab_size)
    except AttributeError:  # a config without the decoder fields above: no FLOPs, MFU null
        return None


def parse_trace_steps(text: str) -> tuple[int, int] | None:
    """``"A:B"`` → (A, B) with 0 ≤ A < B; ``""`` → None. ConfigError names the field."""
    if not text:
        return None
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        a = b = -1
    if not 0 <= a < b:
        raise ConfigError(f"profile.torch_trace_steps: expected 'A:B' with 0 <= A < B, got {text!r}")
    return a, b


def peak_tflops(pc: ProfileConfig, kind: str, name: str) -> tuple[float | None, str]:
    """(peak TFLOP/s per device or None, where it came from or why there is none)."""
    if pc.peak_tflops > 0:
        return pc.peak_tflops, "config profile.peak_tflops"
    if kind != "cuda":
        return None, "CPU: no peak in the table; set profile.peak_tflops to get an MFU"
    for key, rates in PEAK_TFLOPS.items():
        if key in name.upper():
            return rates["bf16"], f"table: {key} bf16 dense"
    return None, f"GPU {name!r} is not in the peak table; set profile.peak_tflops"


class Profiler:
    """Phase times, token and FLOP counters of one stage on this rank; ``write`` aggregates."""

    def __init__(self, pc: ProfileConfig, stage_name: str, stage=None, out_dir=None):
        self.pc, self.name, self.stage = pc, stage_name, stage
        self.enabled = pc.enabled
        self.device = stage.device if stage is not None else torch.device("cpu")
        self._cuda = self.device.type == "cuda"
        self.trace_window = parse_trace_steps(pc.torch_trace_steps)
        self.trace_dir = Path(out_dir) / "torch_trace" if out_dir is not None else None
        self._trace = None
        self.trace_file: str | None = None
        self.phases: dict[str, float] = {}
        self.counters: dict[str, float] = {}
        self.flops = 0.0
        self.flops_known = True
        self.per_token: dict[str, float] = {}
        self.notes: list[str] = []
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._cpu0 = _cpu_seconds()
        self.start = self._last = self._now()

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize(self.device)  # phase boundaries only: charge each phase its kernels
        return time.perf_counter()

    # ---- phases --------------------------------------------------------------------------
    def mark(self, name: str) -> None:
        """The time since the previous boundary (or the start) was spent in phase ``name``."""
        if not self.enabled:
            return
        now = self._now()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now

    @contextmanager
    def phase(self, name: str):
        """The block's time goes to ``name`` (the gap before it stays unattributed: ``other``)."""
        if self.enabled:
            self._last = self._now()
        try:
            yield
        finally:
            self.mark(name)

    # ---- counters ------------------------------------------------------------------------
    def add_tokens(self, n, kind: str = "tokens") -> None:
        """Count ``n`` tokens of ``kind`` (``tokens`` is the headline count of the stage)."""
        if self.enabled:
            self.counters[kind] = self.counters.get(kind, 0) + int(n)

    def add_flops(self, mask_BT: torch.Tensor, flops: ModelFlops | None, train: bool, label: str,
                  repeat: int = 1) -> None:
        """Model FLOPs of one pass (``repeat`` passes) of a model over the attended tokens of
        ``mask_BT``; the context T is the batch's mean attended length. ``label`` names the work
        in ``flops_per_token`` (the last batch's value is kept as the example)."""
        if not self.enabled:
            return
        if flops is None:
            self.flops_known = False
            return
        tokens = float(mask_BT.sum())
        if tokens == 0:
            return
        fpt = flops.per_token(tokens / mask_BT.shape[0], train)
        self.flops += repeat * tokens * fpt
        self.per_token[label] = fpt

    def note(self, text: str) -> None:
        """A caveat about the FLOP count, written into profile.json's ``flops.notes``."""
        if text not in self.notes:
            self.notes.append(text)

    # ---- torch.profiler window -----------------------------------------------------------
    def step(self, i: int) -> None:
        """Called at the top of step ``i``: starts / stops the torch.profiler trace window."""
        if not self.enabled or self.trace_window is None or self.trace_dir is None:
            return
        a, b = self.trace_window
        if self._trace is None and self.trace_file is None and a <= i < b:
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if self._cuda else [])
            self._trace = torch.profiler.profile(activities=acts)
            self._trace.start()
        elif self._trace is not None and i >= b:
            self._stop_trace()

    def _stop_trace(self) -> None:
        with self.phase("torch_trace"):  # exporting the trace is the profiler's own cost
            self._trace.stop()
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            path = self.trace_dir / f"rank{_rank()}.json"
            self._trace.export_chrome_trace(str(path))
            self._trace, self.trace_file = None, str(path)

    # ---- output --------------------------------------------------------------------------
    def _local(self) -> dict:
        now = self._now()
        if self._cuda:
            mem = torch.cuda.max_memory_allocated(self.device)
        else:  # ru_maxrss: kilobytes on Linux, bytes on macOS
            mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        mesh = self.stage.mesh if self.stage is not None and self.stage.distributed else None
        tp_rank = mesh["tp"].get_local_rank() if mesh is not None else 0
        pp_rank = mesh["pp"].get_local_rank() if mesh is not None else 0
        return {"wall": now - self.start, "phases": dict(self.phases), "counters": dict(self.counters),
                "flops": self.flops, "flops_known": self.flops_known, "peak_memory": int(mem),
                "cpu_seconds": _cpu_seconds() - self._cpu0, "threads": torch.get_num_threads(), "tp_rank": tp_rank,
                "pp_rank": pp_rank}

    def write(self, path) -> dict | None:
        """Every rank calls this (a collective under torchrun); rank 0 writes ``path`` and returns
        the record. Disabled: nothing is written, None."""
        if not self.enabled:
            return None
        if self._trace is not None:
            self._stop_trace()
        ranks = _gather(self._local())
        if _rank() != 0:
            return None
        record = aggregate(ranks, self.name, self.pc, self.device, self.per_token,
                           self.trace_file and str(Path(self.trace_file).parent))
        record["flops"]["notes"] = self.notes
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=2) + "\n")
        return record


def aggregate(ranks: list[dict], stage_name: str, pc: ProfileConfig, device: torch.device,
              per_token: dict[str, float], trace_dir: str | None) -> dict:
    """The profile.json record from every rank's local record (list in rank order)."""
    n = len(ranks)
    wall = max(r["wall"] for r in ranks)
    names = sorted({k for r in ranks for k in r["phases"]})
    phases = {k: sum(r["phases"].get(k, 0.0) for r in ranks) / n for k in names}
    # The tp and pp ranks of one dp index share one data shard (each pp rank counts the model's
    # FLOPs as a whole): count it once.
    replicas = [r for r in ranks if r["tp_rank"] == 0 and r.get("pp_rank", 0) == 0]
    counters = {k: sum(r["counters"].get(k, 0) for r in replicas) for k in sorted({k for r in ranks for k in r["counters"]})}
    tokens = counters.get("tokens", 0)
    flops = sum(r["flops"] for r in replicas) if all(r["flops_known"] for r in ranks) else None
    kind = device.type
    name = torch.cuda.get_device_name(device) if kind == "cuda" else cpu_name()
    threads = ranks[0]["threads"]
    if kind == "cuda":
        hours = {"value": wall * n / 3600, "unit": "GPU-hours", "counted_as": f"wall × {n} GPU(s)"}
    else:
        hours = {"value": wall * threads * n / 3600, "unit": "core-hours",
                 "counted_as": f"wall × {threads} torch intra-op thread(s) × {n} rank(s)"}
    peak, source = peak_tflops(pc, kind, name)
    if flops is None:
        mfu, reason = None, "model FLOPs unknown (a model config without decoder sizes)"
    elif peak is None:
        mfu, reason = None, source
    else:
        mfu, reason = flops / (wall * n * peak * 1e12), None
    return {
        "schema": SCHEMA, "stage": stage_name,
        "wall_seconds": wall,
        "devices": {"kind": kind, "name": name, "count": n},
        "device_hours": hours,
        "cpu_seconds": sum(r["cpu_seconds"] for r in ranks),
        "tokens": {"total": tokens, "per_second": tokens / wall, "per_second_per_device": tokens / wall / n,
                   "counters": counters, "aggregate": "summed over data-parallel replicas"},
        "phases": {"seconds": phases, "other_seconds": max(0.0, wall - sum(phases.values())),
                   "aggregate": "mean over ranks (wall time: max over ranks)",
                   "cuda_synchronized": kind == "cuda"},
        "flops": {"total": flops, "per_token": per_token,
                  "achieved_tflops_per_device": None if flops is None else flops / wall / n / 1e12,
                  "formula": "forward 2·N + 4·L·d_attn·T, training 6·N + 12·L·d_attn·T (T: mean attended length)"},
        "mfu": {"value": mfu, "peak_tflops": peak, "peak_source": source if peak is not None else None,
                "reason": reason, "over": "whole stage wall time"},
        "peak_memory": {"bytes": max(r["peak_memory"] for r in ranks),
                        "kind": "cuda max_memory_allocated" if kind == "cuda" else "cpu peak RSS (getrusage)",
                        "aggregate": "max over ranks"},
        "torch_trace": trace_dir,
    }


def find_profiles(run_dirs) -> list[tuple[str, Path]]:
    """(label, path) of every profile.json under each run dir (a demo dir holds one per stage)."""
    found = []
    for d in run_dirs:
        d = Path(d)
        if not d.is_dir():
            raise FileNotFoundError(f"run directory {d} does not exist")
        paths = sorted(d.rglob("profile.json"))
        if not paths:
            raise FileNotFoundError(f"{d}: no profile.json found (was it written with profile.enabled=false?)")
        for p in paths:
            rel = p.parent.relative_to(d)
            found.append((d.name if str(rel) == "." else f"{d.name}/{rel}", p))
    return found


def _gather(local: dict) -> list[dict]:
    import torch.distributed as dist

    from .parallel import dist as pdist

    if not pdist.is_distributed():
        return [local]
    out = [None] * pdist.world_size()
    dist.all_gather_object(out, local)
    return out


def _rank() -> int:
    from .parallel import dist as pdist

    return pdist.rank()


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
