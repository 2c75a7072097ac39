"""`python -m experiments.run`: the plain model's step under jax.jit against the optimized one.

For every configuration, in one process: the baseline is the model's train step (loss, gradient,
AdamW update) under `jax.jit`; the optimized variant is the same step differentiating
`passes.optimize(spec.loss, pipeline)`. Both start from the same parameters and batch, compile
before any clock is read, warm up, then run interleaved repetitions; results are blocked on
before each clock reading. See experiments/README.md for the options and the output's fields.

From Python::

    from experiments.config import RunConfig
    from experiments.run import run
    results = run(RunConfig(models=("gpt2-tiny",), batch=4))
    results["results"][0]["speedup"]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import pathlib
import re
import sys
import time
import traceback
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

import models
import pallas_kernels
import passes
from experiments import config as config_lib
from experiments import measure, output, sharding
from experiments.config import Case, RunConfig

VARIANTS = ("baseline", "optimized")


# -- the steps -------------------------------------------------------------------------------

def train_step(loss_fn: Callable, tx: optax.GradientTransformation,
               update_stats: Callable | None) -> Callable:
    """(params, opt_state, batch) -> (params, opt_state, loss): one AdamW step on `loss_fn`."""

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if update_stats is not None:
            params = update_stats(params, batch)
        return params, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


@dataclasses.dataclass
class Variant:
    """One compiled variant and its running state; calling it runs n steps and blocks."""

    compiled: Callable
    state: tuple  # train: (params, opt_state); forward: (params,)
    batch: dict
    train: bool
    last_loss: jax.Array | None = None

    def __call__(self, n: int) -> None:
        if n == 0:
            return
        if self.train:
            params, opt_state = self.state
            for _ in range(n):
                params, opt_state, loss = self.compiled(params, opt_state, self.batch)
            self.state = (params, opt_state)
            jax.block_until_ready((params, opt_state, loss))
        else:
            losses = [self.compiled(self.state[0], self.batch) for _ in range(n)]
            jax.block_until_ready(losses)
            loss = losses[-1]
        self.last_loss = loss


def _compile(jitted, *args) -> tuple[Callable, dict]:
    """Lowers (tracing, and for the optimized variant the passes) and compiles, timing both."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return compiled, {"compile_time_s": done - start, "lower_time_s": lowered_at - start,
                      "xla_compile_time_s": done - lowered_at}


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


# -- one case --------------------------------------------------------------------------------

def case_record(case: Case) -> dict:
    """A result's identifying fields, before anything is measured."""
    return {"label": case.label, "model": case.model, "batch": case.batch, "seq": case.seq,
            "dtype": case.dtype, "mode": case.mode,
            "pipeline": config_lib.pipeline_name(case.pipeline),
            "implementation": case.implementation, "overrides": dict(case.overrides),
            "sweep": dict(case.sweep), "status": "ok", "error": None, "speedup": None,
            "speedup_ci": None, "speedup_within_noise": None, "diverged": False,
            "numerics_ok": None}


def _pass_report(optimized_loss, params, batch) -> dict:
    report = optimized_loss.report(params, batch)
    declined = collections.Counter(f"{d.pass_name}.{d.rule}: {d.reason}" for d in report.declined)
    return {
        "pass_time_s": report.total_pass_time,
        "pass_times_s": dict(report.pass_times),
        "trace_time_s": report.trace_time,
        "rewrites": dict(report.counts),
        "rewrites_total": len(report.rewrites),
        "rewrites_primal_only": sum(r.primal_only for r in report.rewrites),
        "declined": dict(declined),
    }


def _oom(record: dict, error: BaseException) -> None:
    record["status"] = "out_of_memory"
    record["error"] = str(error).splitlines()[0][:500]


def _phases(config: RunConfig) -> int:
    # build, two compiles, numerics, warm-up, repetitions, (profile)
    return 5 + config.repeats + (1 if config.profile else 0)


