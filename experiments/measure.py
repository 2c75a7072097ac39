"""Measuring honestly: interleaved timing, derived rates, memory, numerics and the environment.

The arithmetic here (medians, rates, MFU, speedup, numerics flags) takes plain numbers, so tests
can feed it injected timings; `time_interleaved` takes the clock as an argument for the same
reason.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable, Mapping, Sequence

import jax
import numpy as np


# -- device peaks ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Peak:
    """A device's dense peak in TFLOP/s for one compute dtype, with where it comes from."""

    tflops: float
    description: str


# Dense (no sparsity) peaks from the vendors' data sheets, by a substring of `device_kind`
# (first match wins) and compute dtype. "float32" means the non-tensor-core FP32 rate.
DEVICE_PEAKS: tuple[tuple[str, dict[str, Peak]], ...] = (
    ("H100 PCIe", {"bfloat16": Peak(756.0, "H100 PCIe bf16 dense"),
                   "float32": Peak(51.0, "H100 PCIe fp32 (no tensor cores)")}),
    ("H100", {"bfloat16": Peak(989.0, "H100 SXM bf16 dense"),
              "float32": Peak(67.0, "H100 SXM fp32 (no tensor cores)")}),
    ("H200", {"bfloat16": Peak(989.0, "H200 bf16 dense"),
              "float32": Peak(67.0, "H200 fp32 (no tensor cores)")}),
    ("A100", {"bfloat16": Peak(312.0, "A100 bf16 dense"),
              "float32": Peak(19.5, "A100 fp32 (no tensor cores)")}),
    # Cloud TPU bf16 peaks per chip. JAX reports v5e and v6e as "TPU v5 lite" and
    # "TPU v6 lite", v5p as "TPU v5": the lite names come first.
    ("TPU v5 lite", {"bfloat16": Peak(197.0, "TPU v5e bf16 per chip")}),
    ("TPU v5e", {"bfloat16": Peak(197.0, "TPU v5e bf16 per chip")}),
    ("TPU v6 lite", {"bfloat16": Peak(918.0, "TPU v6e (Trillium) bf16 per chip")}),
    ("TPU v6e", {"bfloat16": Peak(918.0, "TPU v6e (Trillium) bf16 per chip")}),
    ("TPU v5", {"bfloat16": Peak(459.0, "TPU v5p bf16 per chip")}),
    ("TPU v4", {"bfloat16": Peak(275.0, "TPU v4 bf16 per chip")}),
)


def device_peak(device_kind: str, dtype: str) -> Peak | None:
    """The peak MFU is measured against, or None where none is known (CPUs)."""
    for fragment, peaks in DEVICE_PEAKS:
        if fragment.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


# -- timing ----------------------------------------------------------------------------------

def time_interleaved(runners: Mapping[str, Callable[[int], object]], *, steps: int,
                     repeats: int, clock: Callable[[], float] = time.perf_counter,
                     on_repetition: Callable[[int], None] | None = None
                     ) -> dict[str, list[float]]:
    """Seconds per step of each runner, one value per repetition.

    ``runners[name](n)`` runs ``n`` steps and returns only once their results are ready (it
    blocks on them). Repetitions interleave the runners and alternate their order (A B, B A,
    ...), so slow drifts of the machine (clocks, thermals, other processes) hit both alike.
    ``on_repetition(r)`` is called after repetition ``r`` (progress display).
    """
    names = list(runners)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = clock()
            runners[name](steps)
            times[name].append((clock() - start) / steps)
        if on_repetition is not None:
            on_repetition(r)
    return times


def timing_metrics(step_times_s: Sequence[float], *, batch: int, seq: int | None,
                   flops_per_step: float, peak: Peak | None) -> dict:
    """Median, min and max step time and the rates derived from the median.

    ``tokens_per_s`` is None for models without a sequence (vision); ``mfu`` is None without a
    known peak.
    """
    median = statistics.median(step_times_s)
    tflops = flops_per_step / median / 1e12
    return {
        "step_time_s": median,
        "step_time_min_s": min(step_times_s),
        "step_time_max_s": max(step_times_s),
        "step_times_s": list(step_times_s),
        "examples_per_s": batch / median,
        "tokens_per_s": batch * seq / median if seq else None,
        "model_tflops": tflops,
        "mfu": tflops / peak.tflops if peak else None,
    }


