"""Textbook RMSNorm in the input's own precision: the oracle for tests."""
from __future__ import annotations

import jax.numpy as jnp


def rms_norm_reference(x, scale=None, *, eps: float = 1e-6):
    """Textbook RMSNorm in the input's own precision; the oracle for tests."""
    y = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * scale if scale is not None else y
