"""Pallas helpers shared by the kernels: version shims, backend flags, the first-use compile check.

The Pallas API moves between JAX releases (jax 0.10.2 through 0.12 are supported; the GPU image
runs 0.11.2). Every spelling that differs, or might, is resolved here once, so kernel files use
one vocabulary:

- `squeezed`: the block dimension that is indexed by the grid and dropped inside the kernel.
- `gpu_compiler_params(num_warps=, num_stages=)`: Triton compiler parameters for `pallas_call`.
- `interpret_on(backend)`: kernels run in interpret mode on a CPU.
- `check_compiles(key, probe, arg_specs)`: lower (and on an accelerator compile) a kernel once per
  key before its first use; a failure becomes `NotImplementedError(compiler message)` so the
  dispatcher can try the next implementation instead of crashing.
"""
from __future__ import annotations

from typing import Callable, Hashable, Sequence

import jax
from jax.experimental import pallas as pl

try:  # jax >= 0.7 spells the Triton parameters `CompilerParams` in the triton module.
    from jax.experimental.pallas.triton import CompilerParams as _TritonCompilerParams
except ImportError:  # older spellings: `pl.TritonCompilerParams`
    _TritonCompilerParams = getattr(pl, "TritonCompilerParams", None)

# `pl.squeezed` replaced `None` as the squeezed block dimension; `None` still means the same.
squeezed = getattr(pl, "squeezed", None)


def backend() -> str:
    """The platform the default device belongs to ('cpu', 'gpu', 'tpu')."""
    return jax.default_backend()


def interpret_on(platform: str) -> bool:
    """Pallas kernels run in interpret mode (plain XLA ops) on a CPU."""
    return platform == "cpu"


def gpu_compiler_params(*, num_warps: int, num_stages: int, platform: str):
    """Triton compiler parameters for a `pallas_call` on `platform` (None where they don't apply)."""
    if platform != "gpu" or _TritonCompilerParams is None:
        return None
    return _TritonCompilerParams(num_warps=num_warps, num_stages=num_stages)


_VERDICTS: dict[Hashable, str | None] = {}


def check_compiles(key: Hashable, probe: Callable, arg_specs: Sequence[jax.ShapeDtypeStruct],
                   *, platform: str) -> None:
    """Raise NotImplementedError(reason) if `probe` cannot be lowered (and compiled) on `platform`.

    `probe` should exercise every kernel of an implementation (forward and backward) at the
    shapes of the call about to run. The verdict is cached per (platform, key), so the cost is
    paid once per shape, dtype and config. On an accelerator the probe is lowered and compiled,
    which is where Triton or Mosaic reject a kernel; on a CPU (interpret mode) it is lowered,
    which traces every kernel body and discharges it to XLA ops: an API that a JAX release
    removed, or a primitive without an interpret rule, shows up there.
    """
    full_key = (platform, key)
    if full_key not in _VERDICTS:
        try:
            lowered = jax.jit(probe).lower(*arg_specs)
            if platform != "cpu":
                lowered.compile()
        except Exception as e:  # noqa: BLE001 - any compiler failure means "decline"
            _VERDICTS[full_key] = f"{type(e).__name__}: {e}"
        else:
            _VERDICTS[full_key] = None
    reason = _VERDICTS[full_key]
    if reason is not None:
        raise NotImplementedError(f"kernel failed to lower or compile on {platform}: {reason}")


def clear_compile_verdicts() -> None:
    """Forget cached verdicts (after changing a kernel in a session, or in tests)."""
    _VERDICTS.clear()
