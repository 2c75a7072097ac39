"""Typed configuration of an experiment run; the CLI only fills these, presets are data.

A `RunConfig` names models and the measurement settings; `cases(config)` expands it (models
times sweep values) into `Case`s, one configuration each, measured baseline against optimized.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import models
import passes
from models import config as model_config

MODES = ("train", "forward")
IMPLEMENTATIONS = ("pallas", "cudnn", "xla")  # plus None: each kernel picks (docs/DESIGN.md)
# Run-level settings a sweep may vary; any other key must be a field of the models' configs.
RUN_SWEEP_KEYS = ("model", "batch", "seq", "dtype", "mode", "pipeline", "implementation")
# Inside a swept pipeline value, pass names are joined with "+" (the comma separates values).
SWEEP_PASS_SEPARATOR = "+"


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One swept key and its values, e.g. ``Sweep("seq", (256, 512, 1024))``."""

    key: str
    values: tuple

    def __post_init__(self):
        if not self.values:
            raise ValueError(f"sweep {self.key}= has no values; write e.g. {self.key}=1,2,4")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What to measure and how.

    Attributes:
      models: registry names (``models.names()``).
      pipeline: ``"default"`` (clean-ups and every fusion pass), ``"none"`` (no pass: the
        optimized step only re-evaluates the traced program), comma-separated pass names of
        the default pipeline, run in the order given (clean-ups are not implied), or, from
        Python, a `passes.Pipeline` of your own passes.
      implementation: handed to every kernel the fusion passes call; None lets each choose.
      batch: examples per step.
      seq: sequence length for language models (their ``seq_len``); None keeps the preset's.
      dtype: compute dtype (``"float32"`` or ``"bfloat16"``); None keeps the preset's.
      steps: timed steps per repetition (one clock reading around them).
      repeats: repetitions per variant, interleaved baseline/optimized (order alternating).
      warmup: untimed steps per variant after compiling.
      mode: ``"train"`` (loss -> grad -> AdamW update) or ``"forward"`` (the loss alone).
      learning_rate: AdamW's learning rate.
      seed: the parameters' and the batch's key; both variants use the same.
      loss_rtol: the loss difference (relative, floor 1) beyond which the optimized run is
        flagged as diverging; None picks by dtype (`DEFAULT_LOSS_RTOL`).
      check_numerics: also compare loss and gradients of the two losses at the initial
        parameters (two more compiles per case).
      sweeps: swept keys; several make a grid.
      model_overrides: extra model config fields, e.g. ``(("num_layers", 4),)``.
      out: results folder; None writes nothing (the CLI defaults it to results/<timestamp>).
      profile: folder for a `jax.profiler` trace of a few steps of each variant.
    """

    models: tuple[str, ...] = ("gpt2-tiny", "llama-tiny")
    pipeline: str | passes.Pipeline = "default"
    implementation: str | None = None
    batch: int = 8
    seq: int | None = None
    dtype: str | None = None
    steps: int = 5
    repeats: int = 5
    warmup: int = 2
    mode: str = "train"
    learning_rate: float = 3e-4
    seed: int = 0
    loss_rtol: float | None = None
    check_numerics: bool = True
    sweeps: tuple[Sweep, ...] = ()
    model_overrides: tuple[tuple[str, Any], ...] = ()
    out: str | None = None
    profile: str | None = None

    def __post_init__(self):
        if isinstance(self.models, str):
            object.__setattr__(self, "models", (self.models,))
        if not self.models:
            raise ValueError(f"no model given; registered models: {', '.join(models.names())}")
        for name in self.models:
            check_model(name)
        for field in ("batch", "steps", "repeats"):
            _check_positive(field, getattr(self, field))
        _check_positive("warmup", self.warmup + 1)
        if self.seq is not None:
            _check_positive("seq", self.seq)
        check_mode(self.mode)
        check_dtype(self.dtype)
        check_implementation(self.implementation)
        pipeline_passes(self.pipeline, self.implementation)
        keys = [s.key for s in self.sweeps]
        if len(set(keys)) != len(keys):
            raise ValueError(f"a key is swept twice: {keys}; give each key one --sweep")


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration: a model at fixed sizes, measured baseline against optimized."""

    model: str
    batch: int
    seq: int | None
    dtype: str | None
    mode: str
    pipeline: str | passes.Pipeline
    implementation: str | None
    overrides: tuple[tuple[str, Any], ...]
    sweep: tuple[tuple[str, Any], ...]  # the swept values that made this case

    @property
    def label(self) -> str:
        swept = " ".join(f"{k}={v}" for k, v in self.sweep if k != "model")
        return f"{self.model} {swept}".strip()

    def model_overrides(self) -> dict[str, Any]:
        """The keyword overrides handed to `models.get`."""
        kw = dict(self.overrides)
        if self.seq is not None:
            kw["seq_len"] = self.seq
        if self.dtype is not None:
            kw["dtype"] = self.dtype
        return kw


def cases(config: RunConfig) -> list[Case]:
    """The configurations of a run: every model times every combination of swept values."""
    sweep_models = [s for s in config.sweeps if s.key == "model"]
    names = sweep_models[0].values if sweep_models else config.models
    grid = [s for s in config.sweeps if s.key != "model"]
    result = []
    for name in names:
        for combo in itertools.product(*(s.values for s in grid)):
            run_fields = dict(batch=config.batch, seq=config.seq, dtype=config.dtype,
                              mode=config.mode, pipeline=config.pipeline,
                              implementation=config.implementation)
            overrides = dict(config.model_overrides)
            swept = [("model", name)] if sweep_models else []
            for sweep, value in zip(grid, combo):
                if sweep.key in run_fields:
                    run_fields[sweep.key] = value
                else:
                    overrides[sweep.key] = value
                swept.append((sweep.key, value))
            case = Case(model=name, overrides=tuple(overrides.items()), sweep=tuple(swept),
                        **run_fields)
            check_case(case)
            result.append(case)
    return result