def speedup(baseline: Mapping | None, optimized: Mapping | None) -> float | None:
    """Baseline step time over optimized step time (medians); None when either is missing."""
    if not baseline or not optimized:
        return None
    b, o = baseline.get("step_time_s"), optimized.get("step_time_s")
    if b is None or o is None:
        return None
    return b / o


# Speedup intervals: percentile bootstrap of the ratio of medians over the repetitions.
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000


def speedup_interval(baseline_times_s: Sequence[float], optimized_times_s: Sequence[float], *,
                     confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = 0) -> tuple[float, float] | None:
    """A `confidence` interval for baseline median / optimized median, or None from fewer than
    two repetitions (one repetition says nothing about the spread).

    Repetitions are resampled in pairs: repetition r of each variant ran back to back
    (`time_interleaved`), so a slow spell of the machine stays with both of its measurements.
    """
    n = min(len(baseline_times_s), len(optimized_times_s))
    if n < 2:
        return None
    base = np.asarray(baseline_times_s[:n], np.float64)
    opt = np.asarray(optimized_times_s[:n], np.float64)
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    ratios = np.median(base[picks], axis=1) / np.median(opt[picks], axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return float(low), float(high)


def within_noise(interval: Sequence[float] | None) -> bool | None:
    """Whether a speedup interval includes 1.0 (no measured difference); None without one."""
    if interval is None:
        return None
    low, high = interval
    return bool(low <= 1.0 <= high)


# -- memory ----------------------------------------------------------------------------------

def compiled_memory(compiled) -> dict:
    """XLA's memory analysis of a compiled executable.

    ``peak_memory_bytes`` is temporaries plus arguments: what the step needs resident while it
    runs (outputs alias the donated arguments).
    """
    try:
        analysis = compiled.memory_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        analysis = None
    if analysis is None:
        return {"peak_memory_bytes": None, "temp_memory_bytes": None,
                "argument_memory_bytes": None, "output_memory_bytes": None}
    temp, args = int(analysis.temp_size_in_bytes), int(analysis.argument_size_in_bytes)
    return {"peak_memory_bytes": temp + args, "temp_memory_bytes": temp,
            "argument_memory_bytes": args,
            "output_memory_bytes": int(analysis.output_size_in_bytes)}


def interprets_kernels(implementation) -> bool:
    """Whether `implementation` asks for Pallas kernels and this host runs them interpreted."""
    import pallas_kernels

    choice = pallas_kernels.KernelChoice.of(implementation)
    return "pallas" in (choice.names or ()) and choice.interpret


def device_memory() -> dict:
    """The device's allocator statistics where the backend keeps them (GPUs; None on CPU).

    ``device_peak_bytes_in_use`` is the process's high-water mark so far: read after a variant
    has run, it bounds that variant's peak from above (it includes what ran before).
    """
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return {"device_peak_bytes_in_use": None, "device_bytes_in_use": None}
    return {"device_peak_bytes_in_use": stats.get("peak_bytes_in_use"),
            "device_bytes_in_use": stats.get("bytes_in_use")}


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception is the runtime or compiler running out of device memory."""
    if isinstance(error, MemoryError):
        return True
    text = str(error)
    return isinstance(error, jax.errors.JaxRuntimeError) and (
        "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text)


# -- numerics --------------------------------------------------------------------------------

# Loss difference (relative to max(|baseline loss|, 1)) beyond which a run is flagged.
DEFAULT_LOSS_RTOL = {"float32": 1e-3, "bfloat16": 5e-2}
# Largest per-leaf gradient difference (see `max_relative_difference`).
DEFAULT_GRAD_RTOL = {"float32": 1e-3, "bfloat16": 5e-2}


# A leaf's gradient is compared on its own scale, but never on a scale below this fraction of the
# whole gradient's largest magnitude: some leaves are zero up to rounding (an attention key
# bias, to which softmax is invariant) and their rounding noise is not a difference.
GRAD_SCALE_FLOOR = 1e-3


def max_relative_difference(reference, other) -> float:
    """max over leaves of max|other - reference| / scale, scale = max|reference leaf| floored.

    Scaling per leaf keeps a small leaf that is wrong as a whole visible next to large ones; the
    floor (`GRAD_SCALE_FLOOR` times the largest magnitude of all leaves) keeps leaves that are
    zero up to rounding from reporting their noise as 100% differences.
    """
    refs = [np.asarray(x, np.float64) for x in jax.tree.leaves(reference)]
    gots = [np.asarray(x, np.float64) for x in jax.tree.leaves(other)]
    if len(refs) != len(gots):
        raise ValueError(f"the trees have {len(refs)} and {len(gots)} leaves")
    overall = max((float(np.max(np.abs(r))) for r in refs if r.size), default=0.0)
    worst = 0.0
    for ref, got in zip(refs, gots):
        if not ref.size:
            continue
        diff = float(np.max(np.abs(got - ref)))
        if not np.isfinite(diff):
            return float("inf")
        scale = max(float(np.max(np.abs(ref))), GRAD_SCALE_FLOOR * overall)
        if diff:
            worst = max(worst, diff / scale if scale else float("inf"))
    return worst


def numerics(*, loss_initial: tuple[float, float] | None, loss_final: tuple[float, float] | None,
             grad_rel_diff: float | None, dtype: str, loss_rtol: float | None = None) -> dict:
    """Compares baseline and optimized losses (pairs ``(baseline, optimized)``) and gradients.

    ``loss_initial`` is at the shared initial parameters, ``loss_final`` after both variants ran
    the same steps; ``diverged`` is set when either differs beyond the tolerance or the optimized
    loss is not finite where the baseline's is.
    """
    loss_tol = DEFAULT_LOSS_RTOL[dtype] if loss_rtol is None else loss_rtol
    grad_tol = DEFAULT_GRAD_RTOL[dtype]
    flags = []
    result = {"loss_rtol": loss_tol, "grad_rtol": grad_tol}
    for name, pair in (("initial", loss_initial), ("final", loss_final)):
        if pair is None:
            result[f"loss_{name}_diff"] = None
            continue
        base, opt = pair
        diff = abs(opt - base)
        result[f"loss_{name}_baseline"], result[f"loss_{name}_optimized"] = base, opt
        result[f"loss_{name}_diff"] = diff if np.isfinite(diff) else float("inf")
        if np.isfinite(base) and not np.isfinite(opt):
            flags.append(f"optimized {name} loss is {opt} (baseline {base:.6g})")
        elif diff > loss_tol * max(abs(base), 1.0):
            flags.append(f"{name} loss differs by {diff:.3g} (tolerance {loss_tol:g} relative)")
    result["grad_max_rel_diff"] = grad_rel_diff
    gradients_differ = grad_rel_diff is not None and not grad_rel_diff <= grad_tol
    if gradients_differ:
        flags.append(f"gradients differ by {grad_rel_diff:.3g} relative "
                     f"(tolerance {grad_tol:g})")
    result["diverged"] = any("loss" in f for f in flags)
    result["gradients_differ"] = gradients_differ
    result["ok"] = not flags
    result["flags"] = flags
    return result


# -- environment -----------------------------------------------------------------------------

def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except ImportError:
        return None
    return getattr(module, "__version__", None)


def _git(*args: str) -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(argv: Sequence[str] | None = None) -> dict:
    """Versions, device, git commit and the command, for results.json."""
    devices = jax.devices()
    status = _git("status", "--porcelain", "--untracked-files=no")
    command = None
    if argv is not None:
        command = shlex.join([os.path.basename(sys.executable), "-m", "experiments.run",
                              *argv])
    return {
        "jax_version": jax.__version__,
        "jaxlib_version": _version("jaxlib"),
        "flax_version": _version("flax"),
        "optax_version": _version("optax"),
        "python_version": platform.python_version(),
        "platform": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "host": platform.node(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "command": command,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
