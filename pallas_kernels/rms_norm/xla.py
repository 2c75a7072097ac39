"""The "xla" implementation of `rms_norm`: jnp with float32 statistics, differentiated by JAX;
XLA fuses it."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def rms_norm_xla(x, scale=None, *, eps: float):
    """RMSNorm in jnp (statistics in float32), differentiated by JAX; XLA fuses it."""
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)
