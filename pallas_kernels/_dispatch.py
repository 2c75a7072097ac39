"""One op, several implementations: choose one, fall back on NotImplementedError, explain.

Each op package creates an `Op` (public as `pallas_kernels.Op`) and registers its
implementations in order of preference:

    attention_op = Op("attention")
    attention_op.register("pallas")(pallas_attention)
    attention_op.register("xla")(attention_xla)

and the public function calls `attention_op(q, k, v, causal=causal, implementation=implementation)`.

An implementation that cannot handle a call raises `NotImplementedError(reason)`; the next
candidate is tried. A pinned implementation (a single name) never runs anything else: its refusal
is the error. `None` picks "xla" on CPU (and for a platform this host lacks); on a GPU or a TPU it
tries the implementations in the order that `measured_order` gives: each one timed (forward and backward) on random inputs of the call's
shapes and dtypes, fastest first, the XLA reference always among them. Timings are kept in a JSON
file keyed by device kind, jax version, op, shapes, dtypes and static arguments.

Pallas implementations (registered with `check_lowering=True`, the default for "pallas") are
lowered, and on an accelerator compiled, on their own the first time a signature is seen, forward
and backward together; a failure there is cached and counts as declining, with the compiler's
message as the reason. So a kernel that no longer lowers on some JAX version makes the call fall
back instead of crashing inside the caller's `jit`.

Block sizes: `tuned_config` picks a kernel's frozen config dataclass by timing a small search space
on the device (cached in the same JSON file); on CPU, or with PALLAS_KERNELS_AUTOTUNE=0, it
returns the heuristic default.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import statistics
import tempfile
import threading
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _sharding
from pallas_kernels import _pallas_compat as compat
from pallas_kernels import _target
from pallas_kernels._target import KernelChoice

IMPLEMENTATIONS = ("pallas", "cudnn", "xla")

_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def _platform() -> str:
    return jax.default_backend()


def interpret_mode() -> bool:
    """Whether Pallas kernels run in interpret mode for the current `KernelChoice`: on a host
    without the target platform, or when PALLAS_KERNELS_INTERPRET=1 (see `_target`)."""
    return _target.current().interpret


def target_platform() -> str:
    """The platform the current `KernelChoice` targets: "gpu", "tpu" or "cpu"."""
    return _target.current().platform


def by_platform(*, gpu: Callable, tpu: Callable) -> Callable:
    """One "pallas" implementation from the Triton one (GPU, and CPU through the interpreter)
    and the Mosaic one (TPU), picked by the current choice's platform."""
    def pallas(*args, **kwargs):
        return (tpu if target_platform() == "tpu" else gpu)(*args, **kwargs)

    pallas.__name__ = getattr(gpu, "__name__", "pallas")
    pallas.__doc__ = getattr(gpu, "__doc__", None)
    return pallas


# ----------------------------------------------------------------------------------------------
# Call signatures: which leaves of (args, kwargs) are arrays, and a readable key for caches.

def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (type, np.dtype))


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


