"""How the softmax cross-entropy kernels split across devices (see pallas_kernels/_sharding.py).

Rows split freely. The vocabulary may split too (logits of a vocabulary-parallel head): each
device takes its columns' maximum, sum of exponentials and, where it holds the label's class, the
picked logit; one all-reduce of the maxima and one of [rows, 2] sums complete the log-sum-exp and
the picked logit (Megatron-LM's vocabulary-parallel cross-entropy). The backward needs only the
complete log-sum-exp, which the forward keeps: each device's logit gradients are softmax minus
one-hot on its own columns, with no communication.
The logits are never gathered. These per-shard paths are written in jnp (float32), not with the
kernel.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels._sharding import Collective, ShardingRule, batch_dims, row_statistic
from pallas_kernels.softmax_cross_entropy.common import normalize_labels


def _shard(axes, shards, logits, labels):
    """float32 logits, this shard's one-hot of the labels and whether each label is in range."""
    vocab_local = logits.shape[-1]
    vocab = vocab_local * shards
    labels = normalize_labels(labels, vocab)
    valid = (labels >= 0) & (labels < vocab)
    local = labels - lax.axis_index(axes) * vocab_local
    onehot = local[..., None] == jnp.arange(vocab_local, dtype=jnp.int32)
    return logits.astype(jnp.float32), onehot, valid


def _forward(axes, shards, logits, labels):
    """(loss, (the complete log-sum-exp, kept for the backward))."""
    logits32, onehot, valid = _shard(axes, shards, logits, labels)
    top = lax.pmax(lax.stop_gradient(jnp.max(logits32, axis=-1)), axes)
    sums = jnp.stack([jnp.sum(jnp.exp(logits32 - top[..., None]), axis=-1),
                      jnp.sum(jnp.where(onehot, logits32, 0.0), axis=-1)], axis=-1)
    sums = lax.psum(sums, axes)
    lse = jnp.log(sums[..., 0]) + top
    return jnp.where(valid, lse - sums[..., 1], jnp.nan).astype(logits.dtype), (lse,)


def _backward(axes, shards, cotangents, saved, logits, labels):
    (dloss,) = cotangents
    logits32, onehot, _ = _shard(axes, shards, logits, labels)
    (lse,) = (_forward(axes, shards, logits, labels) if saved is None else saved)[1]
    probs = jnp.exp(logits32 - lse[..., None])
    dlogits = (probs - onehot) * dloss.astype(jnp.float32)[..., None]
    return [dlogits.astype(logits.dtype)]


def _saves(logits, labels):
    return (row_statistic(labels.shape),)


VOCAB_PARALLEL = Collective("v", _forward, _backward, saves=_saves)


def softmax_cross_entropy_sharding(logits, labels):
    rows = batch_dims(labels.ndim)
    return ShardingRule(args=(f"{rows} v", rows), kwargs={}, results=(rows,),
                whole={"v": "the log-sum-exp runs over the whole vocabulary"},
                collectives=(VOCAB_PARALLEL,))