def check_case(case: Case) -> None:
    """Fails early, before anything is measured, when a model cannot take the case's settings."""
    check_model(case.model)
    fields = model_config_fields(case.model)
    if case.seq is not None and "seq_len" not in fields:
        raise ValueError(f"--seq applies to language models; {case.model!r} has no seq_len "
                         f"(its config fields: {', '.join(fields)}). Run it without --seq.")
    unknown = [k for k, _ in case.overrides if k not in fields]
    if unknown:
        raise ValueError(f"{case.model!r} has no config field(s) {', '.join(unknown)}; sweep "
                         f"one of {', '.join(RUN_SWEEP_KEYS)} or a field of its config: "
                         f"{', '.join(fields)}")
    check_mode(case.mode)
    check_dtype(case.dtype)
    check_implementation(case.implementation)
    pipeline_passes(case.pipeline, case.implementation)
    _check_positive("batch", case.batch)
    models.get(case.model, **case.model_overrides())  # checks the values (types, divisibility)


# -- names and values ------------------------------------------------------------------------

def check_model(name: str) -> None:
    if name not in models.names():
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(models.names())}")


@functools.lru_cache(maxsize=None)
def model_config_fields(name: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(models.get(name).config))


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in model_config.DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(model_config.DTYPES)}")


def check_implementation(implementation: str | None) -> None:
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; use one of "
                         f"{', '.join(IMPLEMENTATIONS)} (or leave it out to let each kernel "
                         f"choose)")


def _check_positive(field: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{field} must be a positive int, got {value!r}")


def available_passes(implementation: str | None = None) -> list[str]:
    """Names of the default pipeline's passes, in order."""
    return passes.default_pipeline(implementation).names


def pipeline_name(pipeline: str | passes.Pipeline) -> str:
    """How results name a pipeline: the spec as given, or a custom pipeline's pass names."""
    if isinstance(pipeline, passes.Pipeline):
        return "custom:" + ",".join(pipeline.names)
    return pipeline


def pipeline_passes(pipeline: str | passes.Pipeline, implementation: str | None) -> list:
    """The `Pass` objects a pipeline spec names (see `RunConfig.pipeline`)."""
    if isinstance(pipeline, passes.Pipeline):
        return list(pipeline.passes)
    if not isinstance(pipeline, str):
        raise TypeError(f"pipeline takes a name (default, none, or pass names) or a "
                        f"passes.Pipeline, got {type(pipeline).__name__}")
    default = passes.default_pipeline(implementation)
    if pipeline == "default":
        return list(default.passes)
    if pipeline == "none":
        return []
    by_name = {p.name: p for p in default.passes}
    names = [n.strip() for n in pipeline.replace(SWEEP_PASS_SEPARATOR, ",").split(",")]
    unknown = [n for n in names if n not in by_name]
    if unknown or not any(names):
        raise ValueError(f"unknown pass name(s) {', '.join(map(repr, unknown)) or repr(pipeline)}"
                         f"; valid: default, none, or a comma-separated list of "
                         f"{', '.join(by_name)}")
    return [by_name[n] for n in names]


def build_pipeline(pipeline: str | passes.Pipeline,
                   implementation: str | None) -> passes.Pipeline:
    """A fresh `Pipeline` for a spec; a given `Pipeline` is used as it is (its own settings)."""
    if isinstance(pipeline, passes.Pipeline):
        return pipeline
    return passes.Pipeline(pipeline_passes(pipeline, implementation))


# -- parsing CLI values ----------------------------------------------------------------------

def parse_sweep(text: str) -> Sweep:
    """``"seq=256,512"`` -> ``Sweep("seq", (256, 512))``; values typed by the key."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise ValueError(f"--sweep takes KEY=V1,V2,... (e.g. seq=256,512,1024), got {text!r}")
    raw = [v.strip() for v in values.split(",") if v.strip()]
    return Sweep(key, tuple(parse_value(key, v) for v in raw))


def parse_value(key: str, text: str):
    """A swept value typed by its key: run settings by `RunConfig`'s fields, others inferred."""
    if key in ("batch", "seq"):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--sweep {key}= takes integers, got {text!r}") from None
    if key == "implementation":
        return None if text.lower() in ("none", "auto") else text
    if key in ("model", "dtype", "mode", "pipeline"):
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# -- presets ---------------------------------------------------------------------------------

PRESETS: dict[str, RunConfig] = {
    # The default: both tiny language models, a train step each; < 2 minutes on a 2-core CPU.
    "default": RunConfig(),
    # The reference GPT-2 small train step (docs/BENCHMARKS.md): B=8, T=1024, bf16, AdamW.
    "gpt2-small-h100": RunConfig(models=("gpt2-small",), batch=8, seq=1024, dtype="bfloat16",
                                 steps=10, repeats=5, warmup=3),
    # Every tiny model of the zoo, vision included.
    "tiny-zoo": RunConfig(models=("mlp", "gpt2-tiny", "gpt2-tiny-linen", "llama-tiny",
                                  "vit-tiny", "resnet-tiny")),
}
