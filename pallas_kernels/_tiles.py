"""Tile helpers the Triton kernels share: block fitting, bounds masks, masked loads and stores,
compiler parameters, and the online softmax step.

A bound of None means the blocks tile the dimension exactly and no mask is needed; masks are then
left out entirely, which keeps the common case free of selects.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _pallas_compat as compat


def fit(dim: int, cap: int) -> int:
    """A block size for `dim`: a power of two >= 16 (Triton's dot needs them), at most `cap`."""
    return max(16, min(cap, pl.next_power_of_2(dim)))


def bound(dim: int, block: int):
    """The limit to mask indices against, or None when blocks tile `dim` exactly."""
    return None if dim % block == 0 else dim


def vector_mask(ids, limit):
    return None if limit is None else ids < limit


def mask2(row_ids, col_ids, row_bound, col_bound):
    """The in-bounds mask of a (rows, cols) tile, or None when both bounds are None."""
    shape = (row_ids.size, col_ids.size)
    mask = None
    if row_bound is not None:
        mask = jnp.broadcast_to((row_ids < row_bound)[:, None], shape)
    if col_bound is not None:
        cols = jnp.broadcast_to((col_ids < col_bound)[None, :], shape)
        mask = cols if mask is None else mask & cols
    return mask


def load(ref, mask):
    """`ref`'s block, zero where `mask` (None: everywhere in bounds) is False."""
    return plgpu.load(ref) if mask is None else plgpu.load(ref, mask=mask, other=0)


def load_tile(ref, row_ids, col_ids, row_bound, col_bound):
    return load(ref, mask2(row_ids, col_ids, row_bound, col_bound))


def store_tile(ref, value, row_ids, col_ids, row_bound, col_bound):
    plgpu.store(ref, value.astype(ref.dtype), mask=mask2(row_ids, col_ids, row_bound, col_bound))


def params(config, interpret: bool):
    """Triton launch parameters from a config with `num_warps` and `num_stages`."""
    return compat.gpu_compiler_params(num_warps=config.num_warps, num_stages=config.num_stages,
                                      interpret=interpret)


def stable_shift(row_max):
    """What to subtract before exponentiating: the row max where it is finite, else 0.

    A row that has seen only -inf keeps max -inf, and one holding +inf has max +inf; shifting
    those by the max would take inf - inf = NaN. Shifting by 0 gives exp(-inf) = 0 and
    exp(+inf) = inf instead, as `jax.nn.logsumexp` does.
    """
    return jnp.where(jnp.isfinite(row_max), row_max, 0.0)


def online_softmax_step(running_max, t, exp=jnp.exp):
    """One [rows, block] tile of an online softmax over the columns.

    Returns (new running max, the factor rescaling what was accumulated under the old shift,
    exp(t - shift) for this tile). `exp` is jnp.exp2 for logits kept in base 2.
    """
    new_max = jnp.maximum(running_max, jnp.max(t, axis=1))
    shift = stable_shift(new_max)
    return new_max, exp(running_max - shift), exp(t - shift[:, None])


def online_logsumexp_step(running_max, running_sum, t):
    """Fold a [rows, block] tile into a running (max, sum of exp(t - shift(max)))."""
    new_max, rescale, p = online_softmax_step(running_max, t)
    return new_max, running_sum * rescale + jnp.sum(p, axis=1)


def finish_logsumexp(running_max, running_sum):
    """The log-sum-exp from `online_logsumexp_step`'s running (max, sum): -inf for a row of
    -inf, +inf for a row holding +inf."""
    return stable_shift(running_max) + jnp.log(running_sum)
