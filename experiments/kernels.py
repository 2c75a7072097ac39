"""`python -m experiments.kernels`: every kernel op and implementation, timed in one process.

For each op (attention, layer_norm, rms_norm, dense_act, gated_dense, softmax_cross_entropy,
linear_cross_entropy) at the reference shapes of docs/BENCHMARKS.md on a GPU or a TPU, or at small
shapes on a CPU (where Pallas runs in interpret mode, so its times there say nothing about an
accelerator's speed), and for each registered implementation, on random inputs:

- forward, and forward+backward (the output and the gradients of every float input for a random
  cotangent), each compiled once, warmed up, then the median of several timed trials;
- the rate: TFLOP/s for matmul-bound ops, GB/s for memory-bound ones, and its fraction of the
  device's ceiling measured in the same run (a bf16 matmul; a read+write copy);
- the ratio to XLA's time and, for attention on a GPU, to cuDNN's (above 1 means faster);
- the temporary memory XLA reserves for the forward+backward program;
- which implementation `implementation=None` picks for that call.

Work counted: attention causal 4*B*H*T*T*D/2 FLOPs forward, 3.5x that forward+backward;
matmuls 2*M*K*N per product forward, 3x forward+backward (linear_cross_entropy's backward also
recomputes the logits, which the count leaves out); norms read x and write y forward, and also
read x and dy and write dx backward; softmax_cross_entropy reads the logits forward, reads them
again and writes dlogits backward.

`--platform` (gpu, tpu or cpu; default: PALLAS_KERNELS_PLATFORM, else the default backend) picks
the kernels' target, as `platform=` of the ops: "tpu" runs the Mosaic kernels (on a CPU, in the
TPU interpreter). GPU-only implementations (cuDNN) are left out for other platforms.

Usage: python -m experiments.kernels [--ops layer_norm,attention] [--small] [--trials 5]
                                     [--platform tpu] [--out results.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _dispatch
from pallas_kernels._target import KernelChoice
from pallas_kernels.linear_cross_entropy import linear_cross_entropy_op
from pallas_kernels.dense_act import dense_act_op, gated_dense_op
from pallas_kernels.layer_norm import layer_norm_op
from pallas_kernels.rms_norm import rms_norm_op
from pallas_kernels.softmax_cross_entropy import softmax_cross_entropy_op

try:
    from pallas_kernels.attention import attention_op
except ImportError:  # the attention kernels are optional for this benchmark
    attention_op = None


@dataclasses.dataclass(frozen=True)
class Input:
    shape: tuple[int, ...]
    dtype: str
    high: int = 0  # integer inputs (labels) are drawn from [0, high)


@dataclasses.dataclass(frozen=True)
class Case:
    op: Any  # a pallas_kernels._dispatch.Op
    shape: str  # what the table shows
    inputs: tuple[Input, ...]
    kwargs: dict
    unit: str  # "flops" or "bytes"
    forward_work: float
    forward_backward_work: float


def attention_cases(small: bool, dtype: str) -> list[Case]:
    if attention_op is None:
        return []
    shapes = [(1, 256, 2, 32)] if small else [(8, 2048, 16, 64), (4, 4096, 16, 128)]
    cases = []
    for b, t, h, d in shapes:
        flops = 4 * b * h * t * t * d / 2
        qkv = Input((b, t, h, d), dtype)
        cases.append(Case(attention_op, f"causal ({b},{t},{h},{d})", (qkv, qkv, qkv),
                          {"causal": True, "mask": None, "bias": None, "scale": None},
                          "flops", flops, 3.5 * flops))
    return cases


def norm_cases(small: bool, dtype: str) -> list[Case]:
    shape = (4, 128, 256) if small else (8, 2048, 4096)
    d = shape[-1]
    nbytes = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
    x, p = Input(shape, dtype), Input((d,), dtype)
    label = f"{shape} scale+bias"
    return [Case(layer_norm_op, label, (x, p, p), {"eps": 1e-5}, "bytes", 2 * nbytes, 5 * nbytes),
            Case(rms_norm_op, f"{shape} scale", (x, p), {"eps": 1e-6}, "bytes", 2 * nbytes,
                 5 * nbytes)]


def dense_cases(small: bool, dtype: str) -> list[Case]:
    m, k, n = (512, 128, 256) if small else (8192, 768, 3072)  # GPT-2 small's MLP up-projection
    gm, gk, gn = (512, 128, 256) if small else (8192, 2048, 5632)  # a Llama-style SwiGLU
    dense = 2 * m * k * n
    gated = 4 * gm * gk * gn
    return [
        Case(dense_act_op, f"x({m},{k}) w({k},{n}) +b gelu_tanh",
             (Input((m, k), dtype), Input((k, n), dtype), Input((n,), dtype)),
             {"activation": "gelu_tanh"}, "flops", dense, 3 * dense),
        Case(gated_dense_op, f"x({gm},{gk}) w 2x({gk},{gn}) silu",
             (Input((gm, gk), dtype), Input((gk, gn), dtype), Input((gk, gn), dtype)),
             {"activation": "silu"}, "flops", gated, 3 * gated),
    ]


def cross_entropy_cases(small: bool, dtype: str) -> list[Case]:
    n, d, v = (512, 64, 1000) if small else (8192, 768, 50304)  # GPT-2 small's head
    logits_bytes = n * v * jnp.dtype(dtype).itemsize
    labels = Input((n,), "int32", high=v)
    flops = 2 * n * d * v
    return [
        Case(softmax_cross_entropy_op, f"logits({n},{v})", (Input((n, v), dtype), labels), {},
             "bytes", logits_bytes, 3 * logits_bytes),
        Case(linear_cross_entropy_op, f"x({n},{d}) w({d},{v})",
             (Input((n, d), dtype), Input((d, v), dtype), labels), {"w_layout": "dv"}, "flops",
             flops, 3 * flops),
        Case(linear_cross_entropy_op, f"x({n},{d}) w({v},{d}) tied",
             (Input((n, d), dtype), Input((v, d), dtype), labels), {"w_layout": "vd"}, "flops",
             flops, 3 * flops),
    ]


CASE_GROUPS = {"attention": attention_cases, "norms": norm_cases, "dense": dense_cases,
               "cross_entropy": cross_entropy_cases}


def random_inputs(inputs, rng: np.random.Generator) -> list[jax.Array]:
    arrays = []
    for spec in inputs:
        if jnp.issubdtype(spec.dtype, jnp.integer):
            value = rng.integers(0, spec.high, spec.shape).astype(spec.dtype)
        else:
            value = rng.standard_normal(spec.shape, dtype=np.float32).astype(spec.dtype)
        arrays.append(jax.device_put(value))
    return arrays


def measure_ceilings(small: bool, trials: int) -> dict:
    """The device's matmul rate (bf16 on a GPU or TPU, f32 for small shapes) and copy
    bandwidth, measured now."""
    n, dtype = (1024, jnp.float32) if small else (8192, jnp.bfloat16)
    rng = np.random.default_rng(0)
    a, b = random_inputs([Input((n, n), jnp.dtype(dtype).name)] * 2, rng)
    seconds = _dispatch.time_call(lambda a, b: a @ b, [a, b], trials=trials)
    elements = 2**24 if small else 2**28
    (x,) = random_inputs([Input((elements,), "float32" if small else "bfloat16")], rng)
    copy_seconds = _dispatch.time_call(lambda x: x * 2, [x], trials=trials)
    return {"matmul_tflops": 2 * n**3 / seconds / 1e12,
            "matmul": f"{jnp.dtype(dtype).name} {n}^3",
            "copy_gbps": 2 * x.nbytes / copy_seconds / 1e9}


def _forward_backward(fn: Callable, arrays, cotangent):
    floats = [i for i, a in enumerate(arrays) if jnp.issubdtype(a.dtype, jnp.floating)]

    def run(*arrays):
        def of_floats(*float_arrays):
            full = list(arrays)
            for i, a in zip(floats, float_arrays):
                full[i] = a
            return fn(*full)
        out, vjp = jax.vjp(of_floats, *[arrays[i] for i in floats])
        return out, vjp(cotangent)

    return run


GPU_ONLY = {"cudnn"}  # implementations that exist only on an NVIDIA GPU


def measure_implementation(case: Case, impl: str, arrays, cotangent, trials: int,
                           platform: str | None = None) -> dict:
    fn = lambda *a: case.op(*a, implementation=impl, platform=platform, **case.kwargs)
    try:
        forward = jax.jit(fn).lower(*arrays).compile()
        both = jax.jit(_forward_backward(fn, arrays, cotangent)).lower(*arrays).compile()
    except NotImplementedError as e:
        return {"declined": str(e).splitlines()[-1].strip()}
    memory = both.memory_analysis()
    return {"forward_s": _dispatch.time_compiled(forward, arrays, trials=trials),
            "forward_backward_s": _dispatch.time_compiled(both, arrays, trials=trials),
            "temp_bytes": None if memory is None else memory.temp_size_in_bytes}


def measure_case(case: Case, ceilings: dict, trials: int, rng, platform: str | None = None) -> dict:
    arrays = random_inputs(case.inputs, rng)
    out = jax.eval_shape(lambda *a: case.op(*a, implementation="xla", **case.kwargs), *arrays)
    (cotangent,) = random_inputs([Input(out.shape, out.dtype.name)], rng)
    scale = 1e12 if case.unit == "flops" else 1e9
    ceiling = ceilings["matmul_tflops" if case.unit == "flops" else "copy_gbps"]
    impls = {}
    target = KernelChoice.of(None, platform).platform
    for impl in case.op.impls:
        if impl in GPU_ONLY and target != "gpu":
            continue
        try:
            result = measure_implementation(case, impl, arrays, cotangent, trials, platform)
        except Exception as e:  # one broken implementation must not stop the benchmark
            result = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        if "forward_s" in result:
            for phase, work in (("forward", case.forward_work),
                                ("forward_backward", case.forward_backward_work)):
                rate = work / result[f"{phase}_s"] / scale
                result[f"{phase}_rate"] = rate
                result[f"{phase}_of_ceiling"] = rate / ceiling
        impls[impl] = result
    for baseline in ("xla", "cudnn"):
        base = impls.get(baseline, {})
        if "forward_s" not in base:
            continue
        for result in impls.values():
            if "forward_s" in result:
                result[f"vs_{baseline}"] = {
                    phase: base[f"{phase}_s"] / result[f"{phase}_s"]
                    for phase in ("forward", "forward_backward")}
    try:
        picked = case.op.candidates(KernelChoice.of(None, platform), tuple(arrays),
                                    case.kwargs)[0]
    except Exception as e:  # report, do not stop
        picked = f"({type(e).__name__})"
    return {"op": case.op.name, "shape": case.shape, "unit": case.unit,
            "rate_unit": "TFLOP/s" if case.unit == "flops" else "GB/s",
            "implementations": impls, "none_picks": picked}


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(results: list[dict]) -> str:
    """A markdown table; the cuDNN column only where cuDNN was measured (a GPU)."""
    bases = ["xla"] + ["cudnn"] * any("cudnn" in r["implementations"] for r in results)
    titles = {"xla": "vs XLA", "cudnn": "vs cuDNN"}
    lines = ["| op | shape | impl | fwd ms | fwd rate | fwd % ceil | fwd+bwd ms | fwd+bwd rate "
             "| fwd+bwd % ceil | " + "".join(f"{titles[b]} fwd / fwd+bwd | " for b in bases)
             + "temp MB |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(bases) + "---|"]
    for r in results:
        for impl, m in r["implementations"].items():
            name = impl + (" (None picks)" if impl == r["none_picks"] else "")
            if "forward_s" not in m:
                reason = m.get("declined") or m.get("failed")
                lines.append(f"| {r['op']} | {r['shape']} | {name} | {reason} |"
                             + "|" * (7 + len(bases)) + " ")
                continue
            ratios = ""
            for base in bases:
                v = m.get(f"vs_{base}")
                ratios += ("-" if v is None else
                           f"{v['forward']:.2f} / {v['forward_backward']:.2f}") + " | "
            temp = None if m["temp_bytes"] is None else m["temp_bytes"] / 2**20
            lines.append(
                f"| {r['op']} | {r['shape']} | {name} | {m['forward_s'] * 1e3:.3f} | "
                f"{m['forward_rate']:.3g} {r['rate_unit']} | {m['forward_of_ceiling']:.0%} | "
                f"{m['forward_backward_s'] * 1e3:.3f} | {m['forward_backward_rate']:.3g} "
                f"{r['rate_unit']} | {m['forward_backward_of_ceiling']:.0%} | {ratios}"
                f"{_fmt(temp, '.0f')} |")
    return "\n".join(lines)


def run(groups=tuple(CASE_GROUPS), small: bool | None = None, trials: int = 5,
        platform: str | None = None) -> dict:
    device = jax.devices()[0]
    choice = KernelChoice.of(None, platform)
    if small is None:
        small = device.platform == "cpu"
    dtype = "float32" if small else "bfloat16"
    started = time.time()
    ceilings = measure_ceilings(small, trials)
    rng = np.random.default_rng(0)
    results = []
    for group in groups:
        for case in CASE_GROUPS[group](small, dtype):
            print(f"  {case.op.name} {case.shape} ...", file=sys.stderr, flush=True)
            results.append(measure_case(case, ceilings, trials, rng, platform))
    return {"device": device.device_kind, "platform": device.platform,
            "kernel_platform": choice.platform,
            "jax": jax.__version__, "small_shapes": small, "dtype": dtype,
            "interpret_mode_pallas": choice.interpret, "trials": trials,
            "ceilings": ceilings, "results": results, "seconds": time.time() - started}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(CASE_GROUPS),
                        help=f"comma-separated groups from {list(CASE_GROUPS)}")
    parser.add_argument("--small", action="store_true",
                        help="small shapes (the default on CPU)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--platform", choices=("gpu", "tpu", "cpu"),
                        help="the kernels' target (default: PALLAS_KERNELS_PLATFORM, else the "
                             "default backend)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.ops.split(",") if g.strip()]
    unknown = [g for g in groups if g not in CASE_GROUPS]
    if unknown:
        parser.error(f"unknown --ops {unknown}; choose from {list(CASE_GROUPS)}")
    payload = run(groups, small=True if args.small else None, trials=args.trials,
                  platform=args.platform)
    c = payload["ceilings"]
    print(f"{payload['device']} ({payload['platform']}), kernels for "
          f"{payload['kernel_platform']}, jax {payload['jax']}, "
          f"{payload['dtype']}; ceilings: {c['matmul']} matmul {c['matmul_tflops']:.3g} TFLOP/s, "
          f"copy {c['copy_gbps']:.3g} GB/s")
    if payload["interpret_mode_pallas"]:
        print("Pallas kernels run in interpret mode here: their times are not accelerator "
              "speeds.")
    print(table(payload["results"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
    return payload


if __name__ == "__main__":
    main()
