"""Tile helpers the Mosaic (TPU) kernels share: block sizes that satisfy TPU tiling, padding in
the wrappers, the VMEM budget, and the launch arguments every TPU `pallas_call` takes.

TPU tiling: the last two dimensions of a block are multiples of (sublanes, 128), where sublanes is
8 for 32-bit types, 16 for 16-bit and 32 for 8-bit ones, or equal to the array's dimensions.
Wrappers pad arrays to whole blocks and the kernels mask what the padding would change.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from pallas_kernels import _pallas_compat as compat  # noqa: F401 (kernel files use tt.compat)

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


def launch(semantics, interpret: bool, vmem: int) -> dict:
    """`compiler_params` and `interpret` for a Mosaic pallas_call."""
    del vmem  # checked against VMEM_BUDGET by the caller; the limit leaves Mosaic headroom
    return {"compiler_params": compat.tpu_compiler_params(semantics, 2 * VMEM_BUDGET),
            "interpret": compat.tpu_interpret(interpret)}
