"""The logit at each row's label, x . w[label], without the logits: `linear_logit`.

The cross-entropy rewrite reads it next to `linear_cross_entropy` (the log-sum-exp is the loss
plus this logit). Written as a gather of weight rows, a vocabulary-split weight makes XLA gather
[tokens, d] rows and all-reduce them; as an op that runs per shard, each device picks the labels
its own columns hold and the shards add [tokens] floats with one psum.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._dispatch import Op
from pallas_kernels._sharding import Collective, ShardingRule, batch_dims


def _rows(x, w, index, w_layout):
    """x as [tokens, d] float32, and the weight's rows at `index` ([tokens]) as float32."""
    x2d = x.reshape(index.size, x.shape[-1]).astype(jnp.float32)
    rows = jnp.take(w, index, axis=0) if w_layout == "vd" else jnp.take(w, index, axis=1).T
    return x2d, rows.astype(jnp.float32)


def linear_logit_xla(x, w, labels, *, w_layout):
    """x[..., :] . w[labels] in float32; labels must lie in [0, vocab)."""
    x2d, rows = _rows(x, w, labels.reshape(-1), w_layout)
    return jnp.sum(x2d * rows, axis=-1).reshape(labels.shape)


def _local(axes, x, w, labels, w_layout):
    vocab_local = w.shape[1] if w_layout == "dv" else w.shape[0]
    local = labels.reshape(-1) - lax.axis_index(axes) * vocab_local
    here = (local >= 0) & (local < vocab_local)
    x2d, rows = _rows(x, w, jnp.where(here, local, 0), w_layout)
    return here, jnp.where(here, local, 0), x2d, rows


def _forward(axes, shards, x, w, labels, *, w_layout):
    here, _, x2d, rows = _local(axes, x, w, labels, w_layout)
    picked = jnp.where(here, jnp.sum(x2d * rows, axis=-1), 0.0)
    return lax.psum(picked, axes).reshape(labels.shape)


def _backward(axes, shards, cotangents, x, w, labels, *, w_layout):
    (g,) = cotangents
    here, index, x2d, rows = _local(axes, x, w, labels, w_layout)
    g = jnp.where(here, g.reshape(-1).astype(jnp.float32), 0.0)[:, None]
    dx = lax.psum(g * rows, axes).astype(x.dtype).reshape(x.shape)
    return dx, _rows_gradient(w, index, g * x2d, w_layout)


def _rows_gradient(w, index, rows_cotangent, w_layout):
    """The weight's gradient from its rows' cotangents ([tokens, d]) at `index`."""
    if w_layout == "vd":
        dw = jnp.zeros(w.shape, jnp.float32).at[index].add(rows_cotangent)
    else:
        dw = jnp.zeros(w.shape, jnp.float32).at[:, index].add(rows_cotangent.T)
    return dw.astype(w.dtype)


# d split: each device dots its own features and the shards add [tokens] floats; the backward
# needs no communication (each device's features of dx and of the weight's rows are its own).

def _forward_d(axes, shards, x, w, labels, *, w_layout):
    return lax.psum(linear_logit_xla(x, w, labels, w_layout=w_layout), axes)


def _backward_d(axes, shards, cotangents, x, w, labels, *, w_layout):
    (g,) = cotangents
    index = labels.reshape(-1)
    x2d, rows = _rows(x, w, index, w_layout)
    g = g.reshape(-1).astype(jnp.float32)[:, None]
    dx = (g * rows).astype(x.dtype).reshape(x.shape)
    return dx, _rows_gradient(w, index, g * x2d, w_layout)


def linear_logit_sharding(x, w, labels, *, w_layout):
    rows = batch_dims(labels.ndim)
    weight = "d v" if w_layout == "dv" else "v d"
    return ShardingRule(
        args=(f"{rows} d", weight, rows), kwargs=dict(w_layout=w_layout), results=(rows,),
        whole={"d": "the logit contracts d", "v": "a label may index any column"},
        collectives=(Collective("v", _forward, _backward, implementation="xla"),
                     Collective("d", _forward_d, _backward_d, implementation="xla",
                                unless_split=("v",))))


linear_logit_op = Op("linear_logit", sharding=linear_logit_sharding, shard_xla=True)
linear_logit_op.register("xla")(linear_logit_xla)


def linear_logit(x, w, labels, *, w_layout: str = "dv"):
    """The logit x @ w (or x @ w.T for "vd") at each row's label, float32; labels in [0, vocab)."""
    return linear_logit_op(x, w, labels, w_layout=w_layout, implementation="xla")


__all__ = ["linear_logit", "linear_logit_op", "linear_logit_xla"]
