"""The "xla" implementation of `softmax_cross_entropy`: log-sum-exp in float32 minus the label's
logit, differentiated by JAX."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax_cross_entropy_xla(logits, labels):
    """log-sum-exp in float32 minus the label's logit; differentiated by JAX."""
    logits32 = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits32, axis=-1)
    picked = jnp.take_along_axis(logits32, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return (lse - picked).astype(logits.dtype)
