"""`python -m experiments.engine_cost`: what the passes cost next to JAX's tracing and XLA's compile.

For GPT-2 small's loss at several depths (default 12 and 48 layers, the gpt2-small config with
``num_layers`` overridden), measures `passes.explain` with the default pipeline (tracing the loss
to a jaxpr included), JAX's own `make_jaxpr` of the same loss (a fresh callable each time, so
JAX's trace cache does not answer, as for explain's own trace), and XLA compiling
`jax.jit(jax.grad(loss))` for the same shapes. The engine's own time is explain minus the
tracing it did, per call; every time reported is the minimum of the repeats. Prints milliseconds, the ratio to XLA's compile, the
equation count and how each grows with depth. Targets: explain at most 10% of XLA's compile, and
the engine's own time growing at most 4.5x from 12 to 48 layers (4x the layers). Nothing is
allocated: everything runs on `jax.ShapeDtypeStruct`s. `--check` measures the debug aids
(check_jaxpr after every pass, translation validation of every rewrite) as well.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Sequence

import jax
from jax.extend import core as jex_core

import models
import passes

RATIO_TARGET = 0.10
GROWTH_TARGET = 4.5


def count_equations(jaxpr) -> tuple[int, int]:
    """(top-level equations, equations including those of nested jaxprs)."""
    top = len(jaxpr.eqns)
    total, stack = 0, [jaxpr]
    while stack:
        j = stack.pop()
        total += len(j.eqns)
        for eqn in j.eqns:
            for value in eqn.params.values():
                values = value if isinstance(value, (tuple, list)) else (value,)
                stack.extend(v for v in values
                             if isinstance(v, (jex_core.Jaxpr, jex_core.ClosedJaxpr)))
    return top, total


def _fresh_trace(fn, *args):
    """JAX's tracing of `fn` alone: a new callable each time, so no trace cache answers."""
    return jax.make_jaxpr(lambda *a: fn(*a))(*args)


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure_depth(num_layers: int, *, batch: int, seq: int, vocab: int | None, dtype: str,
                  repeats: int, check: bool = False) -> dict:
    overrides = {"num_layers": num_layers, "seq_len": seq, "dtype": dtype}
    if vocab is not None:
        overrides["vocab_size"] = vocab
    spec = models.get("gpt2-small", **overrides)
    params = jax.eval_shape(spec.init, jax.random.key(0))
    data = jax.eval_shape(lambda k: spec.batch(k, batch), jax.random.key(1))
    top, total = count_equations(jax.make_jaxpr(spec.loss)(params, data))

    explain_s, engine_s, jax_trace_s, trace_s, pass_s, per_pass = [], [], [], [], [], {}
    for _ in range(repeats):  # interleaved, so that drifting load hits both alike
        pipeline = passes.default_pipeline(check=True if check else None)  # None: the env decides
        seconds, report = _timed(lambda: passes.explain(spec.loss, params, data,
                                                        pipeline=pipeline))
        explain_s.append(seconds)
        engine_s.append(seconds - report.trace_time)
        jax_trace_s.append(_timed(lambda: _fresh_trace(spec.loss, params, data))[0])
        trace_s.append(report.trace_time)
        pass_s.append(report.total_pass_time)
        for name, seconds in report.pass_times.items():
            per_pass.setdefault(name, []).append(seconds)

    start = time.perf_counter()
    lowered = jax.jit(jax.grad(spec.loss)).lower(params, data)
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    # Minimums: the least-disturbed run of each, on a machine other work shares.
    explain = min(explain_s)
    return {
        "num_layers": num_layers, "equations": top, "equations_nested": total,
        "explain_first_s": explain_s[0], "explain_s": explain,
        "explain_median_s": statistics.median(explain_s), "jax_trace_s": min(jax_trace_s),
        "engine_s": min(engine_s), "trace_s": min(trace_s), "pass_s": min(pass_s),
        "pass_times_s": {k: min(v) for k, v in per_pass.items()},
        "rewrites": dict(report.counts),
        "xla_lower_s": lowered_at - start, "xla_compile_s": done - lowered_at,
        "ratio": explain / (done - lowered_at),
    }