@dataclasses.dataclass(frozen=True)
class _BoundCall:
    """(args, kwargs) split into array leaves, which become function arguments, and the rest."""
    leaves: tuple
    treedef: Any
    array_positions: tuple[int, ...]
    key: str

    @classmethod
    def of(cls, args, kwargs) -> "_BoundCall":
        with_paths, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs))
        leaves, positions, parts = [], [], []
        for i, (path, leaf) in enumerate(with_paths):
            leaves.append(leaf)
            where = jax.tree_util.keystr(path)
            if _is_array(leaf):
                positions.append(i)
                parts.append(f"{where}:{_dtype_name(leaf.dtype)}{list(leaf.shape)}")
            else:
                parts.append(f"{where}={leaf!r}")
        return cls(tuple(leaves), treedef, tuple(positions), " ".join(parts))

    def abstract(self) -> list[jax.ShapeDtypeStruct]:
        return [jax.ShapeDtypeStruct(self.leaves[i].shape, self.leaves[i].dtype)
                for i in self.array_positions]

    def call(self, fn: Callable, arrays: Sequence) -> Any:
        leaves = list(self.leaves)
        for i, a in zip(self.array_positions, arrays):
            leaves[i] = a
        args, kwargs = jax.tree_util.tree_unflatten(self.treedef, leaves)
        return fn(*args, **kwargs)

    def differentiable(self) -> list[int]:
        """Indices (into the array arguments) of the floating-point arrays."""
        return [j for j, i in enumerate(self.array_positions)
                if jnp.issubdtype(self.leaves[i].dtype, jnp.inexact)]

    def forward_backward(self, fn: Callable) -> Callable:
        """A function of the arrays running `fn` and its gradient w.r.t. every float input."""
        diff = self.differentiable()

        def run(*arrays):
            def total(*float_arrays):
                full = list(arrays)
                for j, a in zip(diff, float_arrays):
                    full[j] = a
                out = self.call(fn, full)
                return sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree_util.tree_leaves(out)
                           if jnp.issubdtype(o.dtype, jnp.inexact))

            if not diff:
                return self.call(fn, arrays)
            return jax.value_and_grad(total, argnums=tuple(range(len(diff))))(
                *[arrays[j] for j in diff])

        return run


# ----------------------------------------------------------------------------------------------
# Lowering check: compile once per signature, remember the verdict.

_verdicts: dict[tuple, str | None] = {}
_verdicts_lock = threading.Lock()


def _lowering_failure(fn: Callable, bound: _BoundCall) -> str | None:
    """None if `fn` (forward and backward) lowers, and off CPU compiles; else the reason.

    A function JAX cannot differentiate is checked forward only. Tracing errors other than
    NotImplementedError propagate: they are bugs or bad input, not a backend that cannot take
    the kernel.
    """
    abstract = bound.abstract()
    try:
        try:
            traced = jax.jit(bound.forward_backward(fn)).trace(*abstract)
        except NotImplementedError:
            raise
        except Exception:  # not differentiable: its forward is still worth checking
            traced = jax.jit(lambda *arrays: bound.call(fn, arrays)).trace(*abstract)
    except NotImplementedError as e:
        return str(e)
    choice = _target.current()
    try:
        if choice.interpret or choice.on_host:
            lowered = traced.lower()
            # Interpret-mode kernels are plain XLA on a CPU: compiling them twice buys nothing.
            if _platform() != "cpu":
                lowered.compile()
        else:  # kernels for a platform this host lacks: lower for it, compile nothing
            target = "cuda" if choice.platform == "gpu" else choice.platform
            context = (compat.gpu_lowering_target() if choice.platform == "gpu"
                       else contextlib.nullcontext())
            with context:
                traced.lower(lowering_platforms=(target,))
    except NotImplementedError as e:
        return f"failed to lower: {e}"
    except Exception as e:  # the compiler's own error types vary across versions and backends
        return f"failed to lower or compile: {type(e).__name__}: {e}"
    return None


def check_lowering(op_name: str, impl: str, fn: Callable, args, kwargs) -> None:
    """Raise NotImplementedError (with the compiler's message) if `fn` cannot be compiled here."""
    bound = _BoundCall.of(args, kwargs)
    choice = _target.current()
    key = (op_name, impl, _platform(), choice.platform, choice.interpret, compat.opaque(),
           bound.key)
    with _verdicts_lock:
        known = key in _verdicts
        reason = _verdicts.get(key)
    if not known:
        with _sharding.without_explicit_mesh():
            reason = _lowering_failure(fn, bound)
        with _verdicts_lock:
            _verdicts[key] = reason
    if reason is not None:
        raise NotImplementedError(reason)


def clear_caches() -> None:
    """Forget lowering verdicts and timings held in memory (the JSON file on disk is kept)."""
    with _verdicts_lock:
        _verdicts.clear()
    with _cache_lock:
        _timings.clear()


# ----------------------------------------------------------------------------------------------
# Timing on the device, with a JSON cache.

def cache_path() -> str:
    return os.environ.get(
        "PALLAS_KERNELS_CACHE",
        os.path.join(os.path.expanduser("~"), ".cache", "pallas_kernels", "timings.json"))


