"""Synthetic batches, deterministic in the key: every leaf has the batch as its leading axis."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_batch_size(batch_size: object) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive Python int, got {batch_size!r}")


def check_tokens(tokens: jax.Array, seq_len: int) -> None:
    """Language models take int tokens (batch, seq) with seq at most their ``seq_len``."""
    if tokens.ndim != 2 or tokens.shape[1] > seq_len:
        raise ValueError(f"expected int tokens of shape (batch, seq) with seq <= seq_len="
                         f"{seq_len}, got shape {tokens.shape}")


def token_batch(rng: jax.Array, batch_size: int, *, seq_len: int, vocab_size: int) -> dict:
    """Uniform random tokens for next-token prediction.

    ``inputs`` and ``targets`` are the two overlapping windows of one sequence of
    ``seq_len + 1`` tokens, so the model runs at exactly ``seq_len`` positions.
    """
    _check_batch_size(batch_size)
    tokens = jax.random.randint(rng, (batch_size, seq_len + 1), 0, vocab_size, dtype=jnp.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def check_images(images: jax.Array, image_size: int, channels: int) -> None:
    """Vision models take NHWC images of the configured size."""
    expected = (image_size, image_size, channels)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(f"expected NHWC images of shape (batch, {', '.join(map(str, expected))}),"
                         f" got shape {images.shape}")


def image_batch(rng: jax.Array, batch_size: int, *, image_size: int, channels: int,
                num_classes: int) -> dict:
    """Standard-normal NHWC float32 images with uniform random integer labels."""
    _check_batch_size(batch_size)
    image_key, label_key = jax.random.split(rng)
    shape = (batch_size, image_size, image_size, channels)
    return {"images": jax.random.normal(image_key, shape, jnp.float32),
            "labels": jax.random.randint(label_key, (batch_size,), 0, num_classes, jnp.int32)}


def feature_batch(rng: jax.Array, batch_size: int, *, input_dim: int, num_classes: int) -> dict:
    """Standard-normal float32 feature vectors with uniform random integer labels."""
    _check_batch_size(batch_size)
    input_key, label_key = jax.random.split(rng)
    return {"inputs": jax.random.normal(input_key, (batch_size, input_dim), jnp.float32),
            "labels": jax.random.randint(label_key, (batch_size,), 0, num_classes, jnp.int32)}
