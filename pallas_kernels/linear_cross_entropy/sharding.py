"""How linear_cross_entropy's kernels split across devices (see pallas_kernels/_sharding.py).

Tokens split freely. The vocabulary may: with the weight's vocabulary axis split over mesh
axes, as in a tensor-parallel language-model head, each device runs the kernels on its own
columns and the shards combine their log-sum-exp statistics and picked logits with one
all-reduce of [tokens] floats (Megatron-LM's vocabulary-parallel cross-entropy); the backward's
logit gradients need only the combined log-sum-exp, which the forward keeps (so the backward
runs no forward kernel and no statistics all-reduce), and the input gradient adds the shards'
parts.

With d split instead (the logits contract it; a tied embedding split on its features), one of
three, whichever sends the fewest bytes (`_costs`):
- the weight exchanged into a vocabulary split with an all-to-all (a device sends 1/n of what
  gathering the weight would send over n shards), the activations gathered, and the same
  vocabulary-parallel kernels; the backward exchanges again (its kernel reads the exchanged
  weight; the log-sum-exp is the forward's), returns the weight's gradient by all-to-all and
  reduce-scatters the input's. Each device holds 1/n of the weight and of its gradient. Needs a
  vocabulary the split divides; best with many tokens per device.
- the partial logits all-reduced, as XLA does for the unfused head: best with few tokens per
  device against the vocabulary; the forward keeps the logits and the backward sends nothing.
- the weight gathered for the kernel, with the gather warning: where the vocabulary is not
  divisible and the logits would be large.
With both d and the vocabulary split, the vocabulary's split is kept and d is gathered.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._sharding import Collective, ShardingRule, batch_dims, row_statistic
from pallas_kernels.linear_cross_entropy.common import chunk_columns, linear_loss_dtype
from pallas_kernels.linear_cross_entropy.triton import (linear_cross_entropy_backward,
                                                        linear_cross_entropy_config_heuristic,
                                                        linear_cross_entropy_forward)
from pallas_kernels.linear_cross_entropy.xla import (linear_ce_xla_backward,
                                                     linear_ce_xla_forward)
from pallas_kernels.softmax_cross_entropy.common import normalize_labels


class _Local(NamedTuple):
    """One implementation's kernels on flattened local operands (labels normalised; -1 picks
    no class): forward -> (loss, lse float32); backward(lse, dloss) -> (dx, dw)."""
    forward: Callable
    backward: Callable


def _local_kernels(implementation: str, x2d, w, w_layout) -> _Local:
    vocab_local = w.shape[1] if w_layout == "dv" else w.shape[0]
    itemsize = jnp.dtype(x2d.dtype).itemsize
    if implementation == "xla":
        chunk = max(1, min(vocab_local, chunk_columns(x2d.shape[0], vocab_local, itemsize, 128)))
        return _Local(
            lambda labels: linear_ce_xla_forward(x2d, w, labels, w_layout, chunk),
            lambda labels, lse, dloss: linear_ce_xla_backward(x2d, w, labels, lse, dloss,
                                                               w_layout, chunk))
    config = linear_cross_entropy_config_heuristic(x2d.shape[0], x2d.shape[1], vocab_local,
                                                   itemsize)
    return _Local(
        lambda labels: linear_cross_entropy_forward(x2d, w, labels, w_layout, jnp.float32,
                                                    config),
        lambda labels, lse, dloss: linear_cross_entropy_backward(x2d, w, labels, lse, dloss,
                                                                 w_layout, config))


def _shard(implementation, axes, shards, x, w, labels, w_layout):
    """This shard's kernels, its labels (-1 where another shard holds the class) and whether
    the global label is valid."""
    vocab_local = w.shape[1] if w_layout == "dv" else w.shape[0]
    vocab = vocab_local * shards
    dtype = jnp.result_type(x, w)
    x2d = x.reshape(labels.size, x.shape[-1]).astype(dtype)
    global_labels = normalize_labels(labels.reshape(-1), vocab)
    valid = (global_labels >= 0) & (global_labels < vocab)
    local = global_labels - lax.axis_index(axes) * vocab_local
    here = (local >= 0) & (local < vocab_local)
    local = jnp.where(here, local, -1)
    return _local_kernels(implementation, x2d, w.astype(dtype), w_layout), local, valid


def _forward(implementation, axes, shards, x, w, labels, *, w_layout):
    """(loss, (the combined log-sum-exp, kept for the backward))."""
    if labels.size == 0:
        return (jnp.zeros(labels.shape, linear_loss_dtype(x, w)),
                (jnp.zeros(labels.shape, jnp.float32),))
    kernels, local, valid = _shard(implementation, axes, shards, x, w, labels, w_layout)
    loss, lse = kernels.forward(local)
    picked = lax.psum(jnp.where(local >= 0, lse - loss, 0.0), axes)
    top = lax.pmax(lse, axes)
    lse = jnp.log(lax.psum(jnp.exp(lse - top), axes)) + top
    loss = jnp.where(valid, lse - picked, jnp.nan)
    return (loss.astype(linear_loss_dtype(x, w)).reshape(labels.shape),
            (lse.reshape(labels.shape),))


def _backward(implementation, axes, shards, cotangents, saved, x, w, labels, *, w_layout):
    (dloss,) = cotangents
    if labels.size == 0:
        return jnp.zeros_like(x), jnp.zeros_like(w)
    if saved is None:  # the forward did not keep its log-sum-exp: run it again
        saved = (), _forward(implementation, axes, shards, x, w, labels, w_layout=w_layout)[1]
    (lse,) = saved[1]
    kernels, local, _ = _shard(implementation, axes, shards, x, w, labels, w_layout)
    dx, dw = kernels.backward(local, lse.reshape(-1), dloss.reshape(-1))
    dx = lax.psum(dx.astype(jnp.float32), axes)
    return dx.astype(x.dtype).reshape(x.shape), dw.astype(w.dtype)


def _saves(x, w, labels, *, w_layout):
    """The combined log-sum-exp, one float32 per token."""
    return (row_statistic(labels.shape),)


VOCAB_PARALLEL = tuple(
    Collective("v", functools.partial(_forward, impl), functools.partial(_backward, impl),
               implementation=impl, saves=_saves)
    for impl in ("pallas", "xla"))


# d split (a weight split on its input features, as a tied embedding is in a tensor-parallel
# model): the shards exchange the weight so that each holds whole rows of d for its part of the
# vocabulary (see the module docstring for the bytes), gather the activations, and run
# vocabulary-parallel cross-entropy. The backward sends the weight's gradient back the same way
# and reduce-scatters the input's over d. No device holds the whole weight or its gradient.

def _axes_of_w(w_layout):
    """(vocabulary axis, d axis) of the weight."""
    return (1, 0) if w_layout == "dv" else (0, 1)


def _to_vocabulary_split(axes, x, w, w_layout):
    v_axis, d_axis = _axes_of_w(w_layout)
    w = lax.all_to_all(w, axes, v_axis, d_axis, tiled=True)
    x = lax.all_gather(x, axes, axis=x.ndim - 1, tiled=True)
    return x, w


def _forward_d(implementation, axes, shards, x, w, labels, *, w_layout):
    x, w = _to_vocabulary_split(axes, x, w, w_layout)
    return _forward(implementation, axes, shards, x, w, labels, w_layout=w_layout)


def _backward_d(implementation, axes, shards, cotangents, saved, x, w, labels, *, w_layout):
    (dloss,) = cotangents
    if labels.size == 0:
        return jnp.zeros_like(x), jnp.zeros_like(w)
    x_local, w_local = x, w
    x, w = _to_vocabulary_split(axes, x, w, w_layout)
    if saved is None:
        saved = (), _forward(implementation, axes, shards, x, w, labels, w_layout=w_layout)[1]
    (lse,) = saved[1]
    kernels, local, _ = _shard(implementation, axes, shards, x, w, labels, w_layout)
    dx, dw = kernels.backward(local, lse.reshape(-1), dloss.reshape(-1))
    dx = lax.psum_scatter(dx.astype(jnp.float32), axes, scatter_dimension=1, tiled=True)
    v_axis, d_axis = _axes_of_w(w_layout)
    dw = lax.all_to_all(dw.astype(w.dtype), axes, d_axis, v_axis, tiled=True)
    return dx.astype(x.dtype).reshape(x_local.shape), dw.astype(w_local.dtype)


# d split where the logits are small (few tokens per device against the weight): what XLA does
# for the unfused head. Each device multiplies its features, one all-reduce of the [tokens,
# vocab] partial logits completes them, and the cross-entropy runs on them locally; the forward
# keeps the logits, so the backward needs no communication.

def _weight_logits(x2d, w, w_layout):
    return jnp.matmul(x2d, w if w_layout == "dv" else w.T, preferred_element_type=jnp.float32)


def _forward_logits(axes, shards, x, w, labels, *, w_layout):
    """(loss, (the complete float32 logits, kept for the backward))."""
    vocab = w.shape[1] if w_layout == "dv" else w.shape[0]
    if labels.size == 0:
        return (jnp.zeros(labels.shape, linear_loss_dtype(x, w)),
                (jnp.zeros((*labels.shape, vocab), jnp.float32),))
    x2d = x.reshape(labels.size, x.shape[-1])
    logits = lax.psum(_weight_logits(x2d, w, w_layout), axes)
    flat = normalize_labels(labels.reshape(-1), vocab)
    valid = (flat >= 0) & (flat < vocab)
    picked = jnp.take_along_axis(logits, jnp.where(valid, flat, 0)[:, None], axis=-1)[:, 0]
    loss = jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, jnp.nan)
    return (loss.astype(linear_loss_dtype(x, w)).reshape(labels.shape),
            (logits.reshape(*labels.shape, vocab),))


def _backward_logits(axes, shards, cotangents, saved, x, w, labels, *, w_layout):
    (dloss,) = cotangents
    if labels.size == 0:
        return jnp.zeros_like(x), jnp.zeros_like(w)
    if saved is None:
        saved = (), _forward_logits(axes, shards, x, w, labels, w_layout=w_layout)[1]
    vocab = w.shape[1] if w_layout == "dv" else w.shape[0]
    logits = saved[1][0].reshape(labels.size, vocab)
    flat = normalize_labels(labels.reshape(-1), vocab)
    onehot = flat[:, None] == jnp.arange(vocab, dtype=flat.dtype)
    dlogits = (jax.nn.softmax(logits, axis=-1) - onehot) * dloss.reshape(-1, 1).astype(
        jnp.float32)
    x2d = x.reshape(labels.size, x.shape[-1])
    wt = (w if w_layout == "dv" else w.T).astype(jnp.float32)
    dx = jnp.matmul(dlogits, wt.T, preferred_element_type=jnp.float32)
    dw = jnp.matmul(x2d.astype(jnp.float32).T, dlogits, preferred_element_type=jnp.float32)
    return (dx.astype(x.dtype).reshape(x.shape),
            (dw if w_layout == "dv" else dw.T).astype(w.dtype))


def _saves_logits(x, w, labels, *, w_layout):
    vocab = w.shape[1] if w_layout == "dv" else w.shape[0]
    return ((f"{batch_dims(labels.ndim)} v",
             jax.ShapeDtypeStruct((*labels.shape, vocab), jnp.float32)),)


# Which of the three a d split gets, by the elements each device sends (ring algorithms, in
# units of (n - 1) / n): the logits' all-reduce sends 2 T V (T tokens per device, V the
# vocabulary); the exchange 3 V D / n (three all-to-alls of the weight) plus 3 T D (the
# activations gathered twice, their gradient reduce-scattered); gathering the weight for the
# kernel 2 V D (the weight gathered, its gradient reduce-scattered) plus 2 T D. The logits are
# also what a device holds until the backward, where the other two hold 1/n of the weight or all
# of it.

def _costs(sizes, splits, n):
    tokens = math.prod(size // splits.get(f, 1) for f, size in sizes.items()
                       if f.startswith("a"))
    v, d = sizes["v"], sizes["d"]
    return dict(logits=2 * tokens * v, exchange=3 * v * d / n + 3 * tokens * d,
                gather=2 * v * d + 2 * tokens * d)


def _exchange_applies(sizes, splits, n):
    costs = _costs(sizes, splits, n)
    return costs["exchange"] < costs["logits"]


def _logits_apply(sizes, splits, n):
    costs = _costs(sizes, splits, n)
    return costs["logits"] <= costs["gather"]


FEATURE_EXCHANGE = tuple(
    Collective("d", functools.partial(_forward_d, impl), functools.partial(_backward_d, impl),
               implementation=impl, unless_split=("v",), divides=("v",), saves=_saves,
               applies=_exchange_applies)
    for impl in ("pallas", "xla"))
PARTIAL_LOGITS = tuple(
    Collective("d", _forward_logits, _backward_logits, implementation=impl,
               unless_split=("v",), saves=_saves_logits, applies=_logits_apply)
    for impl in ("pallas", "xla"))


def linear_cross_entropy_sharding(x, w, labels, *, w_layout):
    rows = batch_dims(labels.ndim)
    weight = "d v" if w_layout == "dv" else "v d"
    return ShardingRule(args=(f"{rows} d", weight, rows), kwargs=dict(w_layout=w_layout),
                results=(rows,),
                whole={"d": "the logits contract d",
                       "v": "the log-sum-exp runs over the whole vocabulary"},
                collectives=VOCAB_PARALLEL + FEATURE_EXCHANGE + PARTIAL_LOGITS)