_cache_lock = threading.Lock()
_timings: dict[tuple[str, str], dict] = {}  # (cache file, key) -> entry, read or measured


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _cached_entry(key: str) -> dict | None:
    path = cache_path()
    with _cache_lock:
        if (path, key) not in _timings:
            entry = _read_cache(path).get(key)
            if entry is None:
                return None
            _timings[path, key] = entry
        return _timings[path, key]


def _write_cache_entry(key: str, entry: dict) -> None:
    """Keep `entry` in memory and in the JSON file (a file that cannot be written only warns)."""
    path = cache_path()
    with _cache_lock:
        _timings[path, key] = entry
        try:
            cache = _read_cache(path)
            cache[key] = entry
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(cache, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as e:
            warnings.warn(f"pallas_kernels: could not write the timing cache {path} ({e}); "
                          f"set PALLAS_KERNELS_CACHE to a writable file to keep timings across "
                          f"processes")


def _cache_key(what: str, bound: _BoundCall) -> str:
    device = jax.devices()[0]
    return f"{device.platform}:{device.device_kind} | jax {jax.__version__} | {what} | {bound.key}"


def _random_arrays(abstract: Sequence[jax.ShapeDtypeStruct], seed: int = 0) -> list[jax.Array]:
    """Inputs for timing: normal floats, zero integers (valid labels), all-True masks."""
    rng = np.random.default_rng(seed)
    out = []
    for a in abstract:
        if jnp.issubdtype(a.dtype, jnp.inexact):
            value = rng.standard_normal(a.shape, dtype=np.float32).astype(a.dtype)
        elif jnp.issubdtype(a.dtype, jnp.bool_):
            value = np.ones(a.shape, dtype=bool)
        else:
            value = np.zeros(a.shape, dtype=a.dtype)
        out.append(jax.device_put(value))
    return out


def time_call(fn: Callable, arrays: Sequence[jax.Array], *, trials: int = 5,
              target_seconds: float = 2e-3) -> float:
    """Median seconds per call of `jax.jit(fn)(*arrays)`, after compiling and a warm-up (of the
    real kernels, also inside `opaque_kernels()`)."""
    with compat.opaque_kernels(False):
        compiled = jax.jit(fn).lower(*arrays).compile()
    return time_compiled(compiled, arrays, trials=trials, target_seconds=target_seconds)


def time_compiled(compiled: Callable, arrays: Sequence[jax.Array], *, trials: int = 5,
                  target_seconds: float = 2e-3) -> float:
    """Median seconds per call of a compiled executable, after a warm-up call.

    Each trial runs enough back-to-back calls to last about `target_seconds`, so that dispatch
    overhead does not swamp short kernels.
    """
    jax.block_until_ready(compiled(*arrays))
    start = time.perf_counter()
    jax.block_until_ready(compiled(*arrays))
    once = time.perf_counter() - start
    reps = max(1, min(100, math.ceil(target_seconds / max(once, 1e-7))))
    samples = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(reps):
            result = compiled(*arrays)
        jax.block_until_ready(result)
        samples.append((time.perf_counter() - start) / reps)
    return statistics.median(samples)


def _time_forward_backward(fn: Callable, bound: _BoundCall) -> float:
    # Under an enclosing trace, ops on concrete values would be staged into that trace;
    # compile-time evaluation makes them run now.
    with jax.ensure_compile_time_eval():
        arrays = _random_arrays(bound.abstract())
        return time_call(bound.forward_backward(fn), arrays)


def measured_order(op: "Op", args, kwargs) -> list[str]:
    """Implementation names, fastest first by measured forward+backward time on this device.

    "xla" is always in the list (last if it could not be timed); implementations that declined
    are left out. The measurement is cached in the JSON file at `cache_path()`.
    """
    bound = _BoundCall.of(args, kwargs)
    key = _cache_key(op.name, bound)
    entry = _cached_entry(key)
    if entry is None:
        seconds, declined = {}, {}
        for name, fn in op.impls.items():
            try:
                if name in op.checked:
                    check_lowering(op.name, name, fn, args, kwargs)
                seconds[name] = _time_forward_backward(fn, bound)
            except Exception as e:  # a candidate that fails to run is a candidate declined
                declined[name] = f"{type(e).__name__}: {e}"
        order = sorted(seconds, key=seconds.get)
        entry = {"order": order, "ms": {n: s * 1e3 for n, s in seconds.items()},
                 "declined": declined}
        _write_cache_entry(key, entry)
    order = [n for n in entry["order"] if n in op.impls]
    return order if "xla" in order else order + ["xla"]


def tuned_config(what: str, run: Callable, args, kwargs, space: Sequence[Any], default: Any):
    """The fastest config in `space` for `run(*args, config=c, **kwargs)`, timed on the device.

    Returns `default` (the heuristic) in interpret mode, for a platform this host lacks (lowering
    for export: nothing could be timed), when `space` is empty, or with the environment variable
    PALLAS_KERNELS_AUTOTUNE=0. Configs are frozen dataclasses; the winner is kept in the JSON
    cache under `what` and the call's signature.
    """
    if (not space or interpret_mode() or not _target.current().on_host
            or os.environ.get("PALLAS_KERNELS_AUTOTUNE") == "0"):
        return default
    bound = _BoundCall.of(args, kwargs)
    key = _cache_key(f"{what} config", bound)
    entry = _cached_entry(key)
    if entry is not None:
        return type(default)(**entry["config"])
    seconds, failed = {}, {}
    for config in space:
        try:
            seconds[config] = _time_forward_backward(functools.partial(run, config=config), bound)
        except Exception as e:  # a config that does not compile or run is skipped, reason kept
            failed[repr(config)] = f"{type(e).__name__}: {e}"
    if not seconds:
        return default
    best = min(seconds, key=seconds.get)
    _write_cache_entry(key, {"config": dataclasses.asdict(best),
                             "ms": {repr(c): s * 1e3 for c, s in seconds.items()},
                             "failed": failed})
    return best


# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Op:
    """One operation, several implementations of it, and the choice between them per call.

    Give your own kernel an XLA fallback by registering both on an `Op`, then call the op:

        import jax
        import jax.numpy as jnp
        from jax.experimental import pallas as pl
        import pallas_kernels

        scale = pallas_kernels.Op("scale")

        @scale.register("pallas")
        def scale_pallas(x, *, factor):
            if x.ndim != 1:
                raise NotImplementedError("the kernel takes vectors")  # declines the call
            def kernel(x_ref, o_ref):
                o_ref[...] = x_ref[...] * factor
            return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                                  interpret=jax.default_backend() == "cpu")(x)

        @scale.register("xla")
        def scale_xla(x, *, factor):
            return x * factor

        y = scale(jnp.arange(4.0), factor=2.0, implementation=["pallas", "xla"])

    Implementations are named from `IMPLEMENTATIONS` ("pallas", "cudnn", "xla") and registered
    in order of preference; array arguments are positional or keyword, everything else is
    static. `implementation` at the call is a name (that one only: its NotImplementedError is
    the error), a list tried in order (a NotImplementedError moves on to the next, and the final
    error lists every reason), or None: "xla" on a CPU, the fastest by measured time on a GPU or
    TPU. `platform` ("gpu", "tpu", "cpu"; None: the default) picks the kernels' target and with
    it their interpret mode; `implementation` may also be a `KernelChoice` carrying all three.
    A "pallas" implementation is also lowered (and on a GPU compiled), forward and backward, on
    its own the first time each signature is seen; a failure there declines the call.
    """
    name: str
    impls: dict[str, Callable] = dataclasses.field(default_factory=dict)
    # Hook for GPU selection: (op, args, kwargs) -> ordered implementation names.
    # None means `measured_order`.
    chooser: Callable | None = None
    # Implementations lowered (and compiled) on their own once per signature before first use.
    checked: set[str] = dataclasses.field(default_factory=set)
    # (*args, **kwargs) -> _sharding.ShardingRule: the factor names of the call's operands.
    # With it, every implementation but "xla" runs per shard when several devices are visible
    # (see _sharding.py); without it a partitioner gathers a kernel's operands.
    sharding: Callable | None = None
    # Whether "xla" runs per shard too: for an XLA implementation that the partitioners split
    # badly (a loop over vocabulary chunks); plain XLA ops are best left to them.
    shard_xla: bool = False

    def register(self, impl: str, *, check_lowering: bool | None = None):
        """Decorator registering `fn` as implementation `impl`.

        `check_lowering` defaults to True for "pallas": see the module docstring.
        """
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLEMENTATIONS}")
        if check_lowering is None:
            check_lowering = impl == "pallas"

        def deco(fn):
            self.impls[impl] = fn
            if check_lowering:
                self.checked.add(impl)
            else:
                self.checked.discard(impl)
            return fn

        return deco

    def candidates(self, implementation, args, kwargs) -> list[str]:
        choice = KernelChoice.of(implementation)
        names = choice.names
        if names is None:
            # Timing needs the target's own device; a CPU only runs kernels in interpret mode.
            if choice.platform == "cpu" or not choice.on_host:
                return ["xla"]
            chooser = self.chooser or measured_order
            with _target.using(choice):
                return list(chooser(self, args, kwargs))
        if not names:
            raise ValueError(f"{self.name}: implementation=[] names nothing to run; pass None "
                             f"to choose automatically, or a name from {IMPLEMENTATIONS}")
        for n in names:
            if n not in IMPLEMENTATIONS:
                raise ValueError(
                    f"{self.name}: unknown implementation {n!r}; expected None or one of "
                    f"{IMPLEMENTATIONS} (or a list of them)")
        return names

    def __call__(self, *args, implementation: str | Sequence[str] | KernelChoice | None = None,
                 platform: str | None = None, **kwargs):
        choice = KernelChoice.of(implementation, platform)
        with _target.using(choice):
            return self._call(choice, args, kwargs)

    def _call(self, choice: KernelChoice, args, kwargs):
        reasons = []
        for n in self.candidates(choice, args, kwargs):
            fn = self.impls.get(n)
            if fn is None:
                reasons.append(f"{n}: {self.name} has no {n!r} implementation")
                continue
            try:
                if n in self.checked:
                    check_lowering(self.name, n, fn, args, kwargs)
                if (self.sharding is not None and (n != "xla" or self.shard_xla)
                        and _sharding.wanted()):
                    out = _sharding.per_shard(self.name, fn, self.sharding(*args, **kwargs),
                                              _BoundCall.of(args, kwargs), n)
                else:
                    out = fn(*args, **kwargs)
            except NotImplementedError as e:
                reasons.append(f"{n}: {e}")
                continue
            _record(self.name, n, _why(choice, reasons))
            return out
        raise NotImplementedError(
            f"{self.name}: no implementation could handle this call:\n  " + "\n  ".join(reasons))


# ----------------------------------------------------------------------------------------------
# Which implementation each call resolved to, and why (for reports of what a rewrite runs).

@dataclasses.dataclass(frozen=True)
class Resolution:
    op: str
    implementation: str  # "pallas", "cudnn" or "xla"
    why: str  # "forced", "measured fastest ...", "the default ...", "fallback after ..."


_recording = threading.local()


@contextlib.contextmanager
def recording_resolutions():
    """Collect a `Resolution` for every op call made (traced) inside the block."""
    outer = getattr(_recording, "log", None)
    log: list[Resolution] = []
    _recording.log = log
    try:
        yield log
    finally:
        _recording.log = outer
        if outer is not None:
            outer.extend(log)


def _record(op: str, implementation: str, why: str) -> None:
    log = getattr(_recording, "log", None)
    if log is not None:
        log.append(Resolution(op, implementation, why))


def _why(choice: KernelChoice, declined: list[str]) -> str:
    if choice.names is None:
        timed = choice.platform != "cpu" and choice.on_host
        why = "measured fastest on this device" if timed else "the default where kernels are not timed"
    elif len(choice.names) == 1:
        why = "forced"
    else:
        why = "first of the requested list"
    return why if not declined else f"fallback after {'; '.join(declined)}"
