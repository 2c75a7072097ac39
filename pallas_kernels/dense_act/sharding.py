"""How the dense + activation kernels split across devices (see pallas_kernels/_sharding.py).

Rows and output columns split freely (a column-split weight, as in Megatron's column-parallel
layers, runs locally; the input gradient adds the shards' parts). d_in may split too (a row-split
weight, FSDP-style, or an input split over its features): as in Megatron's row-parallel layers,
each device multiplies its own slice of d_in, one all-reduce of the [rows, d_out] partial sums
completes the pre-activation (both of gated_dense's in the same all-reduce), and the bias and
activation run on the complete sum. The forward keeps that sum (in the result's dtype, as the
unfused program does), and every gradient then stays local: the input's on its own d_in slice,
the weights' on their own rows. These per-shard
paths are written in jnp (float32 accumulation), not with the kernel.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._sharding import Collective, ShardingRule, batch_dims
from pallas_kernels.dense_act.xla import _XLA_ACTIVATIONS

_WHOLE = {"i": "the activation follows the sum over d_in"}


def _partial(x, w):
    return jnp.matmul(x, w, preferred_element_type=jnp.float32)


def _rows_t(x, dz):
    """x^T dz over every row: a weight's gradient on this device's rows and columns."""
    x2, dz2 = x.reshape(-1, x.shape[-1]), dz.reshape(-1, dz.shape[-1])
    return jnp.matmul(x2.T, dz2.astype(x2.dtype), preferred_element_type=jnp.float32)


def _dense_pre(axes, x, w, b):
    z = lax.psum(_partial(x, w), axes)
    return z if b is None else z + b.astype(jnp.float32)


def _dense_forward(axes, shards, x, w, b=None, *, activation):
    """(output, (the complete pre-activation, kept for the backward))."""
    dtype = jnp.result_type(x, w) if b is None else jnp.result_type(x, w, b)
    z = _dense_pre(axes, x, w, b)
    return _XLA_ACTIVATIONS[activation](z).astype(dtype), (z.astype(dtype),)


def _dense_backward(axes, shards, cotangents, saved, x, w, b=None, *, activation):
    (g,) = cotangents
    z = _dense_pre(axes, x, w, b) if saved is None else saved[1][0].astype(jnp.float32)
    _, act_vjp = jax.vjp(_XLA_ACTIVATIONS[activation], z)
    (dz,) = act_vjp(g.astype(jnp.float32))
    dx = jnp.matmul(dz.astype(w.dtype), w.T, preferred_element_type=jnp.float32)
    grads = [dx.astype(x.dtype), _rows_t(x, dz).astype(w.dtype)]
    if b is not None:  # the same on every d_in shard: complete, not a partial sum
        grads.append(jnp.sum(dz, axis=tuple(range(x.ndim - 1))).astype(b.dtype))
    return grads


def _gated_pre(axes, x, w_gate, w_up):
    return lax.psum((_partial(x, w_gate), _partial(x, w_up)), axes)


def _gated_forward(axes, shards, x, w_gate, w_up, *, activation):
    """(output, (the complete gate and up pre-activations, kept for the backward))."""
    gate, up = _gated_pre(axes, x, w_gate, w_up)
    dtype = jnp.result_type(x, w_gate, w_up)
    return ((_XLA_ACTIVATIONS[activation](gate) * up).astype(dtype),
            (gate.astype(dtype), up.astype(dtype)))


def _gated_backward(axes, shards, cotangents, saved, x, w_gate, w_up, *, activation):
    (g,) = cotangents
    gate, up = (_gated_pre(axes, x, w_gate, w_up) if saved is None
                else (a.astype(jnp.float32) for a in saved[1]))
    act, act_vjp = jax.vjp(_XLA_ACTIVATIONS[activation], gate)
    g32 = g.astype(jnp.float32)
    (dgate,) = act_vjp(g32 * up)
    dup = g32 * act
    dx = (jnp.matmul(dgate.astype(w_gate.dtype), w_gate.T, preferred_element_type=jnp.float32)
          + jnp.matmul(dup.astype(w_up.dtype), w_up.T, preferred_element_type=jnp.float32))
    return [dx.astype(x.dtype), _rows_t(x, dgate).astype(w_gate.dtype),
            _rows_t(x, dup).astype(w_up.dtype)]


def _pre_activations(count):
    """The [rows, d_out] pre-activations the forward keeps, in the result's dtype (as the
    unfused program keeps them)."""
    def saves(x, w, *args, **kwargs):
        dtype = jnp.result_type(x, w, *(a for a in args if a is not None))
        stat = jax.ShapeDtypeStruct((*x.shape[:-1], w.shape[-1]), dtype)
        return ((f"{batch_dims(x.ndim - 1)} o", stat),) * count
    return saves


DENSE_ROW_PARALLEL = Collective("i", _dense_forward, _dense_backward, saves=_pre_activations(1))
GATED_ROW_PARALLEL = Collective("i", _gated_forward, _gated_backward, saves=_pre_activations(2))


def dense_act_sharding(x, w, b=None, *, activation):
    rows = batch_dims(x.ndim - 1)
    return ShardingRule(args=(f"{rows} i", "i o", None if b is None else "o"),
                kwargs=dict(activation=activation), results=(f"{rows} o",), whole=_WHOLE,
                collectives=(DENSE_ROW_PARALLEL,))


def gated_dense_sharding(x, w_gate, w_up, *, activation):
    rows = batch_dims(x.ndim - 1)
    return ShardingRule(args=(f"{rows} i", "i o", "i o"), kwargs=dict(activation=activation),
                results=(f"{rows} o",), whole=_WHOLE, collectives=(GATED_ROW_PARALLEL,))
