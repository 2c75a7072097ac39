"""Tile helpers the Mosaic (TPU) kernels share: block sizes that satisfy TPU tiling, padding in
the wrappers, the VMEM budget, and the `pallas_call` every TPU kernel is launched through.

TPU tiling: the last two dimensions of a block are multiples of (sublanes, 128), where sublanes is
8 for 32-bit types, 16 for 16-bit and 32 for 8-bit ones, or equal to the array's dimensions.
Wrappers pad arrays to whole blocks and the kernels mask what the padding would change.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _pallas_compat as compat  # noqa: F401 (kernel files use tt.compat)
from pallas_kernels._dispatch import tuned_config

LANES = 128
VMEM_BUDGET = 16 << 20  # bytes of VMEM one kernel may use: every TPU generation has this much


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def sublanes(*dtypes) -> int:
    """The second-minor tiling granule for the narrowest of `dtypes`."""
    return max(32 // max(1, jnp.dtype(d).itemsize) for d in dtypes) if dtypes else 8


def fit(dim: int, cap: int, granule: int) -> int:
    """A block size for `dim`: a multiple of `granule`, at most `cap` (itself a multiple)."""
    return min(cap, round_up(max(dim, 1), granule))


def block_options(dim: int, caps: Iterable[int], granule: int) -> list[int]:
    """The distinct `fit(dim, cap, granule)` over `caps`, ascending: candidate block sizes."""
    return sorted({fit(dim, cap, granule) for cap in caps})


def within_budget(default, candidates: Iterable, vmem: Callable[..., int]) -> list:
    """A config search space: `default` and then `candidates`, without repeats, keeping those
    whose VMEM estimate `vmem(config)` fits VMEM_BUDGET."""
    return [c for c in dict.fromkeys([default, *candidates]) if vmem(c) <= VMEM_BUDGET]


# The Mosaic kernels' block-size search: the config in a space measured fastest on this host's
# TPU, the default where nothing can be timed (interpret mode, or lowered for an absent TPU).
tuned = tuned_config


def pad_axis(x, axis: int, size: int, value=0):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def block_bytes(*blocks) -> int:
    """VMEM taken by (shape, dtype) blocks: inputs and outputs are double-buffered."""
    return sum(2 * math.prod(shape) * jnp.dtype(dtype).itemsize for shape, dtype in blocks)


def scratch_bytes(*buffers) -> int:
    return sum(math.prod(shape) * jnp.dtype(dtype).itemsize for shape, dtype in buffers)


def check_vmem(what: str, used: int) -> int:
    """`used` if it fits VMEM_BUDGET, else NotImplementedError with the reason."""
    if used > VMEM_BUDGET:
        raise NotImplementedError(f"{what}: the blocks need {used / 2**20:.1f} MiB of VMEM, over "
                                  f"the {VMEM_BUDGET >> 20} MiB a kernel may use")
    return used


def pallas_call(kernel, *, semantics, interpret: bool, vmem: int, **kwargs):
    """`compat.pallas_call(kernel, **kwargs)` for Mosaic: `semantics` (one of "parallel" and
    "arbitrary" per grid axis) and the VMEM limit as compiler parameters, and the TPU interpreter
    when `interpret`.

    vmap adds a leading grid axis per vmapped dimension. Mosaic's lowering gives those axes
    parallel semantics, but the TPU interpreter takes `semantics` as they are and fails on a
    grid longer than them; so in interpret mode a vmapped call runs a pallas_call whose
    semantics start with one "parallel" per vmapped dimension, as the lowering would."""
    del vmem  # checked against VMEM_BUDGET by the caller; the limit leaves Mosaic headroom
    semantics = tuple(semantics)

    def build(vmapped: int):
        return compat.pallas_call(
            kernel, interpret=compat.tpu_interpret(interpret),
            compiler_params=compat.tpu_compiler_params(("parallel",) * vmapped + semantics,
                                                       2 * VMEM_BUDGET),
            **kwargs)

    return _interpretable_under_vmap(build, ()) if interpret else build(0)


def _interpretable_under_vmap(build, in_axes: tuple):
    """`build(len(in_axes))` under one jax.vmap per entry of `in_axes` (innermost first), as a
    function that, vmapped once more, becomes the same with that vmap's axes appended."""
    call = build(len(in_axes))
    for axes in in_axes:
        call = jax.vmap(call, in_axes=axes)

    @jax.custom_batching.custom_vmap
    def run(*args):
        return call(*args)

    @run.def_vmap
    def rule(axis_size, in_batched, *args):
        del axis_size
        axes = tuple(0 if batched else None for batched in in_batched)
        out = _interpretable_under_vmap(build, in_axes + (axes,))(*args)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return run
