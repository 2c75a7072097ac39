"""softmax_cross_entropy written plainly: the oracle the tests differentiate in float64."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax_cross_entropy_reference(logits, labels):
    """logsumexp(logits) - logits[label] via take_along_axis (optax's formulation); the oracle.

    On rows whose label is out of range the loss is NaN and the gradient softmax * dloss (a
    -log_softmax(logits)[label] formulation would give a zero gradient there instead).
    """
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked
