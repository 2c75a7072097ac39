"""Label handling both cross-entropy ops share: checking and normalising class indices."""
from __future__ import annotations

import jax.numpy as jnp


def normalize_labels(labels, vocab: int):
    """int32 labels with negative ones counted from the end, as `jnp.take_along_axis` does."""
    labels = labels.astype(jnp.int32)
    return jnp.where(labels < 0, labels + vocab, labels)


def check_labels(name: str, labels, batch_shape) -> None:
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{name}: labels must be integers (class indices); got {labels.dtype}")
    if tuple(labels.shape) != tuple(batch_shape):
        raise ValueError(f"{name}: labels must have shape {tuple(batch_shape)} (the leading axes "
                         f"of the inputs); got {tuple(labels.shape)}")