def measure_case(case: Case, config: RunConfig, device_kind: str,
                 display: output.Display) -> dict:
    """Measures one configuration; a variant that runs out of memory is recorded, not raised."""
    spec = models.get(case.model, **case.model_overrides())
    dtype = spec.config.dtype
    seq = getattr(spec.config, "seq_len", None)
    train = case.mode == "train"
    flops_per_step = spec.flops_per_example * case.batch * (1.0 if train else 1.0 / 3.0)
    peak = measure.device_peak(device_kind, dtype)
    result = case_record(case)
    result.update(seq=seq, dtype=dtype, flops_per_step=flops_per_step,
                  mfu_peak=None if peak is None else dataclasses.asdict(peak))
    records = {name: {"status": "ok"} for name in VARIANTS}
    result.update(records)

    display.phase("initializing")
    param_key, batch_key = jax.random.split(jax.random.key(config.seed))
    params = jax.jit(spec.init)(param_key)
    batch = jax.jit(spec.batch, static_argnums=1)(batch_key, case.batch)
    pipeline = config_lib.build_pipeline(case.pipeline, case.implementation)
    optimized_loss = passes.optimize(spec.loss, pipeline)
    losses = {"baseline": spec.loss, "optimized": optimized_loss}
    tx = optax.adamw(config.learning_rate, mask=spec.trainable_mask(params))

    variants: dict[str, Variant] = {}
    for name in VARIANTS:
        display.phase(f"compiling {name}")
        try:
            if train:
                state = (_copy(params), tx.init(params))
                jitted = train_step(losses[name], tx, spec.update_stats)
                compiled, times = _compile(jitted, *state, batch)
            else:
                state = (params,)
                compiled, times = _compile(jax.jit(losses[name]), params, batch)
        except Exception as e:
            if not measure.is_out_of_memory(e):
                raise
            _oom(records[name], e)
            continue
        records[name].update(times)
        records[name].update(measure.compiled_memory(compiled))
        variants[name] = Variant(compiled, state, batch, train)
    if "optimized" in variants and measure.interprets_kernels(case.implementation):
        # Pallas's interpreter copies every operand of every kernel: the memory a GPU or TPU
        # program needs is that of the kernels as opaque calls (compiled, never run)
        with pallas_kernels.opaque_kernels():
            stand_ins = passes.optimize(spec.loss, config_lib.build_pipeline(
                case.pipeline, case.implementation))
            jitted = (train_step(stand_ins, tx, spec.update_stats) if train
                      else jax.jit(stand_ins))
            compiled, _ = _compile(jitted, *variants["optimized"].state, batch)
        records["optimized"]["kernels_as_calls"] = measure.compiled_memory(compiled)
    records["optimized"].update(_pass_report(optimized_loss, params, batch))

    display.phase("checking numerics")
    loss_initial, grad_rel = _probe_numerics(config, train, losses, params, batch, variants,
                                             result)

    display.phase("warming up")
    for name in list(variants):
        try:
            variants[name](config.warmup)
        except Exception as e:
            if not measure.is_out_of_memory(e):
                raise
            _oom(records[name], e)
            del variants[name]
            continue
        records[name].update(measure.device_memory())

    if variants:
        times = measure.time_interleaved(
            variants, steps=config.steps, repeats=config.repeats,
            on_repetition=lambda r: display.phase(f"timing, repetition {r + 1}"))
        for name, step_times in times.items():
            records[name].update(measure.timing_metrics(
                step_times, batch=case.batch, seq=seq, flops_per_step=flops_per_step,
                peak=peak))

    loss_final = None
    if len(variants) == 2 and train:
        loss_final = tuple(float(variants[name].last_loss) for name in VARIANTS)
    result["numerics"] = measure.numerics(loss_initial=loss_initial, loss_final=loss_final,
                                          grad_rel_diff=grad_rel, dtype=dtype,
                                          loss_rtol=config.loss_rtol)
    result["diverged"] = result["numerics"]["diverged"]
    result["numerics_ok"] = result["numerics"]["ok"]
    result["speedup"] = measure.speedup(records["baseline"], records["optimized"])
    if result["speedup"] is not None:
        interval = measure.speedup_interval(records["baseline"]["step_times_s"],
                                            records["optimized"]["step_times_s"])
        result["speedup_ci"] = None if interval is None else list(interval)
        result["speedup_within_noise"] = measure.within_noise(interval)
    failed = [n for n in VARIANTS if records[n]["status"] == "out_of_memory"]
    if failed:
        result["status"] = "out_of_memory"
        result["error"] = "; ".join(f"{n}: {records[n]['error']}" for n in failed)

    if config.profile and variants:
        display.phase("profiling")
        _profile(config.profile, case, variants, min(config.steps, 3))
    return result


def _probe_numerics(config, train, losses, params, batch, variants, result):
    """Loss (and in train mode gradients) of both losses at the shared initial parameters."""
    if not config.check_numerics or len(variants) < 2:
        return None, None
    try:
        if train:
            values = {n: jax.jit(jax.value_and_grad(losses[n]))(params, batch) for n in VARIANTS}
            loss_initial = tuple(float(values[n][0]) for n in VARIANTS)
            grad_rel = measure.max_relative_difference(values["baseline"][1],
                                                       values["optimized"][1])
            return loss_initial, grad_rel
        return tuple(float(variants[n].compiled(params, batch)) for n in VARIANTS), None
    except Exception as e:
        if not measure.is_out_of_memory(e):
            raise
        result["numerics_error"] = f"the numerics check ran out of memory: {e}"
        return None, None


def _profile(root: str, case: Case, variants: dict[str, Variant], steps: int) -> None:
    """A `jax.profiler` trace of a few steps of each variant, one folder per case."""
    folder = pathlib.Path(root) / re.sub(r"[^A-Za-z0-9_.=-]+", "_", case.label)
    with jax.profiler.trace(str(folder)):
        for name, variant in variants.items():
            with jax.profiler.TraceAnnotation(f"{case.label} {name}"):
                variant(steps)


# -- a run -----------------------------------------------------------------------------------

def config_record(config: RunConfig) -> dict:
    """The config as JSON values."""
    record = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    record["models"] = list(config.models)
    record["pipeline"] = config_lib.pipeline_name(config.pipeline)
    record["sweeps"] = {s.key: list(s.values) for s in config.sweeps}
    record["model_overrides"] = dict(config.model_overrides)
    return record


def run(config: RunConfig, *, verbose: bool = True, argv: Sequence[str] | None = None) -> dict:
    """Measures every case of `config`; returns what results.json holds.

    With ``config.out`` set, results.json and results.csv are rewritten after every case (so a
    long run that dies keeps what it measured) and results.png is drawn at the end. A case that
    runs out of memory, or fails, is recorded with its error and the run goes on.
    """
    cases = config_lib.cases(config)
    out = output.prepare_out_dir(config.out) if config.out else None
    env = measure.environment(argv)
    payload = {"environment": env, "config": config_record(config), "results": []}
    display = output.Display(verbose, len(cases))
    with display:
        for case in cases:
            display.start_case(case.label, _phases(config))
            try:
                result = measure_case(case, config, env["device_kind"], display)
            except Exception as e:
                result = case_record(case)
                result.update(status="out_of_memory" if measure.is_out_of_memory(e) else "error",
                              error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            payload["results"].append(result)
            display.case_done(result)
            if out is not None:
                output.write_all(payload, out, plot=False)
    if out is not None:
        output.write_all(payload, out)
        payload["out"] = str(out)
    if verbose:
        output.print_summary(payload, display.console)
        if out is not None:
            display.console.print(f"results in {out}/ (results.json, results.csv, results.png)")
    return payload


# -- the command line ------------------------------------------------------------------------

def pass_description(p) -> str:
    """A fusion pass's own description (what it matches, what it calls); else its class's."""
    description = getattr(p, "description", None)
    if description:
        return description
    doc = (type(p).__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def list_text() -> str:
    """What `--list` prints: models, passes, presets, sweep keys."""
    lines = ["models:"]
    for name in models.names():
        c = models.get(name).config
        fields = ", ".join(f"{k}={getattr(c, k)}" for k in ("seq_len", "num_layers", "d_model",
                                                            "image_size", "dtype")
                           if hasattr(c, k))
        lines.append(f"  {name:<18} {type(c).__name__}({fields})")
    lines.append("passes (the default pipeline, in order; --pipeline default | none | a,b,...):")
    for p in passes.default_pipeline().passes:
        lines.append(f"  {p.name:<22} {pass_description(p)}")
    lines.append("presets (--preset):")
    for name, preset in config_lib.PRESETS.items():
        lines.append(f"  {name:<18} models={','.join(preset.models)} batch={preset.batch} "
                     f"seq={preset.seq} dtype={preset.dtype}")
    lines.append(f"sweep keys: {', '.join(config_lib.RUN_SWEEP_KEYS)}, or any field of the "
                 f"models' configs (e.g. num_layers)")
    lines.append(f"implementations: {', '.join(config_lib.IMPLEMENTATIONS)} (default: each "
                 f"kernel chooses)")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.run",
        description="Compare the plain model's step under jax.jit with the same step on "
                    "passes.optimize(loss): step time, throughput, MFU, compile and pass time, "
                    "memory, numerics, rewrites.")
    p.add_argument("--list", action="store_true", help="list models, passes and presets")
    p.add_argument("--preset", default="default", choices=sorted(config_lib.PRESETS),
                   help="starting configuration; the options below override it")
    p.add_argument("--model", nargs="+", metavar="NAME", help="one or more registry names")
    p.add_argument("--pipeline", help="default, none, or comma-separated pass names")
    p.add_argument("--implementation", choices=config_lib.IMPLEMENTATIONS,
                   help="force the kernels' implementation (default: each chooses)")
    p.add_argument("--batch", type=int, help="examples per step")
    p.add_argument("--seq", type=int, help="sequence length (language models)")
    p.add_argument("--dtype", help="compute dtype: float32 or bfloat16")
    p.add_argument("--steps", type=int, help="timed steps per repetition")
    p.add_argument("--repeats", type=int, help="interleaved repetitions per variant")
    p.add_argument("--warmup", type=int, help="untimed steps after compiling")
    p.add_argument("--mode", choices=config_lib.MODES, help="train step or forward loss")
    p.add_argument("--lr", type=float, dest="learning_rate", help="AdamW learning rate")
    p.add_argument("--seed", type=int, help="key of the parameters and the batch")
    p.add_argument("--loss-rtol", type=float, dest="loss_rtol",
                   help="loss difference flagged as diverging (default by dtype)")
    p.add_argument("--no-numerics", action="store_false", dest="check_numerics", default=None,
                   help="skip the gradient comparison (saves two compiles per case)")
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2,...",
                   help="vary one key (repeat for a grid), e.g. seq=256,512,1024; in pipeline "
                        "values join pass names with '+'")
    p.add_argument("--out", help="results folder, new or empty (default results/<timestamp>)")
    p.add_argument("--profile", metavar="DIR", help="write a jax.profiler trace of each case")
    p.add_argument("--mesh", metavar="AXIS=N,...",
                   help="instead: the train gradient on this mesh (e.g. data=4,model=2) under "
                        "data, tensor and FSDP placements, per-device collective bytes, temp "
                        "memory and step time of baseline and optimized (experiments/sharding.py)")
    p.add_argument("--host-devices", type=int, metavar="N",
                   help="simulate N CPU devices (set before JAX starts)")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The preset with every option that was given replacing its field."""
    preset = config_lib.PRESETS[args.preset]
    changes = {k: v for k, v in vars(args).items()
               if v is not None and k not in ("list", "preset", "model", "sweep", "mesh",
                                                 "host_devices")}
    if args.model:
        changes["models"] = tuple(args.model)
    if args.sweep:
        changes["sweeps"] = tuple(config_lib.parse_sweep(s) for s in args.sweep)
    changes["out"] = args.out or output.default_out_dir()
    return dataclasses.replace(preset, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(argv)
    if args.list:
        print(list_text())
        return 0
    if args.host_devices:
        sharding.simulate_host_devices(args.host_devices, argv)
    if args.mesh:
        models_ = tuple(args.model or config_lib.PRESETS[args.preset].models)
        sharding.run_mesh(args.mesh, models_, args.implementation, batch=args.batch or 8)
        return 0
    try:
        config = config_from_args(args)
        config_lib.cases(config)
        output.check_out_dir(config.out)
    except (ValueError, TypeError) as e:
        p.error(str(e))
    payload = run(config, argv=argv)
    bad = [r for r in payload["results"] if r["status"] != "ok" or r["numerics_ok"] is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
