"""Pallas spellings that differ, or may differ, across the supported JAX versions.

jax 0.10.2 through 0.12 are supported (the GPU image runs 0.11.2). Kernel files take these names
from here instead of reaching into `jax.experimental.pallas` submodules themselves:

- `squeezed`: the block dimension indexed by the grid and dropped inside the kernel
  (`pl.squeezed`; older releases spelled it `None`, which newer ones still accept).
- `gpu_compiler_params(num_warps=, num_stages=, interpret=)`: Triton compiler parameters for
  `pallas_call` (`jax.experimental.pallas.triton.CompilerParams`, formerly
  `pl.TritonCompilerParams`), or None in interpret mode where they do not apply.
- `gpu_lowering_target()` and `pretend_gpu_info()`: what lowering the Triton kernels for
  "cuda" on a machine without a GPU needs (the tests check kernels that way).
- `pallas_call(kernel, ...)`: `pl.pallas_call`, or inside `opaque_kernels()` an opaque stand-in
  with the kernel's operands and results (see there). Kernel files call this one.

Private JAX (`jax._src`) is reached from here only (and, for the compiler, `passes/_compat.py`).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
from jax.experimental import pallas as pl

try:
    from jax.experimental.pallas.triton import CompilerParams as _TritonCompilerParams
except ImportError:
    _TritonCompilerParams = getattr(pl, "TritonCompilerParams", None)

squeezed = getattr(pl, "squeezed", None)


_opaque: contextvars.ContextVar[bool] = contextvars.ContextVar("pallas_kernels_opaque",
                                                              default=False)


@contextlib.contextmanager
def opaque_kernels(enabled: bool = True):
    """Within it, each Pallas kernel traces as an opaque call that takes the kernel's operands
    and returns its results, as a compiled GPU or TPU kernel is to XLA, instead of the kernel
    itself.

    For reading the memory and communication of a program (`compiled.memory_analysis()`,
    `compiled.as_text()`) on a host that can only interpret kernels: Pallas's interpreter runs a
    kernel as a loop over its grid that writes every block it reads back into its operands, so
    XLA copies each operand, which the compiled kernel never does. A program traced here
    compiles but cannot run (the stand-in raises). Kernels that write a result into an operand
    (`input_output_aliases`) get a fresh buffer here, so the reading errs high by that buffer.

    JAX keeps traces by function: entering and leaving the outermost such context clears its
    caches (`jax.clear_caches()`), so that no program traced inside is reused outside, or the
    other way round. `enabled=False` restores the real kernels inside (timing does that).
    """
    outermost = bool(enabled) and not _opaque.get()
    if outermost:
        jax.clear_caches()
    token = _opaque.set(bool(enabled))
    try:
        yield
    finally:
        _opaque.reset(token)
        if outermost:
            jax.clear_caches()


@contextlib.contextmanager
def keeping_opaque(enabled: bool):
    """Kernels as stand-ins or not, as `enabled` says, without touching JAX's caches: for code
    that traces a call's kernels later, under that call's mode (the partitioners' callbacks, run
    while a program compiles)."""
    token = _opaque.set(bool(enabled))
    try:
        yield
    finally:
        _opaque.reset(token)


def opaque() -> bool:
    """Whether kernels trace as opaque stand-ins (see `opaque_kernels`)."""
    return _opaque.get()


def _refuse(name: str, *_):
    raise RuntimeError(
        f"the Pallas kernel {name!r} was traced as an opaque stand-in (inside "
        f"pallas_kernels.opaque_kernels()), which is for reading a compiled program's memory "
        f"and communication only; trace the program again outside that context to run it")


def pallas_call(kernel, *, out_shape, **kwargs):
    """`pl.pallas_call(kernel, out_shape=..., **kwargs)`, or the stand-in of `opaque_kernels`."""
    if not _opaque.get():
        return pl.pallas_call(kernel, out_shape=out_shape, **kwargs)
    name = getattr(getattr(kernel, "func", kernel), "__name__", "kernel")

    def stand_in(*operands):
        return jax.pure_callback(functools.partial(_refuse, name), out_shape, *operands,
                                 vmap_method="broadcast_all")

    return stand_in


def gpu_compiler_params(*, num_warps: int, num_stages: int, interpret: bool):
    """Triton launch parameters for a `pallas_call`; None in interpret mode."""
    if interpret or _TritonCompilerParams is None:
        return None
    return _TritonCompilerParams(num_warps=num_warps, num_stages=num_stages)


def pretend_gpu_info(version: str = "H100"):
    """A context in which Pallas's Triton lowering, asking the (absent) GPU for its compute
    capability as newer releases do, is answered with `version`'s ("H100", "A100", ...).

    For lowering kernels for "cuda" on a CPU-only machine; a no-op on releases that do not ask.
    """
    import contextlib
    import importlib

    try:
        registration = importlib.import_module("jax._src.pallas.triton.pallas_call_registration")
    except ImportError:
        return contextlib.nullcontext()
    info = getattr(registration, "gpu_info_lib", None)
    if info is None:
        return contextlib.nullcontext()
    answer = info.get_gpu_info_from_version(getattr(info.GpuVersion, version))

    @contextlib.contextmanager
    def answering():
        saved = info.get_gpu_info
        info.get_gpu_info = lambda: answer
        try:
            yield
        finally:
            info.get_gpu_info = saved

    return answering()


def gpu_lowering_target(device_kind: str = "NVIDIA H100 80GB HBM3"):
    """A context in which `.lower(lowering_platforms=("cuda",))` runs Pallas's Triton lowering
    without a GPU, for checking kernels on a CPU-only machine.

    jax 0.10 falls back to compute capability 9.0 by itself; later releases need the target named
    through an abstract mesh whose abstract device has this `device_kind`.
    """
    import contextlib

    import jax

    abstract_device = getattr(jax.sharding, "AbstractDevice", None)
    if abstract_device is None:
        return contextlib.nullcontext()
    try:
        mesh = jax.sharding.AbstractMesh(
            (1,), ("gpu",),
            abstract_device=abstract_device(device_kind=device_kind, num_cores=132,
                                            platform="gpu"))
    except TypeError:  # releases whose abstract meshes carry no device
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh)


def tpu_compiler_params(dimension_semantics, vmem_limit_bytes: int | None = None):
    """Mosaic compiler parameters: which grid axes are parallel and which carry a reduction
    (`pltpu.CompilerParams`, formerly `pltpu.TPUCompilerParams`)."""
    from jax.experimental.pallas import tpu as pltpu

    cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    kwargs = {"dimension_semantics": tuple(dimension_semantics)}
    if vmem_limit_bytes is not None:
        kwargs["vmem_limit_bytes"] = int(vmem_limit_bytes)
    return cls(**kwargs)


def tpu_interpret(interpret: bool):
    """The `interpret=` argument of a Mosaic `pallas_call`: Pallas's TPU interpreter (which
    simulates VMEM, DMAs and semaphores on a CPU) when asked for, else False (lower through
    Mosaic). Releases without `pltpu.InterpretParams` fall back to the generic interpreter."""
    if not interpret:
        return False
    from jax.experimental.pallas import tpu as pltpu

    params = getattr(pltpu, "InterpretParams", None)
    return params() if params is not None else True


def tpu_vmem(shape, dtype):
    """A VMEM scratch buffer of `shape` and `dtype` for `scratch_shapes`."""
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.VMEM(tuple(shape), dtype)
