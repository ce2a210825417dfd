"""Shared helpers of the kernel benchmarks: device check, timing, peak memory, JSON output."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch


def parse_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--small", action="store_true", help="tiny shapes; runs on CPU (a smoke test, not a benchmark)")
    ap.add_argument("--iters", type=int, default=10, help="timed iterations per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations per variant (compile, autotune)")
    args = ap.parse_args()
    if not args.small and not torch.cuda.is_available():
        sys.exit("refusing to benchmark: no CUDA device (the issue's shapes need an H100/H200); "
                 "use --small for a CPU smoke test")
    return args


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def measure(fn, warmup: int, iters: int) -> dict:
    """Median wall time (ms) of ``fn()`` and its peak extra device memory (bytes, CUDA only)."""
    dev = device()
    for _ in range(warmup):
        fn()
    times = []
    peak = None
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated() - base
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"ms": times[len(times) // 2], "ms_min": times[0], "peak_extra_bytes": peak}


def run_variant(name: str, fn, args, results: dict, flops: float | None = None) -> None:
    """Time one variant into ``results[name]``; a failure is recorded, not raised."""
    try:
        r = measure(fn, args.warmup, args.iters)
        if flops:
            r["eff_tflops"] = flops / (r["ms"] * 1e-3) / 1e12
        results[name] = r
    except Exception as exc:  # e.g. OOM of the eager baseline: the JSON says so
        results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def write(path: str, payload: dict) -> None:
    dev = device()
    payload = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({platform.processor() or 'unknown'})",
        "torch": torch.__version__,
        "triton": _triton_version(),
        **payload,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1))
    print(json.dumps(payload, indent=1))


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def triton_runnable() -> str | None:
    """None if the Triton variant can run here, else why not."""
    import os

    if _triton_version() is None:
        return "triton not installed"
    if device().type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA and TRITON_INTERPRET is not 1"
    return None


def liger():
    """Liger-Kernel's fused linear cross-entropy function, or None when not importable."""
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        return LigerFusedLinearCrossEntropyFunction
    except Exception:
        return None
