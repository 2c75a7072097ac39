"""How linear_cross_entropy's kernels split across devices (see pallas_kernels/_sharding.py).

Tokens split freely. d does not (the logits contract it). The vocabulary may: with the weight's
vocabulary axis split over mesh axes, as in a tensor-parallel language-model head, each device
runs the kernels on its own columns and the shards combine their log-sum-exp statistics and
picked logits with one all-reduce of [tokens] floats (Megatron-LM's vocabulary-parallel
cross-entropy); the backward's logit gradients need only the combined log-sum-exp, and the input
gradient adds the shards' parts. Neither the weight nor the logits are ever gathered.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._sharding import Collective, Rule, batch_dims
from pallas_kernels.linear_cross_entropy.common import linear_loss_dtype
from pallas_kernels.linear_cross_entropy.triton import (linear_cross_entropy_backward,
                                                        linear_cross_entropy_config_heuristic,
                                                        linear_cross_entropy_forward)
from pallas_kernels.softmax_cross_entropy.common import normalize_labels


def _local_problem(axes, shards, x, w, labels, w_layout):
    """Flattened local operands, this shard's labels (-1 where another shard holds the class),
    whether the global label is valid, and the kernels' config."""
    vocab_local = w.shape[1] if w_layout == "dv" else w.shape[0]
    vocab = vocab_local * shards
    dtype = jnp.result_type(x, w)
    x2d = x.reshape(labels.size, x.shape[-1]).astype(dtype)
    global_labels = normalize_labels(labels.reshape(-1), vocab)
    valid = (global_labels >= 0) & (global_labels < vocab)
    local = global_labels - lax.axis_index(axes) * vocab_local
    here = (local >= 0) & (local < vocab_local)
    config = linear_cross_entropy_config_heuristic(x2d.shape[0], x.shape[-1], vocab_local,
                                                   jnp.dtype(dtype).itemsize)
    return x2d, w.astype(dtype), jnp.where(here, local, -1), here, valid, config


def _statistics(axes, shards, x, w, labels, w_layout):
    x2d, w, local, here, valid, config = _local_problem(axes, shards, x, w, labels, w_layout)
    loss, lse = linear_cross_entropy_forward(x2d, w, local, w_layout, jnp.float32, config)
    picked = lax.psum(jnp.where(here, lse - loss, 0.0), axes)
    top = lax.pmax(lse, axes)
    lse = jnp.log(lax.psum(jnp.exp(lse - top), axes)) + top
    return x2d, w, local, valid, config, lse, picked


def _forward(axes, shards, x, w, labels, *, w_layout):
    if labels.size == 0:
        return jnp.zeros(labels.shape, linear_loss_dtype(x, w))
    *_, valid, _, lse, picked = _statistics(axes, shards, x, w, labels, w_layout)
    loss = jnp.where(valid, lse - picked, jnp.nan)
    return loss.astype(linear_loss_dtype(x, w)).reshape(labels.shape)


def _backward(axes, shards, cotangents, x, w, labels, *, w_layout):
    (dloss,) = cotangents
    if labels.size == 0:
        return jnp.zeros_like(x), jnp.zeros_like(w)
    x2d, w_local, local, _, config, lse, _ = _statistics(axes, shards, x, w, labels, w_layout)
    dx, dw = linear_cross_entropy_backward(x2d, w_local, local, lse, dloss.reshape(-1),
                                           w_layout, config)
    dx = lax.psum(dx.astype(jnp.float32), axes)
    return dx.astype(x.dtype).reshape(x.shape), dw.astype(w.dtype)


VOCAB_PARALLEL = Collective("v", _forward, _backward)


def linear_cross_entropy_sharding(x, w, labels, *, w_layout):
    rows = batch_dims(labels.ndim)
    weight = "d v" if w_layout == "dv" else "v d"
    return Rule(args=(f"{rows} d", weight, rows), kwargs=dict(w_layout=w_layout),
                results=(rows,),
                whole={"d": "the logits contract d",
                       "v": "the log-sum-exp runs over the whole vocabulary"},
                collectives=(VOCAB_PARALLEL,))