def summary(rows: list[dict]) -> dict:
    """Growth factors from the shallowest to the deepest model, and the targets' verdicts."""
    first, last = rows[0], rows[-1]
    growth = last["engine_s"] / first["engine_s"]
    return {
        "depths": f"{last['num_layers']}/{first['num_layers']}",
        "engine_growth": growth,
        "explain_growth": last["explain_s"] / first["explain_s"],
        "jax_trace_growth": last["jax_trace_s"] / first["jax_trace_s"],
        "xla_compile_growth": last["xla_compile_s"] / first["xla_compile_s"],
        "equations_growth": last["equations"] / first["equations"],
        "max_ratio": max(r["ratio"] for r in rows),
        "ratio_ok": all(r["ratio"] <= RATIO_TARGET for r in rows),
        "growth_ok": growth <= GROWTH_TARGET,
    }


def report_text(rows: list[dict], summ: dict, settings: dict) -> str:
    lines = [f"passes.explain (trace + default pipeline) vs JAX's tracing and XLA's compile of "
             f"jit(grad(loss)); gpt2-small, {settings}, jax {jax.__version__} on "
             f"{jax.devices()[0].device_kind}",
             f"{'layers':>6} {'eqns':>6} {'nested':>7} {'explain ms':>11} {'JAX trace ms':>13} "
             f"{'engine ms':>10} {'passes ms':>10} {'XLA compile ms':>15} {'ratio':>7}"]
    for r in rows:
        lines.append(f"{r['num_layers']:>6} {r['equations']:>6} {r['equations_nested']:>7} "
                     f"{r['explain_s'] * 1e3:>11.1f} {r['jax_trace_s'] * 1e3:>13.1f} "
                     f"{r['engine_s'] * 1e3:>10.1f} {r['pass_s'] * 1e3:>10.1f} "
                     f"{r['xla_compile_s'] * 1e3:>15.1f} {r['ratio']:>7.1%}")
    for r in rows:
        slowest = sorted(r["pass_times_s"].items(), key=lambda kv: -kv[1])[:4]
        lines.append(f"{r['num_layers']:>6} layers, slowest passes: " + ", ".join(
            f"{name} {seconds * 1e3:.1f} ms" for name, seconds in slowest))
    mark = {True: "ok", False: "MISSED"}
    lines.append(f"growth {summ['depths']} layers: engine {summ['engine_growth']:.2f}x "
                 f"(target <= {GROWTH_TARGET}x: {mark[summ['growth_ok']]}), explain "
                 f"{summ['explain_growth']:.2f}x, JAX trace {summ['jax_trace_growth']:.2f}x, "
                 f"equations {summ['equations_growth']:.2f}x, XLA compile "
                 f"{summ['xla_compile_growth']:.2f}x")
    lines.append(f"explain / XLA compile at most {summ['max_ratio']:.1%} "
                 f"(target <= {RATIO_TARGET:.0%}: {mark[summ['ratio_ok']]})")
    lines.append("ms: minimum of the repeats; engine = explain - the tracing it did (JAX trace "
                 "= make_jaxpr alone); the first (cold) explain: " + ", ".join(f"{r['explain_first_s'] * 1e3:.0f} ms" for r in rows))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.engine_cost", description=__doc__)
    p.add_argument("--layers", type=int, nargs="+", default=[12, 48])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=None,
                   help="vocabulary size (default: GPT-2's 50304)")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    p.add_argument("--repeats", type=int, default=5,
                   help="explain calls (and JAX traces) per depth; the minimum counts")
    p.add_argument("--check", action="store_true",
                   help="measure with the debug aids on (as JAXPASSES_CHECK=1): check_jaxpr "
                        "after every pass and translation validation of every rewrite")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = p.parse_args(argv)
    if len(args.layers) < 1 or min(args.layers) <= 0 or args.repeats <= 0:
        p.error("--layers takes positive depths and --repeats a positive count")
    try:
        rows = [measure_depth(n, batch=args.batch, seq=args.seq, vocab=args.vocab,
                              dtype=args.dtype, repeats=args.repeats, check=args.check)
                for n in sorted(args.layers)]
    except (ValueError, TypeError) as e:
        p.error(str(e))
    summ = summary(rows)
    settings = (f"B={args.batch} T={args.seq} vocab={args.vocab or 'default'} "
                f"{args.dtype}{', checks on' if args.check else ''}")
    print(report_text(rows, summ, settings))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "jax_version": jax.__version__,
                       "device_kind": jax.devices()[0].device_kind, "rows": rows,
                       "summary": summ}, f, indent=2)
    return 0 if summ["ratio_ok"] and summ["growth_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
